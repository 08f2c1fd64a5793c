"""lm-eval tasks that cannot run: more few-shot examples than a task has, a built-in task with no way to its data."""

import shutil
from pathlib import Path

import pytest

from conftest import one_line_error
from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.tasks import evaluate_tasks

TASKS = Path(__file__).parent / "lm_eval_tasks"  # olmo2kit_tiny_mc: 8 questions from a local file

pytest.importorskip("lm_eval")


def one_error(code, out, err, needle):
    """Exit 2 and the error as the last line on stderr (after lm-eval's own bars of the work it began)."""
    assert out == ""
    one_line_error(code, err, needle)
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1


@pytest.fixture
def offline(offline_hub, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return offline_hub


def test_more_fewshot_examples_than_the_task_has_is_one_line(cli, tiny_path, offline):
    args = ["--model", str(tiny_path), "--device", "cpu", "--tasks", "olmo2kit_tiny_mc", "--include-path", str(TASKS)]
    code, out, err = cli("eval", *args, "--num-fewshot", "1000", "--limit", "2")
    one_error(code, out, err, "--num-fewshot 1000 is more examples than olmo2kit_tiny_mc has to draw them from")
    # lm-eval draws the few-shot examples from all 8 questions of the task: 8 is the most there is.
    code, out, err = cli("eval", *args, "--num-fewshot", "9", "--limit", "2")
    one_error(code, out, err, "--num-fewshot 9 is more examples")
    code, out, err = cli("eval", *args, "--num-fewshot", "8", "--limit", "2", "--json")
    assert code == 0, err


def test_a_task_whose_own_fewshot_count_is_too_many(tiny, offline, tmp_path):
    for name in ("olmo2kit_tiny_mc.jsonl", "tiny_mc.py"):
        shutil.copy(TASKS / name, tmp_path / name)
    config = (TASKS / "olmo2kit_tiny_mc.yaml").read_text().replace("task: olmo2kit_tiny_mc", "task: greedy_mc")
    (tmp_path / "greedy_mc.yaml").write_text(config + "num_fewshot: 100\n")
    with pytest.raises(Olmo2KitError, match="the task's own few-shot count is more examples than greedy_mc has to "
                                            "draw them from: give a smaller --num-fewshot"):
        evaluate_tasks(*tiny, "greedy_mc", include_path=tmp_path, limit=2)
    assert {s.samples for s in evaluate_tasks(*tiny, "greedy_mc", include_path=tmp_path, limit=2, num_fewshot=2)} \
        == {2}


def test_a_builtin_task_offline_says_it_needs_its_dataset(tiny, offline):
    with pytest.raises(Olmo2KitError) as e:
        evaluate_tasks(*tiny, "arc_easy", limit=2)
    message = str(e.value)
    assert message.startswith("arc_easy: an lm-eval task needs its dataset, which cannot be downloaded "
                              "(HF_HUB_OFFLINE is set: Couldn't reach 'allenai/ai2_arc' on the Hub")
    assert message.endswith("; tasks from --include-path with local data run offline")


def test_cli_eval_of_a_builtin_task_offline_is_one_line(cli, tiny_path, offline):
    code, out, err = cli("eval", "--model", str(tiny_path), "--device", "cpu", "--tasks", "hellaswag", "--limit", "2")
    one_error(code, out, err, "hellaswag: an lm-eval task needs its dataset, which cannot be downloaded")
