"""finetune --method dpo on tiny preference data: the loss at the start, TRL's DPOTrainer on the same batch, the
margin it learns, the stored reference log-probabilities, kill and --resume, LoRA and QLoRA, two FSDP processes,
and the errors of bad inputs."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_finetune import assert_same_weights, kill_after_step_8_then_resume, random_adapter, read_log, weights

from conftest import OLMO2KIT, one_line_error
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.loading import load
from olmo2kit.training.data import load_preference, prepare_data
from olmo2kit.training.finetune import FinetuneConfig, finetune, load_config
from olmo2kit.training.objectives import DPO, answer_log_probs
from olmo2kit.training.reference import REFERENCE_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # module by module, from conftest.py

PAIRS = [("What is the capital of France?", "The capital of France is Paris.", "I do not know."),
         ("Say hello.", "Hello, world!", "Go away."),
         ("Count to five.", "1 2 3 4 5", "five four three"),
         ("Write a short poem about the sea.", "The sea is wide, the sea is deep.", "No.")]
# Eight optimizer steps of two pairs, a checkpoint every three: what the shared run and its resumed copy take.
WHOLE = dict(max_steps=8, lr=1e-3, batch_size=2, save_every=3, keep_checkpoints=5)


def pair(question: str, good: str, bad: str) -> dict:
    user = {"role": "user", "content": question}
    return {"chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}]}


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, tiny_instruct_path) -> Path:
    """Eight prepared preference pairs of 64 tokens for the tiny instruct checkpoint."""
    root = tmp_path_factory.mktemp("dpo-data")
    source = root / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair(*p)) + "\n" for p in PAIRS * 2))
    prepare_data(source, root / "prefs", model=str(tiny_instruct_path), seq_len=64)
    return root / "prefs"


def dpo(data, output, model, **options):
    return finetune(FinetuneConfig(data=str(data), output=str(output), model=str(model), device="cpu", method="dpo",
                                   **options))


@pytest.fixture(scope="module")
def whole(prefs, tiny_instruct_path, tmp_path_factory) -> Path:
    """A finished sigmoid DPO run (full weights), checkpoints of steps 3 and 6 kept."""
    output = tmp_path_factory.mktemp("dpo") / "whole"
    dpo(prefs, output, tiny_instruct_path, **WHOLE)
    return output


def stored_references(data: Path) -> list[Path]:
    return sorted((data / REFERENCE_DIR).glob("*.safetensors"))


def stored_reference(data: Path, quantize: str | None = None, seq_len: int = 64) -> Path:
    """The one stored reference of the tiny model, as its key (kept in the file's metadata) describes it."""
    from safetensors import safe_open

    found = []
    for path in stored_references(data):
        with safe_open(str(path), framework="np") as f:
            key = json.loads(f.metadata()["key"])
        if (key["quantize"], key["seq_len"]) == (quantize, seq_len):
            found.append(path)
    [path] = found
    return path


def test_starts_at_ln2_and_raises_the_margin(whole):
    log = read_log(whole)
    assert [e["step"] for e in log] == list(range(1, 9))
    assert all(set(e) == {"step", "loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "lr", "tokens"}
               for e in log)
    # The policy is the reference at the first step: every reward is 0 and the loss -log sigmoid(0) = ln 2.
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6
    assert abs(log[0]["margin"]) < 1e-5 and abs(log[0]["chosen_reward"]) < 1e-5
    for e in log:  # each line's figures belong together
        assert e["margin"] == pytest.approx(e["chosen_reward"] - e["rejected_reward"], abs=1e-6)
        assert 0.0 <= e["accuracy"] <= 1.0
    assert np.mean([e["margin"] for e in log[-3:]]) > 0.3
    assert np.mean([e["loss"] for e in log[-3:]]) < 0.6 and log[-1]["accuracy"] == 1.0
    result = json.loads((whole / "finetune.json").read_text())
    assert (result["config"]["method"], result["config"]["beta"], result["config"]["dpo_loss"]) == ("dpo", 0.1,
                                                                                                     "sigmoid")


def trl_dpo(policy, reference, tokenizer, data, index: np.ndarray, beta: float, loss_type: str, tmp_path: Path
            ) -> tuple[float, dict[str, float]]:
    """TRL's DPOTrainer on pairs `index` of `data`: its loss and its logged rewards, from its own forward passes."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # bf16=False: DPOConfig's default runs TRL's reference forward under bf16 autocast, on a CPU too (measured: its
    # reference log-probabilities then differ by 6e-3); olmo2kit autocasts on GPUs only.
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to="none",
                     use_cpu=True, bf16=False, per_device_train_batch_size=len(index), precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    examples = []
    for i in index:  # the same token ids, cut where the prompt ends and after the last labelled token
        chosen, rejected = np.flatnonzero(data.chosen_mask[i]), np.flatnonzero(data.rejected_mask[i])
        start = int(chosen[0])
        assert start == rejected[0] and np.array_equal(data.chosen_ids[i][:start], data.rejected_ids[i][:start])
        examples.append({"prompt_ids": data.chosen_ids[i][:start].tolist(),
                         "chosen_ids": data.chosen_ids[i][start:chosen[-1] + 1].tolist(),
                         "rejected_ids": data.rejected_ids[i][start:rejected[-1] + 1].tolist()})
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    return loss, metrics


@pytest.mark.parametrize("dpo_loss", ["sigmoid", "length-normalized"])
def test_one_batch_equals_trls_dpo_trainer(whole, prefs, tiny_instruct_path, tmp_path, dpo_loss):
    """The policy is the trained run's model, the reference the starting checkpoint: TRL runs both, olmo2kit runs the
    policy against the log-probabilities it stored. TRL's `sigmoid_norm` is the length-normalized loss; its logged
    rewards are beta times the summed log-ratios, so for that loss they are compared pair by pair, divided by the
    answer's tokens (open-instruct's dpo_norm logs the rewards of the averaged log-probabilities)."""
    data = load_preference(prefs)
    path = stored_reference(prefs)
    beta = {"sigmoid": 0.1, "length-normalized": 5.0}[dpo_loss]
    objective = DPO(data, data.seq_len, load_file(path)["log_probs"].numpy(), beta,
                    length_normalized=dpo_loss == "length-normalized")
    policy, tokenizer = load(str(whole), dtype="fp32", device="cpu")
    reference, _ = load(str(tiny_instruct_path), dtype="fp32", device="cpu")
    policy.eval()
    index = np.array([0, 1, 2, 5])
    with torch.no_grad():
        loss, chosen, rejected, margin, accuracy = (objective.sums(policy, index, "cpu") / len(index)).tolist()
    trl_loss, trl = trl_dpo(policy, reference, tokenizer, data, index, beta,
                            {"sigmoid": "sigmoid", "length-normalized": "sigmoid_norm"}[dpo_loss], tmp_path)
    assert loss == pytest.approx(trl_loss, abs=1e-5) and loss < math.log(2) - 0.05  # a trained policy
    if dpo_loss == "sigmoid":
        assert [chosen, rejected, margin, accuracy] == pytest.approx(
            [trl["rewards/chosen"], trl["rewards/rejected"], trl["rewards/margins"], trl["rewards/accuracies"]],
            abs=1e-5)
        return
    for i in index:
        with torch.no_grad():
            _, chosen, rejected, margin, _ = objective.sums(policy, np.array([i]), "cpu").tolist()
        _, trl = trl_dpo(policy, reference, tokenizer, data, np.array([i]), beta, "sigmoid_norm", tmp_path)
        tokens = data.chosen_mask[i].sum(), data.rejected_mask[i].sum()
        assert [chosen, rejected] == pytest.approx([trl["rewards/chosen"] / tokens[0],
                                                    trl["rewards/rejected"] / tokens[1]], abs=1e-5)
        assert margin == pytest.approx(chosen - rejected, abs=1e-6)


def test_the_reference_is_stored_once_and_reused(whole, prefs, tiny_instruct_path, tmp_path):
    path, before = stored_reference(prefs), stored_references(prefs)
    stamp = path.stat().st_mtime_ns
    # Another run from the same model, dtype and length reads them (whatever its loss): the file stays as it was.
    reused = tmp_path / "reused"
    dpo(prefs, reused, tiny_instruct_path, max_steps=1, batch_size=2, dpo_loss="length-normalized")
    assert stored_references(prefs) == before and path.stat().st_mtime_ns == stamp
    assert abs(read_log(reused)[0]["loss"] - math.log(2)) < 1e-6
    # A shorter seq_len is another reference, stored beside it.
    dpo(prefs, tmp_path / "short", tiny_instruct_path, max_steps=1, batch_size=2, seq_len=32)
    assert len(stored_references(prefs)) == len(before) + 1
    assert stored_reference(prefs, seq_len=32) != path


def finished_like_a_kill_after(output: Path, step: int) -> None:
    """Make a finished run look killed just after checkpoint `step`, and while it wrote the next step's log line."""
    for name in ("finetune.json", "model.safetensors", "config.json", "generation_config.json"):
        (output / name).unlink(missing_ok=True)
    for checkpoint in (output / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    lines = (output / "train_log.jsonl").read_text().splitlines(keepends=True)
    (output / "train_log.jsonl").write_text("".join(lines[:step + 1]) + lines[step + 1][:12])


def test_resume_without_the_stored_reference_continues_exactly(whole, prefs, tiny_instruct_path, tmp_path):
    """The reference comes from the starting model, never from the checkpoint resumed: with the stored file gone,
    the resumed run computes it again from the start and ends as the uninterrupted run."""
    data, cut = tmp_path / "prefs", tmp_path / "cut"
    shutil.copytree(prefs, data, ignore=shutil.ignore_patterns(REFERENCE_DIR))
    dpo(data, cut, tiny_instruct_path, **WHOLE)
    finished_like_a_kill_after(cut, 3)
    shutil.rmtree(data / REFERENCE_DIR)
    with pytest.raises(Olmo2KitError, match=r"different run \(beta: 0.1 then, 0.2 now\)"):
        dpo(data, cut, tiny_instruct_path, resume=True, beta=0.2, **WHOLE)
    result = dpo(data, cut, tiny_instruct_path, resume=True, **WHOLE)
    assert result.steps == 8 and len(stored_references(data)) == 1
    assert [e["step"] for e in read_log(cut)] == list(range(1, 9))
    for key in ("loss", "margin", "accuracy"):
        assert [e[key] for e in read_log(cut)] == pytest.approx([e[key] for e in read_log(whole)], abs=1e-6)
    assert_same_weights(weights(cut), weights(whole), atol=1e-6)


def own_copy(prefs: Path, tmp_path: Path) -> Path:
    """The prepared pairs without their stored references, for a test that stores others (or damages them)."""
    shutil.copytree(prefs, tmp_path / "prefs", ignore=shutil.ignore_patterns(REFERENCE_DIR))
    return tmp_path / "prefs"


def test_resume_refuses_starting_weights_that_changed(prefs, tiny_instruct_path, tmp_path):
    """Weights rewritten between a kill and --resume would make a second reference mid-run: refused in one line."""
    model, out, prefs = tmp_path / "model", tmp_path / "out", own_copy(prefs, tmp_path)
    shutil.copytree(tiny_instruct_path, model)
    dpo(prefs, out, model, max_steps=4, lr=1e-3, batch_size=2, save_every=2)
    finished_like_a_kill_after(out, 2)
    state = json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())
    assert set(state["identity"]["weights"]["files"]) == {"model.safetensors"}
    tensors = load_file(model / "model.safetensors")
    tensors["lm_head.weight"] += 0.01
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Olmo2KitError, match=r"^the starting model's weights changed since step-2 was written: resume "
                                            r"with the same weights, or pick another --output$"):
        dpo(prefs, out, model, max_steps=4, lr=1e-3, batch_size=2, save_every=2, resume=True)


def damage(path: Path, how: str) -> None:
    """Overwrite the stored reference's values: with other bytes (its sha256 then differs), or with NaN under a
    sha256 that matches them."""
    from safetensors import safe_open
    from safetensors.numpy import save_file as save_numpy

    with safe_open(str(path), framework="np") as f:
        metadata, values = f.metadata(), f.get_tensor("log_probs")
    if how == "bytes":
        raw = bytearray(path.read_bytes())
        raw[-8:] = b"\xff\xff\x7e\xfe" * 2  # two float32 of about -8.5e37
        path.write_bytes(bytes(raw))
    else:
        import hashlib

        values[0, 0] = np.nan
        metadata["sha256"] = hashlib.sha256(values.tobytes()).hexdigest()
        save_numpy({"log_probs": values}, str(path), metadata=metadata)


@pytest.mark.parametrize("how", ["bytes", "nan"])
def test_a_damaged_stored_reference_is_computed_again(prefs, tiny_instruct_path, tmp_path, caplog, how):
    data = own_copy(prefs, tmp_path)
    dpo(data, tmp_path / "first", tiny_instruct_path, max_steps=1, batch_size=2)
    path = stored_reference(data)
    good = load_file(path)["log_probs"].clone()  # not a view of the file damaged in place below
    damage(path, how)
    dpo(data, tmp_path / "out", tiny_instruct_path, max_steps=1, batch_size=2)
    assert f"{path} is damaged" in caplog.text
    assert abs(read_log(tmp_path / "out")[0]["loss"] - math.log(2)) < 1e-6
    assert torch.equal(load_file(path)["log_probs"], good)  # stored again, whole


def test_a_starting_model_with_non_finite_log_probs_is_one_line(cli, prefs, tiny_instruct_path, tmp_path):
    model, data = tmp_path / "model", own_copy(prefs, tmp_path)
    shutil.copytree(tiny_instruct_path, model)
    tensors = load_file(model / "model.safetensors")
    tensors["lm_head.weight"][0, 0] = float("inf")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli("finetune", "--method", "dpo", "--model", str(model), "--data", str(data), "--output",
                       str(tmp_path / "out"), "--device", "cpu", "--max-steps", "1", "--batch-size", "2")
    assert f"the starting model {model} gives non-finite log-probabilities" in one_line_error(code, err)
    assert not stored_references(data)


def test_rewritten_data_gets_its_own_reference(prefs, tiny_instruct_path, tmp_path):
    """The data is known by its files' stamps, not its row count and creation second: other answers with the same
    rows and manifest are another reference."""
    data = own_copy(prefs, tmp_path)
    dpo(data, tmp_path / "same", tiny_instruct_path, max_steps=1, batch_size=2)
    assert len(stored_references(data)) == 1
    rejected = data / "rejected_input_ids.npy"
    ids = np.fromfile(rejected, dtype=np.uint32)
    rejected.write_bytes(np.roll(ids, 1).tobytes())
    dpo(data, tmp_path / "rewritten", tiny_instruct_path, max_steps=1, batch_size=2)
    assert len(stored_references(data)) == 2
    assert abs(read_log(tmp_path / "rewritten")[0]["loss"] - math.log(2)) < 1e-6


def test_dpo_from_a_lora_adapter_uses_the_merged_model_as_reference(cli, prefs, tiny_instruct_path, tmp_path):
    adapter, out, prefs = random_adapter(tiny_instruct_path, tmp_path / "adapter"), tmp_path / "out", own_copy(prefs,
                                                                                                            tmp_path)
    result = dpo(prefs, out, adapter, max_steps=2, lr=1e-3, batch_size=2)
    assert result.saved == "full" and abs(read_log(out)[0]["loss"] - math.log(2)) < 1e-6
    merged, _ = load(str(adapter), dtype="fp32", device="cpu")
    merged = merged.merge_and_unload()
    data = load_preference(prefs)
    with torch.no_grad():
        expected = answer_log_probs(merged, data, np.arange(data.rows), 64, "cpu")[0].view(2, -1).T.numpy()
    [path] = stored_references(prefs)
    assert np.allclose(load_file(path)["log_probs"].numpy(), expected, atol=1e-5)
    assert set(safe_key(path)["weights"]) == {"files", "base"}
    code, text, err = cli("generate", "x", "--model", str(out), "-n", "3", "--greedy")
    assert code == 0 and text.strip(), err
    code, _, err = cli("finetune", "--method", "dpo", "--lora", "--model", str(adapter), "--data", str(prefs),
                       "--output", str(tmp_path / "lora"), "--device", "cpu")
    assert "is a LoRA adapter: merge it into its base first" in one_line_error(code, err)


def safe_key(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return json.loads(f.metadata()["key"])


def test_lora_sigkill_then_resume_equals_an_uninterrupted_run(prefs, tiny_instruct_path, tmp_path):
    """LoRA with dropout and the length-normalized loss, killed by SIGKILL and resumed from the command line."""
    args = ["finetune", "--method", "dpo", "--dpo-loss", "length-normalized", "--lora", "--model",
            str(tiny_instruct_path), "--data", str(prefs), "--max-steps", "48", "--lr", "1e-3", "--batch-size", "2",
            "--save-every", "4", "--device", "cpu"]
    out = tmp_path / "killed"
    resumed = kill_after_step_8_then_resume(args, out)
    assert "reference log-probabilities from" in resumed.stderr
    reference = tmp_path / "reference"
    dpo(prefs, reference, tiny_instruct_path, max_steps=48, lr=1e-3, batch_size=2, lora=True,
        dpo_loss="length-normalized")
    assert_same_weights(weights(out, "adapter_model.safetensors"), weights(reference, "adapter_model.safetensors"),
                        atol=1e-6)
    log = read_log(out)
    assert [e["step"] for e in log] == list(range(1, 49))
    assert [e["margin"] for e in log] == pytest.approx([e["margin"] for e in read_log(reference)], abs=1e-5)
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6  # the adapter starts as a no-op: the base is the reference
    assert np.mean([e["margin"] for e in log[-5:]]) > np.mean([e["margin"] for e in log[:5]])


def test_qlora_dpo_trains_an_adapter(whole, prefs, tiny_instruct_path, tmp_path):  # whole stores the fp32 reference
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    result = dpo(prefs, out, tiny_instruct_path, lora=True, quantize="nf4", max_steps=4, lr=1e-2, batch_size=2)
    log = read_log(out)
    assert result.saved == "adapter" and (out / "adapter_model.safetensors").exists()
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6  # the reference is the quantized base, as the policy starts
    assert log[-1]["margin"] > log[0]["margin"]
    # The nf4 base's reference is stored beside the fp32 model's, and differs from it.
    quantized = load_file(stored_reference(prefs, quantize="nf4"))["log_probs"]
    assert not torch.allclose(quantized, load_file(stored_reference(prefs))["log_probs"], atol=1e-4)


def test_qlora_trains_alike_whether_its_reference_was_computed_in_the_run_or_read(prefs, tiny_instruct_path, tmp_path):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel (which has no
    autograd) on the first no-grad forward in eval mode: computing the reference in the run must not change how the
    run then trains."""
    pytest.importorskip("bitsandbytes")
    data = tmp_path / "prefs"
    shutil.copytree(prefs, data, ignore=shutil.ignore_patterns(REFERENCE_DIR))
    options = dict(lora=True, quantize="nf4", max_steps=3, lr=1e-2, batch_size=2)
    dpo(data, tmp_path / "computed", tiny_instruct_path, **options)  # computes the reference, then trains
    dpo(data, tmp_path / "read", tiny_instruct_path, **options)  # reads it: no eval forward before training
    assert_same_weights(weights(tmp_path / "computed", "adapter_model.safetensors"),
                        weights(tmp_path / "read", "adapter_model.safetensors"), atol=1e-6)


def test_two_fsdp_processes_equal_one(whole, prefs, tiny_instruct_path, tmp_path):
    """Two sharded CPU processes, each computing half of the reference, take the steps one process takes."""
    data = tmp_path / "prefs"  # without the stored reference: the two processes compute it
    shutil.copytree(prefs, data, ignore=shutil.ignore_patterns(REFERENCE_DIR))
    torchrun = Path(sys.executable).with_name("torchrun")
    sharded = tmp_path / "sharded"
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(OLMO2KIT), "finetune", "--fsdp", "--method",
         "dpo", "--model", str(tiny_instruct_path), "--data", str(data), "--output", str(sharded), "--device", "cpu",
         "--max-steps", "4", "--lr", "1e-3", "--batch-size", "1", "--grad-accum", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    torch.testing.assert_close(load_file(stored_reference(data))["log_probs"],
                               load_file(stored_reference(prefs))["log_probs"], rtol=0, atol=1e-5)
    single = tmp_path / "single"
    dpo(prefs, single, tiny_instruct_path, max_steps=4, lr=1e-3, batch_size=1, grad_accum=4)
    for key in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"):
        assert [e[key] for e in read_log(sharded)] == pytest.approx([e[key] for e in read_log(single)], abs=1e-5)
    assert_same_weights(weights(sharded), weights(single), atol=1e-5)
    assert not torch.equal(weights(sharded)["lm_head.weight"], weights(tiny_instruct_path)["lm_head.weight"])


def test_a_recipe_sets_the_dpo_options(tmp_path):
    (tmp_path / "r.yaml").write_text("method: dpo\nbeta: 5\ndpo_loss: length-normalized\n")
    values = load_config(tmp_path / "r.yaml")
    assert values == {"method": "dpo", "beta": 5.0, "dpo_loss": "length-normalized"}
    config = FinetuneConfig(data="d", output="o", **values)
    assert (config.beta, config.dpo_loss) == (5.0, "length-normalized")
    assert FinetuneConfig(data="d", output="o", method="dpo", dpo_loss="length-normalized").beta == 5.0
    assert FinetuneConfig(data="d", output="o", method="dpo").beta == 0.1
    assert FinetuneConfig(data="d", output="o").beta is None


@pytest.mark.parametrize(
    ("extra", "on_sft_data", "message"),
    [
        (["--method", "dpo"], True, "holds chat data, not preference pairs: fine-tune on it with `olmo2kit finetune`"),
        ([], False, "holds preference data (chosen and rejected answers), not examples to fine-tune on: train on it "
                    "with `olmo2kit finetune --method dpo`"),
        (["--method", "dpo", "--beta", "0"], False, "beta must be a positive finite number, got 0.0"),
        (["--method", "dpo", "--beta", "-1"], False, "beta must be a positive finite number, got -1.0"),
        (["--method", "dpo", "--beta", "nan"], False, "beta must be a positive finite number, got nan"),
        (["--method", "dpo", "--beta", "inf"], False, "beta must be a positive finite number, got inf"),
        (["--beta", "0.1"], False, "--beta applies to --method dpo: add --method dpo, or drop --beta"),
        (["--dpo-loss", "sigmoid"], True, "--dpo-loss applies to --method dpo"),
        (["--method", "dpo", "--dpo-loss", "ipo"], False, "unknown DPO loss 'ipo': use sigmoid or length-normalized"),
        (["--method", "ppo"], False, "unknown method 'ppo': use sft (prepared examples) or dpo (preference pairs)"),
    ],
)
def test_bad_inputs_fail_in_one_line(cli, prefs, tiny_instruct_path, tmp_path, extra, on_sft_data, message):
    data = prefs
    if on_sft_data:
        source = tmp_path / "chats.jsonl"
        source.write_text(json.dumps({"messages": pair(*PAIRS[0])["chosen"]}) + "\n")
        data = tmp_path / "sft"
        prepare_data(source, data, model=str(tiny_instruct_path), seq_len=64)
    code, _, err = cli("finetune", "--model", str(tiny_instruct_path), "--data", str(data), "--output",
                       str(tmp_path / "out"), "--device", "cpu", *extra)
    assert message in one_line_error(code, err)
    assert not (tmp_path / "out").exists()
