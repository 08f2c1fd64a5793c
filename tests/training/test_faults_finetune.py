"""finetune faults and additions of issue #12: a diverging loss, an adapter's base, two runs on one output,
the LoRA and schedule options, a validation split, `merge`, and a recipe that is not UTF-8."""

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_finetune import read_log, run

from conftest import OLMO2KIT, one_line_error, run_olmo2kit
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.generation import generate
from olmo2kit.model.loading import load
from olmo2kit.training.data import load_prepared, prepare_data
from olmo2kit.training.finetune import FinetuneConfig, load_config, merge_adapter
from olmo2kit.training.loop import DataOrder

pytestmark = pytest.mark.usefixtures("one_thread")  # module by module, from conftest.py

CHATS = [("What is the capital of France?", "The capital of France is Paris."),
         ("Say hello.", "Hello, world!"),
         ("Count to five.", "1 2 3 4 5"),
         ("Write a short poem about the sea.", "The sea is wide, the sea is deep.")]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_instruct_path) -> Path:
    """Eight prepared chat rows of 64 tokens for the tiny instruct checkpoint."""
    root = tmp_path_factory.mktemp("ft-faults")
    source = root / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]}) + "\n"
                              for q, a in CHATS * 2))
    prepare_data(source, root / "data", model=str(tiny_instruct_path), seq_len=64)
    return root / "data"





def finished_like_a_kill_after(output: Path, step: int) -> None:
    """Make a finished run look killed just after checkpoint `step`: no result, no later checkpoint or log line."""
    for item in output.iterdir():
        if item.name in ("checkpoints", "train_log.jsonl", ".olmo2kit.lock"):
            continue
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
    for checkpoint in (output / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    kept = [e for e in read_log(output) if e["step"] <= step]
    (output / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))


# 1. A loss that becomes NaN stops the run; the result is not saved, the last good checkpoint is kept.

def test_a_huge_learning_rate_stops_at_the_first_nan_loss(cli, chat_data, tiny_instruct_path, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli("finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--output", str(out),
                       "--max-steps", "6", "--save-every", "1", "--lr", "1e30", "--batch-size", "2", "--device", "cpu")
    line = one_line_error(code, err)
    assert "the loss became nan at step 2, so training stopped without saving a result" in line
    assert "there is no good checkpoint to keep: lower --lr (now 1e+30) and run again" in line
    assert not (out / "finetune.json").exists() and not (out / "model.safetensors").exists()
    # The checkpoint of step 1 holds the weights that gave the NaN: set aside, where --resume does not look.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1.non-finite"]
    log = read_log(out)
    assert [e["step"] for e in log] == [1] and math.isfinite(log[0]["loss"])
    # Run again with a sane rate: it starts over in the same --output.
    code, _, err = cli("finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--output", str(out),
                       "--max-steps", "3", "--lr", "1e-3", "--batch-size", "2", "--device", "cpu")
    assert code == 0, err
    assert all(v.isfinite().all() for v in load_file(out / "model.safetensors").values())


def test_a_nan_after_resuming_keeps_the_last_good_checkpoint(chat_data, tiny_instruct_path, tmp_path):
    options = dict(max_steps=6, save_every=1, keep_checkpoints=10, batch_size=2)
    out = tmp_path / "out"
    run(chat_data, out, tiny_instruct_path, lr=1e-3, **options)
    finished_like_a_kill_after(out, 2)
    with pytest.raises(Olmo2KitError) as error:  # step 3 trains on good weights and ruins them; step 4 is NaN
        run(chat_data, out, tiny_instruct_path, lr=1e30, resume=True, **options)
    message = str(error.value)
    assert "the loss became nan at step 4" in message
    assert f"the last good checkpoint, {out / 'checkpoints' / 'step-2'}, is kept: lower --lr" in message
    assert not (out / "finetune.json").exists() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3.non-finite"]
    assert [e["step"] for e in read_log(out)] == [1, 2, 3]
    # Resuming from the kept checkpoint with the old rate gives the uninterrupted run.
    result = run(chat_data, out, tiny_instruct_path, lr=1e-3, resume=True, **options)
    reference = run(chat_data, tmp_path / "reference", tiny_instruct_path, lr=1e-3, **options)
    assert result.loss == pytest.approx(reference.loss, rel=1e-5)


# 2. An adapter records its base as an absolute path, so it loads the same base from any directory.

def test_a_lora_adapter_records_its_base_as_an_absolute_path(cli, chat_data, tiny_instruct_path, tiny_path, tmp_path,
                                                              monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_instruct_path, work / "tiny")
    shutil.copytree(tiny_path, elsewhere / "tiny")  # another ./tiny, which the adapter must not pick up
    monkeypatch.chdir(work)
    run(chat_data, "lora", "tiny", lora=True, max_steps=2, lr=1e-2, batch_size=2)
    adapter = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(work.resolve() / "tiny")
    assert json.loads((work / "lora" / "finetune.json").read_text())["base"] == str(work.resolve() / "tiny")

    monkeypatch.chdir(elsewhere)
    code, text, err = cli("generate", "x", "--model", str(work / "lora"), "--dtype", "fp32", "-n", "3", "--greedy")
    assert code == 0 and text.strip(), err
    tuned, _ = load(str(work / "lora"), dtype="fp32", device="cpu")
    embeddings = load_file(tiny_instruct_path / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(tuned.get_base_model().model.embed_tokens.weight, embeddings)


# 3. Two runs on one --output: the second says who holds it.

@pytest.mark.parametrize("lora", [True, False])
def test_resume_after_the_starting_weights_changed(chat_data, tiny_instruct_path, tmp_path, lora):
    """A LoRA run's frozen base comes from the start, so a rewritten start is refused on --resume; a full
    fine-tune's checkpoint holds every weight, so it resumes."""
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_instruct_path, model)
    options = dict(max_steps=2, save_every=1, batch_size=2, lora=lora)
    run(chat_data, out, model, **options)
    (out / "finetune.json").unlink()  # as if killed after checkpoint step-1
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: the same bytes, as far as a stamp can tell other ones
    if lora:
        with pytest.raises(Olmo2KitError, match="^the starting model's weights changed since step-1 was written"):
            run(chat_data, out, model, resume=True, **options)
    else:
        assert run(chat_data, out, model, resume=True, **options).steps == 2


def test_a_second_run_on_the_same_output_is_refused(chat_data, tiny_instruct_path, tmp_path):
    out = tmp_path / "out"
    args = ["finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--output", str(out),
            "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr = tmp_path / "first.err"
    with open(stderr, "wb") as sink:
        first = subprocess.Popen([str(OLMO2KIT), *args, "--max-steps", "100000"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_log.jsonl").exists() or not (out / "train_log.jsonl").read_text():
            assert first.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = run_olmo2kit(*args, "--max-steps", "2", env={"OMP_NUM_THREADS": "1"})
        line = one_line_error(second.returncode, second.stderr)
        assert f"{out} is in use by another olmo2kit run (pid {first.pid} on " in line
        assert "wait for it to end, or give another --output" in line
        assert first.poll() is None  # the first run trains on
    finally:
        first.kill()
        first.wait()
    assert not (out / "finetune.json").exists()
    assert [e["step"] for e in read_log(out)] == list(range(1, len(read_log(out)) + 1))


# 4. The LoRA and schedule settings on the command line.

def test_lora_and_schedule_options_on_the_command_line(cli, chat_data, tiny_instruct_path, tmp_path):
    out = tmp_path / "out"
    recipe = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "tiny-demo.yaml"  # warmup: 0.0
    code, _, err = cli("finetune", "--config", str(recipe), "--model", str(tiny_instruct_path), "--data",
                       str(chat_data), "--output", str(out), "--max-steps", "4", "--lr", "1e-3", "--lora",
                       "--lora-r", "4", "--lora-alpha", "8", "--warmup", "0.5", "--weight-decay", "0.1")
    assert code == 0, err
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert [e["lr"] for e in read_log(out)] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    config = json.loads((out / "finetune.json").read_text())["config"]
    assert (config["lora_r"], config["lora_alpha"], config["warmup"], config["weight_decay"]) == (4, 8, 0.5, 0.1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-r", "0"], "lora_r must be positive, got 0"),
        (["--warmup", "1.5"], "warmup is a fraction of the steps, in [0, 1); got 1.5"),
        (["--weight-decay", "-1"], "weight_decay must be 0 or more"),
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
        (["--val-fraction", "1"], "val_fraction is a share of the rows, in [0, 1); got 1.0"),
        (["--eval-every", "2"], "--eval-every evaluates the validation split: add --val-fraction"),
        (["--val-fraction", "0.9"], "the data has 8 rows (7 held out for validation), fewer than one global batch"),
    ],
)
def test_bad_new_options_fail_in_one_line(cli, chat_data, tiny_instruct_path, tmp_path, extra, message):
    code, _, err = cli("finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--output",
                       str(tmp_path / "out"), "--batch-size", "2", *extra)
    assert message in one_line_error(code, err)
    assert not (tmp_path / "out").exists()


# 5. A validation split: held out of training, evaluated with the training loss, logged and reported.

def test_held_out_rows_are_in_no_training_batch():
    order = DataOrder(20, 3, seed=5, val_fraction=0.2)
    assert len(order.val_rows) == 4 and order.steps_per_epoch == 5
    trained = np.concatenate([order.batch(step) for step in range(50)])
    assert not set(trained) & set(order.val_rows)
    assert set(trained) == set(range(20)) - set(order.val_rows)
    assert np.array_equal(DataOrder(20, 3, seed=5, val_fraction=0.2).val_rows, order.val_rows)  # seeded
    assert not np.array_equal(DataOrder(20, 3, seed=6, val_fraction=0.2).val_rows, order.val_rows)
    # Without a split, the order is the one earlier runs (and their checkpoints) used.
    assert np.array_equal(DataOrder(20, 3, seed=5).batch(0), np.random.default_rng([5, 0]).permutation(20)[:3])


def test_validation_loss_is_logged_and_reported(chat_data, tiny_instruct_path, tmp_path):
    out = tmp_path / "out"
    result = run(chat_data, out, tiny_instruct_path, max_steps=5, val_fraction=0.25, eval_every=2, batch_size=2,
                 lr=1e-3)
    evals = [e for e in read_log(out) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 5]  # every 2 steps, and at the end
    assert all(set(e) == {"step", "eval_loss"} and math.isfinite(e["eval_loss"]) for e in evals)
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]
    assert result.eval_loss == evals[-1]["eval_loss"]
    assert json.loads((out / "finetune.json").read_text())["result"]["eval_loss"] == result.eval_loss
    # The same loss as training: the mean over the labelled tokens of the held-out rows, as transformers computes it.
    data = load_prepared(chat_data)
    rows = DataOrder(data.rows, 2, seed=0, val_fraction=0.25).val_rows
    ids = torch.from_numpy(data.input_ids[rows].astype(np.int64))
    labels = ids.masked_fill(~torch.from_numpy(data.label_mask[rows].copy()), -100)
    model, _ = load(str(out), dtype="fp32", device="cpu")
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(result.eval_loss, rel=1e-5)


def test_resuming_with_a_validation_split_logs_as_an_uninterrupted_run(chat_data, tiny_instruct_path, tmp_path):
    options = dict(max_steps=6, val_fraction=0.25, eval_every=2, save_every=3, batch_size=2, lr=1e-3)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(chat_data, whole, tiny_instruct_path, **options)
    run(chat_data, cut, tiny_instruct_path, **options)
    finished_like_a_kill_after(cut, 3)
    with open(cut / "train_log.jsonl", "a") as log:  # lines of steps 4 and 5, logged before the kill
        log.write("".join(json.dumps(e) + "\n" for e in read_log(whole) if e["step"] in (4, 5)))
    with pytest.raises(Olmo2KitError, match=r"different run \(val_fraction: 0.25 then, 0.0 now\)"):
        run(chat_data, cut, tiny_instruct_path, **{**options, "val_fraction": 0.0, "eval_every": None}, resume=True)
    result = run(chat_data, cut, tiny_instruct_path, resume=True, **options)
    assert [(e["step"], set(e)) for e in read_log(cut)] == [(e["step"], set(e)) for e in read_log(whole)]
    values = [e.get("loss", e.get("eval_loss")) for e in read_log(cut)]
    assert values == pytest.approx([e.get("loss", e.get("eval_loss")) for e in read_log(whole)], rel=1e-5)
    assert result.eval_loss == pytest.approx(read_log(whole)[-1]["eval_loss"], rel=1e-5)


# 6. `olmo2kit merge ADAPTER OUT`.

def test_merge_writes_a_model_that_generates_as_the_adapter(cli, chat_data, tiny_instruct_path, tmp_path):
    adapter = tmp_path / "lora"
    run(chat_data, adapter, tiny_instruct_path, lora=True, max_steps=4, lr=2e-2, batch_size=2)
    merged_dir = tmp_path / "models" / "merged"
    code, out, err = cli("merge", str(adapter), str(merged_dir), "--device", "cpu")
    assert code == 0, err
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    assert sorted(p.name for p in merged_dir.parent.iterdir()) == ["merged"]  # no staging left beside it

    merged, tokenizer = load(str(merged_dir), dtype="fp32", device="cpu")
    adapted, _ = load(str(adapter), dtype="fp32", device="cpu")
    base, _ = load(str(tiny_instruct_path), dtype="fp32", device="cpu")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": CHATS[0][0]}], tokenize=False,
                                           add_generation_prompt=True)
    texts = [generate(m, tokenizer, prompt, do_sample=False, max_new_tokens=16).text for m in (merged, adapted, base)]
    assert texts[0] == texts[1] and texts[0] != texts[2]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge_adapter(adapter, empty, device="cpu") == empty and (empty / "model.safetensors").exists()


def test_merge_refuses_what_it_cannot_do(cli, chat_data, tiny_instruct_path, tmp_path):
    adapter = tmp_path / "lora"
    run(chat_data, adapter, tiny_instruct_path, lora=True, max_steps=1, batch_size=2)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(Olmo2KitError, match="taken already exists: give a new or empty directory"):
        merge_adapter(adapter, taken, device="cpu")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    with pytest.raises(Olmo2KitError, match="holds no LoRA adapter"):
        merge_adapter(tiny_instruct_path, tmp_path / "new", device="cpu")
    code, out, err = cli("merge", str(adapter), str(taken))
    assert (code, out) == (2, "") and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {taken} already exists: give a new or empty directory for the " \
                                           "merged model"
    # A base that cannot load leaves nothing behind.
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/tiny"}))
    with pytest.raises(Olmo2KitError, match="/nowhere/tiny"):
        merge_adapter(adapter, tmp_path / "new", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "taken"]


# 7. A recipe that is not UTF-8, or not keyed by option names.

def test_a_recipe_that_is_not_utf8_is_one_line(cli, chat_data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"lr: 1.0e-3\n# caf\xe9\n")
    code, _, err = cli("finetune", "--config", str(recipe), "--data", str(chat_data), "--output", str(tmp_path / "o"))
    assert f"{recipe} is not UTF-8 text (bad byte at offset 16): save it as UTF-8" in one_line_error(code, err)
    recipe.write_text("1: 2\nlr: 1.0e-3\n")
    code, _, err = cli("finetune", "--config", str(recipe), "--data", str(chat_data), "--output", str(tmp_path / "o"))
    assert "unknown key(s) 1; known: data" in one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_a_recipe_that_nulls_a_required_value_is_one_line(tmp_path):
    """Found by the fuzz test: `lr: null` passed the recipe check and failed in FinetuneConfig with a TypeError."""
    for text, key in (("lr: null\n", "lr"), ("lora: null\n", "lora"), ("batch_size: null\n", "batch_size")):
        (tmp_path / "r.yaml").write_text(text)
        with pytest.raises(Olmo2KitError, match=f"{key} needs a value"):
            load_config(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("epochs: null\nmodel: 1b\n")  # a field that may be None, a string
    assert load_config(tmp_path / "r.yaml") == {"epochs": None, "model": "1b"}


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999, 1.5])
def test_a_seed_out_of_range_is_refused_before_anything_is_written(seed, tmp_path):
    """Found in review: these failed inside numpy or torch, after the output folder was made."""
    with pytest.raises(Olmo2KitError, match="seed must be an integer from 0 to 4294967295"):
        FinetuneConfig(data="d", output=str(tmp_path / "out"), seed=seed)
    assert not (tmp_path / "out").exists()


def test_a_required_text_field_left_empty_needs_a_value(tmp_path):
    """Found in review: `model:` with nothing after it became the model named 'None'."""
    (tmp_path / "r.yaml").write_text("model:\n")
    with pytest.raises(Olmo2KitError, match="model needs a value"):
        load_config(tmp_path / "r.yaml")
