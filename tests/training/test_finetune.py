"""finetune on tiny checkpoints: learning, masking, resume after a kill, LoRA/QLoRA, two processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import OLMO2KIT, one_line_error, run_olmo2kit
from hub import REPO
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import write_json_atomic
from olmo2kit.model.loading import load
from olmo2kit.training.data import prepare_data
from olmo2kit.training.finetune import FinetuneConfig, finetune, load_config
from olmo2kit.training.loop import learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")  # module by module, from conftest.py

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"
QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("Write a short poem about the sea.", "The sea is wide, the sea is deep."),
      ("Say hello.", "Hello, world!"),
      ("Count to five.", "1 2 3 4 5")]


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (QA * n)[:n]]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_instruct_path) -> Path:
    """Eight prepared chat rows of 64 tokens for the tiny instruct checkpoint."""
    root = tmp_path_factory.mktemp("ft-data")
    source = root / "chats.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in chats(8)))
    prepare_data(source, root / "data", model=str(tiny_instruct_path), seq_len=64)
    return root / "data"


def run(data, output, model, **options):
    return finetune(FinetuneConfig(data=str(data), output=str(output), model=str(model), device="cpu", **options))


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def weights(path: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(path / name)


def random_adapter(base: Path, output: Path) -> Path:
    """A LoRA adapter on `base` saved as `finetune --lora` saves one, its B matrices random (peft starts them at 0,
    a no-op): a model that differs from its base."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(str(base), dtype="fp32", device="cpu")
    torch.manual_seed(3)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                               init_lora_weights=False))
    adapted.save_pretrained(output, save_embedding_layers=False)
    tokenizer.save_pretrained(output)
    return output


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=key)


def test_learning_rate_warms_up_then_decays():
    rates = [learning_rate(s, 10, 1.0, 0.2) for s in range(10)]
    assert rates[:2] == [0.5, 1.0] and rates[2] == 1.0 and rates[-1] == pytest.approx(1 / 8)
    assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False))


def test_overfitting_a_few_chats_drives_the_loss_down(cli, chat_data, tiny_instruct_path, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli("finetune", "--config", str(CONFIGS / "tiny-demo.yaml"), "--model", str(tiny_instruct_path),
                            "--data", str(chat_data), "--output", str(out), "--max-steps", "30", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    log = read_log(out)
    assert [entry["step"] for entry in log] == list(range(1, 31)) and result["steps"] == 30
    assert all(set(entry) == {"step", "loss", "lr", "tokens"} for entry in log)
    assert all(a["tokens"] < b["tokens"] for a, b in zip(log, log[1:], strict=False))
    first, last = log[0]["loss"], np.mean([entry["loss"] for entry in log[-3:]])
    assert last < 0.5 * first, (first, last)
    assert result["saved"] == "full" and (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-20"]
    # The result is a plain HF checkpoint that olmo2kit generates from, and it learned the answers.
    code, text, _ = cli("generate", "x", "--model", str(out), "-n", "4", "--greedy")
    assert code == 0 and text.strip()
    model, tokenizer = load(str(out), dtype="fp32", device="cpu")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QA[0][0]}], tokenize=False,
                                           add_generation_prompt=True)
    from olmo2kit.inference.generation import generate

    assert generate(model, tokenizer, prompt, do_sample=False, max_new_tokens=12).text.startswith("The capital")


def test_rows_with_nothing_to_learn_change_no_weights(chat_data, tiny_instruct_path, tmp_path):
    # Hand-made data in OLMo's layout (prepare-data drops such rows; OLMo's own files may have them).
    masked = tmp_path / "masked"
    shutil.copytree(chat_data, masked)
    np.zeros((8, 64), dtype=np.bool_).tofile(masked / "label_mask.npy")
    result = run(masked, tmp_path / "out", tiny_instruct_path, max_steps=3, lr=1e-2, weight_decay=0.1)
    assert result.loss is None and all(entry["loss"] is None for entry in read_log(tmp_path / "out"))
    assert_same_weights(weights(tmp_path / "out"), weights(tiny_instruct_path))

    # Beside a labelled row, a masked row changes nothing either: same update as the labelled row alone.
    mixed, alone = tmp_path / "mixed", tmp_path / "alone"
    for path, rows in ((mixed, 2), (alone, 1)):
        shutil.copytree(chat_data, path)
        ids = np.fromfile(chat_data / "input_ids.npy", dtype=np.uint32).reshape(8, 64)[:rows]
        mask = np.fromfile(chat_data / "label_mask.npy", dtype=np.bool_).reshape(8, 64)[:rows].copy()
        mask[1:] = False
        ids.tofile(path / "input_ids.npy")
        mask.tofile(path / "label_mask.npy")
        manifest = json.loads((path / "manifest.json").read_text())
        write_json_atomic(path / "manifest.json", {**manifest, "rows": rows})
    run(mixed, tmp_path / "out-mixed", tiny_instruct_path, max_steps=1, lr=1e-2, batch_size=2)
    run(alone, tmp_path / "out-alone", tiny_instruct_path, max_steps=1, lr=1e-2, batch_size=1)
    assert_same_weights(weights(tmp_path / "out-mixed"), weights(tmp_path / "out-alone"), atol=1e-6)
    assert not torch.equal(weights(tmp_path / "out-alone")["lm_head.weight"],
                           weights(tiny_instruct_path)["lm_head.weight"])


def test_lora_resume_reaches_the_same_weights_and_log(chat_data, tiny_instruct_path, tmp_path):
    # LoRA dropout draws random numbers, so this also checks that the RNG state comes back.
    options = dict(lora=True, lora_dropout=0.2, max_steps=8, lr=5e-3, batch_size=2, save_every=3,
                   keep_checkpoints=5)
    whole = tmp_path / "whole"
    run(chat_data, whole, tiny_instruct_path, **options)
    cut = tmp_path / "cut"
    run(chat_data, cut, tiny_instruct_path, **options)
    # Make `cut` look killed after step 4: checkpoint 3 is the last whole one, the log runs on to a torn line.
    for name in ("adapter_model.safetensors", "adapter_config.json", "finetune.json"):
        (cut / name).unlink()
    shutil.rmtree(cut / "checkpoints" / "step-6")
    log_lines = (cut / "train_log.jsonl").read_text().splitlines(keepends=True)
    (cut / "train_log.jsonl").write_text("".join(log_lines[:4]) + log_lines[4][:10])
    (cut / "checkpoints" / ".step-6.tmp").mkdir()  # a checkpoint the kill interrupted

    result = run(chat_data, cut, tiny_instruct_path, resume=True, **options)
    assert result.steps == 8
    assert_same_weights(weights(cut, "adapter_model.safetensors"), weights(whole, "adapter_model.safetensors"),
                        atol=1e-6)
    assert [e["step"] for e in read_log(cut)] == list(range(1, 9))
    assert [e["loss"] for e in read_log(cut)] == pytest.approx([e["loss"] for e in read_log(whole)], rel=1e-5)
    # A finished run resumed again has nothing left to do.
    assert run(chat_data, cut, tiny_instruct_path, resume=True, **options).steps == 8


def kill_after_step_8_then_resume(args: list[str], out: Path) -> subprocess.CompletedProcess:
    """`olmo2kit *args --output out` killed by SIGKILL once its step-8 checkpoint exists, then run again with
    --resume to the end (exit 0 asserted)."""
    process = subprocess.Popen([str(OLMO2KIT), *args, "--output", str(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-8").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "finetune.json").exists()  # killed mid-run
    resumed = run_olmo2kit(*args, "--output", str(out), "--resume", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    return resumed


def test_sigkill_then_resume_equals_an_uninterrupted_run(chat_data, tiny_instruct_path, tmp_path):
    args = ["finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--max-steps", "120",
            "--lr", "1e-3", "--batch-size", "2", "--save-every", "4", "--device", "cpu"]
    out = tmp_path / "killed"
    kill_after_step_8_then_resume(args, out)
    reference = tmp_path / "reference"
    run(chat_data, reference, tiny_instruct_path, max_steps=120, lr=1e-3, batch_size=2)
    assert_same_weights(weights(out), weights(reference), atol=1e-6)
    assert [e["step"] for e in read_log(out)] == list(range(1, 121))


def test_lora_adapter_loads_on_its_base(cli, chat_data, tiny_instruct_path, tmp_path):
    out = tmp_path / "lora"
    result = run(chat_data, out, tiny_instruct_path, lora=True, max_steps=6, lr=1e-2, batch_size=2)
    assert result.saved == "adapter" and not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == tiny_instruct_path
    assert any(v.abs().sum() > 0 for k, v in weights(out, "adapter_model.safetensors").items() if "lora_B" in k)
    code, _, err = cli("generate", "x", "--model", str(out), "-n", "3", "--greedy")
    assert code == 0, err
    tuned, _ = load(str(out), dtype="fp32", device="cpu")
    base, tokenizer = load(str(tiny_instruct_path), dtype="fp32", device="cpu")
    ids = tokenizer("The capital of France", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, base(input_ids=ids).logits)


def test_from_a_lora_adapter_trains_its_merged_model(cli, chat_data, tiny_instruct_path, tmp_path):
    """A LoRA adapter directory starts a full fine-tune as its merged model would; --lora on it is refused (the new
    adapter would need the merged model on disk as its base)."""
    from olmo2kit.training.finetune import merge_adapter

    adapter = random_adapter(tiny_instruct_path, tmp_path / "adapter")
    merged = merge_adapter(adapter, tmp_path / "merged", device="cpu")
    out, reference = tmp_path / "from-adapter", tmp_path / "from-merged"
    assert run(chat_data, out, adapter, max_steps=2, lr=1e-3, batch_size=2).saved == "full"
    run(chat_data, reference, merged, max_steps=2, lr=1e-3, batch_size=2)
    assert [e["loss"] for e in read_log(out)] == pytest.approx([e["loss"] for e in read_log(reference)], abs=1e-6)
    assert_same_weights(weights(out), weights(reference), atol=1e-6)
    code, text, err = cli("generate", "x", "--model", str(out), "-n", "3", "--greedy")
    assert code == 0 and text.strip(), err
    code, _, err = cli("finetune", "--lora", "--model", str(adapter), "--data", str(chat_data), "--output",
                       str(tmp_path / "lora"), "--device", "cpu")
    assert "is a LoRA adapter: merge it into its base first (`olmo2kit merge" in one_line_error(code, err)


def test_qlora_nf4_trains_and_merges(chat_data, tiny_instruct_path, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    result = run(chat_data, out, tiny_instruct_path, lora=True, quantize="nf4", merge=True, max_steps=6, lr=1e-2,
                 batch_size=2, gradient_checkpointing=True)
    log = read_log(out)
    assert result.saved == "merged" and log[-1]["loss"] < log[0]["loss"]
    assert (out / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    merged, tokenizer = load(str(out), dtype="fp32", device="cpu")
    adapted, _ = load(str(out / "adapter"), dtype="fp32", device="cpu")  # the adapter on the unquantized base
    ids = tokenizer("The sea is wide", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_two_processes_match_one_with_accumulation(chat_data, tiny_instruct_path, tmp_path):
    def on_two_processes(out: Path, *options: str) -> subprocess.CompletedProcess:
        completed = subprocess.run(
            [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", str(OLMO2KIT),
             "finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--output", str(out),
             "--max-steps", "4", "--lr", "1e-3", "--batch-size", "1", "--save-every", "2", "--device", "cpu", "--json",
             *options],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        return completed

    out = tmp_path / "ddp"
    completed = on_two_processes(out)
    assert json.loads(completed.stdout)["steps"] == 4  # printed once, by the first process
    assert json.loads((out / "finetune.json").read_text())["processes"] == 2
    # Each process writes its part of the checkpoint (DCP), the first one its metadata and state.json.
    assert sorted(p.name for p in (out / "checkpoints" / "step-2").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt", "state.json"]
    # The same global batch on one process, in two micro-batches, takes the same steps.
    single = tmp_path / "single"
    run(chat_data, single, tiny_instruct_path, max_steps=4, lr=1e-3, batch_size=1, grad_accum=2)
    assert [e["loss"] for e in read_log(out)] == pytest.approx([e["loss"] for e in read_log(single)], rel=1e-5)
    assert_same_weights(weights(out), weights(single), atol=1e-5)
    model, _ = load(str(out), dtype="fp32", device="cpu")
    assert not model.training
    # DDP's checkpoint of step 2 resumes on two processes: the same steps 3 and 4, the same weights.
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    for name in ("finetune.json", "model.safetensors"):
        (cut / name).unlink()
    assert "resuming from" in on_two_processes(cut, "--resume").stderr
    assert [e["loss"] for e in read_log(cut)] == pytest.approx([e["loss"] for e in read_log(out)], rel=1e-5)
    assert_same_weights(weights(cut), weights(out), atol=1e-6)


def test_from_a_hub_revision_starts_a_fresh_optimizer(cli, hub, hub_env, tmp_path, tiny_instruct_path):
    model = f"{REPO}@stage1-step1000-tokens3B"
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in chats(4)))
    code, _, err = cli("prepare-data", str(source), str(tmp_path / "data"), "--model", model, "--seq-len", "64")
    assert code == 0, err
    code, _, err = cli("finetune", "--model", model, "--data", str(tmp_path / "data"), "--output",
                       str(tmp_path / "out"), "--lora", "--max-steps", "2", "--batch-size", "2", "--device", "cpu")
    assert code == 0, err
    assert "Hub checkpoints hold weights only, so the optimizer starts fresh" in err
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (REPO, "stage1-step1000-tokens3B")
    tuned, _ = load(str(tmp_path / "out"), dtype="fp32", device="cpu")
    seed1 = weights(tiny_instruct_path)["model.embed_tokens.weight"]  # that revision holds the seed-1 weights
    assert torch.equal(tuned.get_base_model().model.embed_tokens.weight, seed1)


def test_recipes_are_valid():
    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in recipes} >= {"olmo2-1b-sft.yaml", "olmo2-7b-qlora.yaml", "tiny-demo.yaml"}
    for recipe in recipes:
        FinetuneConfig(data="d", output="o", **load_config(recipe))
    qlora = load_config(CONFIGS / "olmo2-7b-qlora.yaml")
    assert (qlora["model"], qlora["lora"], qlora["quantize"], qlora["lr"]) == ("7b", True, "nf4", 2e-4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "nf4"], "quantized weights cannot be trained directly: add --lora"),
        (["--merge"], "--merge merges a LoRA adapter"),
        (["--epochs", "1", "--max-steps", "3"], "give --epochs or --max-steps, not both"),
        (["--batch-size", "0"], "batch_size must be positive"),
        (["--batch-size", "5", "--grad-accum", "2"], "fewer than one global batch of 10"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--seq-len", "1"], "seq_len must be at least 2, got 1"),
        (["--mixed-precision"], "--mixed-precision is FSDP2's bf16 policy: add --fsdp"),
        (["--fsdp", "--mixed-precision", "--lora"], "--mixed-precision is for a full fine-tune: with --lora"),
    ],
)
def test_bad_options_fail_in_one_line(cli, chat_data, tiny_instruct_path, tmp_path, extra, message):
    code, _, err = cli("finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--output",
                       str(tmp_path / "out"), *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_output_and_resume_errors(cli, chat_data, tiny_instruct_path, tmp_path):
    base = ["finetune", "--model", str(tiny_instruct_path), "--data", str(chat_data), "--device", "cpu"]
    code, _, err = cli(*base[:3], "--data", str(tmp_path), "--output", str(tmp_path / "o"))
    assert code == 2 and "is not prepared data" in err and "olmo2kit prepare-data" in err
    code, _, err = cli(*base, "--output", str(tiny_instruct_path))
    assert code == 2 and "is not empty" in err
    code, _, err = cli(*base, "--output", str(chat_data / "manifest.json"))
    assert code == 2 and err.endswith(f"error: {chat_data / 'manifest.json'} is a file, not a directory: "
                                      "give a directory to write to\n")
    out = tmp_path / "out"
    options = ["--output", str(out), "--max-steps", "4", "--save-every", "2", "--batch-size", "2"]
    assert cli(*base, *options)[0] == 0
    (out / "finetune.json").unlink()  # as if it was killed before the end
    code, _, err = cli(*base, *options)
    assert code == 2 and "add --resume to continue it" in err
    code, _, err = cli(*base, *options, "--resume", "--seed", "1")
    assert code == 2 and "is from a different run (seed: 0 then, 1 now)" in err
    code, _, err = cli(*base[:3], "--output", "x", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "no such config file" in err
    (tmp_path / "bad.yaml").write_text("learning_rate: 1e-4\n")
    code, _, err = cli(*base, "--output", "x", "--config", str(tmp_path / "bad.yaml"))
    assert code == 2 and "unknown key(s) learning_rate" in err


def test_config_values_are_coerced_and_checked(tmp_path):
    (tmp_path / "r.yaml").write_text("lr: 1e-4\nlora: true\nbatch_size: 2\n")
    assert load_config(tmp_path / "r.yaml") == {"lr": 1e-4, "lora": True, "batch_size": 2}
    (tmp_path / "r.yaml").write_text("batch_size: two\n")
    with pytest.raises(Olmo2KitError, match="batch_size must be int, got 'two'"):
        load_config(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("epochs: 2.5\n")  # not cut to 2 behind the user's back
    with pytest.raises(Olmo2KitError, match="epochs must be int, got 2.5"):
        load_config(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("epochs: 2.0\n")
    assert load_config(tmp_path / "r.yaml") == {"epochs": 2}


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_config_takes_every_device_spelling(device):
    assert FinetuneConfig(data="d", output="o", device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU"])
def test_config_refuses_unknown_devices(device):
    with pytest.raises(Olmo2KitError, match=f"unknown device '{device}'"):
        FinetuneConfig(data="d", output="o", device=device)


def test_config_optional_and_string_fields(tmp_path):
    # PyYAML reads 2e-5 (no dot) as a string; epochs and seq_len may be null; model stays a string.
    (tmp_path / "r.yaml").write_text("lr: 2e-5\nepochs: 2\nseq_len: null\nlora: true\nmodel: 1b\n")
    values = load_config(tmp_path / "r.yaml")
    assert values == {"lr": 2e-5, "epochs": 2, "seq_len": None, "lora": True, "model": "1b"}
    assert type(values["lr"]) is float and type(values["epochs"]) is int
    (tmp_path / "r.yaml").write_text("epochs: two\n")
    with pytest.raises(Olmo2KitError, match="epochs must be int, got 'two'"):
        load_config(tmp_path / "r.yaml")
