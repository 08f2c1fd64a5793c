"""Perplexity against transformers' own loss, the lm-eval path on a local task, and the published scores.

All on the tiny checkpoint, offline; lm-eval runs for real on tests/evals/lm_eval_tasks/olmo2kit_tiny_mc."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.perplexity import PerplexityResult, combine_perplexities, perplexity
from olmo2kit.evals.scores import published_scores
from olmo2kit.evals.tasks import evaluate_tasks
from olmo2kit.model.loading import load

TASKS = Path(__file__).with_name("lm_eval_tasks")
TEXT = "Language modeling is the task of predicting the next word in a sequence of text. Ünïcödé: 東京."
LONG = (
    "OLMo 2 is a family of fully open language models trained on trillions of tokens. "
    "A transformer reads a sequence of tokens and computes attention between every pair of positions. "
)


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The text's tokens after the beginning-of-text token, as olmo2kit scores them."""
    return torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]])


# Perplexity


def test_one_window_equals_transformers_loss(tiny):
    model, tokenizer = tiny
    ids = token_ids(tokenizer, TEXT)
    with torch.no_grad():
        mean_nll = model(input_ids=ids, labels=ids).loss.item()  # transformers' own shift-and-mean
    result = perplexity(model, tokenizer, TEXT)
    assert isinstance(result, PerplexityResult)
    assert result.windows == 1
    assert result.tokens == ids.shape[1] - 1  # every token of the text, none of the prefix
    assert result.perplexity == pytest.approx(math.exp(mean_nll), rel=1e-4)
    assert result.nll == pytest.approx(mean_nll * result.tokens, rel=1e-4)
    assert result.bytes == len(TEXT.encode("utf-8")) > len(TEXT)
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / result.bytes)


def test_stride_does_not_change_a_text_that_fits_one_window(tiny):
    model, tokenizer = tiny
    results = [perplexity(model, tokenizer, TEXT, stride=s) for s in (1, 5, 100, 1023)]
    assert {r.windows for r in results} == {1}
    assert len({r.perplexity for r in results}) == 1


@pytest.mark.parametrize("max_length, stride", [(8, 1), (8, 3), (8, 7), (16, 5)])
def test_each_token_is_scored_once_with_its_window_as_context(tiny, max_length, stride):
    """Against a direct per-token computation: token p is predicted from the window that first reaches it."""
    model, tokenizer = tiny
    ids = token_ids(tokenizer, LONG)
    length = ids.shape[1]
    expected = 0.0
    with torch.no_grad():
        for p in range(1, length):
            begin = max(0, math.ceil((p + 1 - max_length) / stride)) * stride
            logits = model(input_ids=ids[:, begin:p]).logits[0, -1]
            expected -= torch.log_softmax(logits, -1)[ids[0, p]].item()
    result = perplexity(model, tokenizer, LONG, max_length=max_length, stride=stride)
    assert result.tokens == length - 1
    assert result.windows == math.ceil((length - max_length) / stride) + 1
    assert result.nll == pytest.approx(expected, rel=1e-4)


def test_a_list_gives_one_result_per_text_and_they_pool(tiny):
    model, tokenizer = tiny
    results = perplexity(model, tokenizer, [TEXT, LONG])
    assert [r.tokens for r in results] == [perplexity(model, tokenizer, t).tokens for t in (TEXT, LONG)]
    pooled = combine_perplexities(results)
    assert pooled.tokens == sum(r.tokens for r in results)
    assert pooled.perplexity == pytest.approx(math.exp(sum(r.nll for r in results) / pooled.tokens))
    assert min(r.perplexity for r in results) < pooled.perplexity < max(r.perplexity for r in results)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stride=0), "--stride must be 1 or more, not 0"),
        (dict(max_length=16, stride=16), "--stride must be less than --max-length \\(16\\), not 16"),
        (dict(max_length=1), "--max-length must be 2 or more"),
        (dict(max_length=1025), "at most 1024, the model's context, not 1025"),
    ],
)
def test_bad_windows(tiny, kwargs, message):
    model, tokenizer = tiny
    with pytest.raises(Olmo2KitError, match=message):
        perplexity(model, tokenizer, TEXT, **kwargs)


def test_empty_text(tiny):
    with pytest.raises(Olmo2KitError, match="text 2 is empty"):
        perplexity(*tiny, [TEXT, ""])


@pytest.mark.parametrize("how, tolerance", [(dict(dtype="bf16"), 0.02), (dict(quantize="int8"), 0.05)])
def test_other_dtypes_and_quantization_stay_close(tiny, tiny_path, how, tolerance):
    reference = perplexity(*tiny, LONG).perplexity
    model, tokenizer = load(str(tiny_path), device="cpu", **{"dtype": "fp32", **how})
    assert perplexity(model, tokenizer, LONG).perplexity == pytest.approx(reference, rel=tolerance)


def test_cli_perplexity(cli, tiny, tiny_path, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text(LONG, encoding="utf-8")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    code, out, err = cli("perplexity", *files, "--model", str(tiny_path), "--device", "cpu", "--dtype", "fp32",
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    expected = perplexity(model, tokenizer, [TEXT, LONG])
    assert [row["file"] for row in report["files"]] == files
    for row, want in zip(report["files"], expected, strict=True):
        assert row["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
        assert row["tokens"] == want.tokens
    assert report["total"]["perplexity"] == pytest.approx(combine_perplexities(expected).perplexity, rel=1e-6)
    assert "tokens/s" in err

    code, out, err = cli("perplexity", files[1], "--model", str(tiny_path), "--device", "cpu", "--dtype", "fp32",
                         "--max-length", "8", "--stride", "3")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["file", "tokens", "bytes", "perplexity", "bits/byte"]
    windowed = perplexity(model, tokenizer, LONG, max_length=8, stride=3)
    assert row.split()[3] == f"{windowed.perplexity:.4f}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "no such file: missing.txt"),
        (["empty.txt"], "empty.txt is empty"),
        (["latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["a.txt", "--stride", "0"], "--stride must be 1 or more"),
        (["a.txt", "--max-length", "8", "--stride", "8"], "--stride must be less than --max-length (8), not 8"),
    ],
)
def test_cli_perplexity_bad_input_is_one_line_before_loading(cli, tiny_path, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text(TEXT)
    Path("empty.txt").write_text("\n")
    Path("latin1.txt").write_bytes("café".encode("latin-1"))
    code, out, err = cli("perplexity", *args, "--model", str(tiny_path), "--device", "cpu")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "loaded" not in err


# lm-eval, on the local multiple-choice task


def direct_choice_scores(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm of the local task, computed with the model directly as lm-eval defines them:
    the log-likelihood of " " + choice after the question, split where the question's tokens end;
    acc_norm divides it by the choice's length in characters."""
    rows = [json.loads(line) for line in (TASKS / "olmo2kit_tiny_mc.jsonl").read_text().splitlines()]
    right = right_norm = 0
    for row in rows:
        context = tokenizer(row["question"]).input_ids
        likelihoods = []
        for choice in row["choices"]:
            whole = tokenizer(row["question"] + " " + choice).input_ids
            continuation = whole[len(context):]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, -len(continuation):]
            logprobs = torch.log_softmax(logits, -1)
            likelihoods.append(sum(logprobs[i, t].item() for i, t in enumerate(continuation)))
        right += max(range(len(likelihoods)), key=likelihoods.__getitem__) == row["answer"]
        normed = [ll / len(c) for ll, c in zip(likelihoods, row["choices"], strict=True)]
        right_norm += max(range(len(normed)), key=normed.__getitem__) == row["answer"]
    return right / len(rows), right_norm / len(rows)


def test_lm_eval_scores_the_loaded_model_on_a_local_task(tiny, offline_hub, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = tiny
    scores = evaluate_tasks(model, tokenizer, "olmo2kit_tiny_mc", include_path=TASKS, batch_size=4)
    by_metric = {s.metric: s for s in scores}
    assert sorted(by_metric) == ["acc", "acc_norm"]
    acc, acc_norm = direct_choice_scores(model, tokenizer)
    assert by_metric["acc"].value == pytest.approx(acc)
    assert by_metric["acc_norm"].value == pytest.approx(acc_norm)
    assert {(s.task, s.filter, s.samples) for s in scores} == {("olmo2kit_tiny_mc", "none", 8)}
    assert tokenizer.padding_side == "left"  # still ready for batched generation

    limited = evaluate_tasks(model, tokenizer, ["olmo2kit_tiny_mc"], include_path=TASKS, limit=3)
    assert {s.samples for s in limited} == {3}


def test_cli_eval_json_and_table(cli, tiny_path, offline_hub, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["--model", str(tiny_path), "--device", "cpu", "--tasks", "olmo2kit_tiny_mc", "--include-path", str(TASKS)]
    code, out, err = cli("eval", *args, "--limit", "4", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == str(tiny_path)
    assert [(s["metric"], s["samples"]) for s in report["scores"]] == [("acc", 4), ("acc_norm", 4)]
    assert all(0 <= s["value"] <= 1 for s in report["scores"])
    code, out, err = cli("eval", *args, "--limit", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr", "samples"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["olmo2kit_tiny_mc", s["metric"], f"{s['value']:.4f}"] for s in report["scores"]
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", " , "], "no tasks given"),
        (["--tasks", "olmo2kit_tiny_mc", "--limit", "0"], "--limit must be 1 or more"),
        (["--tasks", "olmo2kit_tiny_mc", "--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
        (["--tasks", "olmo2kit_tiny_mc", "--include-path", "no-such-dir"], "is not a directory of lm-eval task"),
    ],
)
def test_cli_eval_bad_input_is_one_line_before_loading(cli, tiny_path, args, message):
    code, out, err = cli("eval", "--model", str(tiny_path), "--include-path", str(TASKS), *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err


def test_chat_template_needs_one(tiny):
    with pytest.raises(Olmo2KitError, match="has no chat template; use an instruct model"):
        evaluate_tasks(*tiny, "olmo2kit_tiny_mc", include_path=TASKS, chat_template=True)


def test_unknown_task_suggests_the_nearest(tiny):
    with pytest.raises(Olmo2KitError, match="no lm-eval task 'olmo2kit_tiny_mcq': did you mean olmo2kit_tiny_mc\\?"):
        evaluate_tasks(*tiny, "olmo2kit_tiny_mcq", include_path=TASKS)


# Published scores


def test_published_scores_are_the_model_cards_table():
    table = published_scores()
    assert table["source"] == "https://huggingface.co/allenai/OLMo-2-0425-1B"
    columns = table["columns"]
    assert columns == ["Avg", "FLOP×10²³", "AE2", "BBH", "DROP", "GSM8K", "IFE", "MATH", "MMLU", "Safety", "PQA", "TQA"]
    assert [row["model"] for row in table["rows"]] == [
        "GPT-3.5 Turbo 0125", "GPT 4o Mini 0724", "SmolLM2 1.7B", "Gemma 3 1B", "Llama 3.1 1B", "Qwen 2.5 1.5B",
        "OLMo 1B 0724", "OLMo 2 1B",
    ]
    for row in table["rows"]:
        assert list(row["scores"]) == columns
        benchmarks = [row["scores"][c] for c in columns[2:]]
        # The card's average is the mean of the ten benchmarks: a typo in any of them shows here.
        assert row["scores"]["Avg"] == pytest.approx(sum(benchmarks) / len(benchmarks), abs=0.051), row["model"]
    olmo2 = table["rows"][-1]["scores"]
    assert (olmo2["GSM8K"], olmo2["MMLU"], olmo2["FLOP×10²³"]) == (68.3, 40.0, 0.35)
    assert [row["scores"]["FLOP×10²³"] for row in table["rows"][:2]] == [None, None]  # n/a for the API models


def test_cli_scores(cli):
    code, out, err = cli("scores")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "Avg", "FLOP×10²³"]
    gpt35 = lines[1].split()
    assert gpt35[:5] == ["GPT-3.5", "Turbo", "0125", "60.5", "n/a"]
    assert lines[8].split() == "OLMo 2 1B 42.7 0.35 9.1 35.0 34.6 68.3 70.1 20.7 40.0 87.6 12.9 48.7".split()
    assert "https://huggingface.co/allenai/OLMo-2-0425-1B" in out
    code, out, err = cli("scores", "--json")
    assert code == 0 and json.loads(out) == published_scores()
