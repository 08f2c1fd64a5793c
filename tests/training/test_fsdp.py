"""finetune --fsdp: torch's FSDP2 over two CPU processes (gloo) takes the steps one process takes on the same batch,
and its checkpoints, each process's shards, resume on two processes or one, as one process's resume on two. Its
result is written as one process writes it, a tensor at a time; bf16 mixed precision and activation checkpointing
train and resume; the first process's memory during saves stays far below a full gather's."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import OLMO2KIT
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.loading import load
from olmo2kit.training.checkpoints import staging_dir
from olmo2kit.training.data import prepare_data
from olmo2kit.training.finetune import FinetuneConfig, _accelerate_fsdp_plugin, _check_sharding, finetune

pytestmark = pytest.mark.usefixtures("one_thread")  # module by module, from conftest.py

BENCH_SAVE = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dcp_save.py"

# Four optimizer steps on a global batch of 4 rows: 1 row x 2 micro-batches x 2 processes when sharded,
# 1 row x 4 micro-batches in one process. fp32 throughout (no bf16 on a CPU).
STEPS = {"max_steps": 4, "lr": 1e-3, "batch_size": 1}
# The two runs sum the same per-token losses and gradients in a different order (per process, then over
# gloo), so they differ by fp32 rounding only: measured 1e-7 relative on the losses and 1e-7 on the
# weights. 1e-5 leaves room for that and is far below what a wrongly reduced or scaled gradient does.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_instruct_path) -> Path:
    """Eight prepared chat rows of 64 tokens for the tiny instruct checkpoint."""
    root = tmp_path_factory.mktemp("fsdp-data")
    pairs = [("Say hello.", "Hello, world!"), ("Count to five.", "1 2 3 4 5"),
             ("What is the capital of France?", "The capital of France is Paris."),
             ("Write a short poem about the sea.", "The sea is wide, the sea is deep.")] * 2
    (root / "chats.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in pairs))
    prepare_data(root / "chats.jsonl", root / "data", model=str(tiny_instruct_path), seq_len=64)
    return root / "data"


def sharded_finetune(data: Path, output: Path, model: Path, *options: str) -> subprocess.CompletedProcess:
    """`olmo2kit finetune --fsdp` on two CPU processes under torchrun, with STEPS and 2 micro-batches each."""
    torchrun = Path(sys.executable).with_name("torchrun")
    steps = [f"--{key.replace('_', '-')}={value}" for key, value in STEPS.items()]
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(OLMO2KIT), "finetune", "--fsdp", "--model",
         str(model), "--data", str(data), "--output", str(output), "--device", "cpu", *steps, "--grad-accum", "2",
         "--save-every", "2", *options],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def sharded(chat_data, tiny_instruct_path, tmp_path_factory) -> tuple[Path, str]:
    """The output directory of a finished sharded run, and what it said on stderr."""
    output = tmp_path_factory.mktemp("fsdp") / "out"
    return output, sharded_finetune(chat_data, output, tiny_instruct_path).stderr


@pytest.fixture(scope="module")
def single(chat_data, tiny_instruct_path, tmp_path_factory) -> Path:
    """The output directory of the same run on one process: 4 micro-batches a step, a checkpoint at step 2."""
    output = tmp_path_factory.mktemp("single") / "out"
    finetune(FinetuneConfig(data=str(chat_data), output=str(output), model=str(tiny_instruct_path), device="cpu",
                            grad_accum=4, save_every=2, **STEPS))
    return output


def killed_after_step_2(output: Path, copy: Path) -> Path:
    """A copy of the finished run `output` as if killed after its checkpoint of step 2 (its only one)."""
    shutil.copytree(output, copy)
    for name in ("finetune.json", "model.safetensors"):
        (copy / name).unlink()
    return copy


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


def test_sharded_steps_match_one_process(sharded, single, tiny_instruct_path):
    output, stderr = sharded
    held, total = (int(n.replace(",", "")) for n in re.search(r"first holds ([\d,]+) of the ([\d,]+)", stderr).groups())
    assert held < 0.6 * total  # sharded, not replicated: each process holds about half
    assert losses(output) == pytest.approx(losses(single), rel=TOLERANCE)
    base, sharded_weights, single_weights = (load_file(p / "model.safetensors")
                                             for p in (tiny_instruct_path, output, single))
    assert sharded_weights.keys() == single_weights.keys()
    for name, weight in sharded_weights.items():
        torch.testing.assert_close(weight, single_weights[name], rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    assert not torch.equal(sharded_weights["lm_head.weight"], base["lm_head.weight"])  # it trained
    model, _ = load(str(output), dtype="fp32", device="cpu")
    assert not model.training


def test_each_process_writes_its_own_shards(sharded, tiny_instruct_path):
    checkpoint = sharded[0] / "checkpoints" / "step-2"
    # The checkpoint records every weight at its whole shape, with its Adam moments ...
    metadata = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    base = load_file(tiny_instruct_path / "model.safetensors")
    assert {key.removeprefix("model."): tuple(m.size) for key, m in metadata.items() if key.startswith("model.")} == {
        name: tuple(w.shape) for name, w in base.items()}
    assert {"optimizer.state.lm_head.weight.exp_avg", "optimizer.state.lm_head.weight.exp_avg_sq"} <= metadata.keys()
    # ... but each process wrote about half of it: nothing was gathered on the first.
    shards = [(checkpoint / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    assert max(shards) < 0.6 * sum(shards)


def test_sharded_resume_equals_the_uninterrupted_run(sharded, chat_data, tiny_instruct_path, tmp_path):
    output, _ = sharded
    cut = killed_after_step_2(output, tmp_path / "cut")
    resumed = sharded_finetune(chat_data, cut, tiny_instruct_path, "--resume")
    assert "resuming from" in resumed.stderr
    assert losses(cut) == losses(output)
    finished = load_file(output / "model.safetensors")
    for name, weight in load_file(cut / "model.safetensors").items():
        torch.testing.assert_close(weight, finished[name], rtol=0, atol=0, msg=name)


def test_two_processes_checkpoint_resumes_on_one(sharded, chat_data, tiny_instruct_path, tmp_path):
    output, _ = sharded
    cut = killed_after_step_2(output, tmp_path / "cut")
    # A save killed halfway, after the first process wrote state.json but before the second wrote its shard, leaves
    # its staging directory (named as save_checkpoint names it), never a checkpoint that looks whole.
    torn = staging_dir(cut, 3)
    shutil.copytree(cut / "checkpoints" / "step-2", torn)
    (torn / "__1_0.distcp").unlink()
    state = json.loads((torn / "state.json").read_text())
    (torn / "state.json").write_text(json.dumps({**state, "step": 3}))
    said = []
    finetune(FinetuneConfig(data=str(chat_data), output=str(cut), model=str(tiny_instruct_path), device="cpu",
                            grad_accum=4, resume=True, **STEPS), say=said.append)
    assert any(message.startswith("resuming from") for message in said)
    assert losses(cut) == pytest.approx(losses(output), rel=TOLERANCE)


def test_one_process_checkpoint_resumes_on_two(single, sharded, chat_data, tiny_instruct_path, tmp_path):
    cut = killed_after_step_2(single, tmp_path / "cut")
    resumed = sharded_finetune(chat_data, cut, tiny_instruct_path, "--resume")
    assert "resuming from" in resumed.stderr
    assert losses(cut) == pytest.approx(losses(single), rel=TOLERANCE)
    assert losses(cut) == pytest.approx(losses(sharded[0]), rel=TOLERANCE)


def test_a_checkpoint_from_before_sharding_is_one_line(single, chat_data, tiny_instruct_path, tmp_path):
    cut = killed_after_step_2(single, tmp_path / "cut")
    checkpoint = cut / "checkpoints" / "step-2"
    for item in checkpoint.iterdir():  # the layout of olmo2kit before DCP: whole tensors from the first process
        if item.name not in ("state.json", "rng-0.pt"):
            item.unlink()
    (checkpoint / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(Olmo2KitError, match="before sharded checkpoints: resume it with that version"):
        finetune(FinetuneConfig(data=str(chat_data), output=str(cut), model=str(tiny_instruct_path), device="cpu",
                                grad_accum=4, resume=True, **STEPS))


def resume_single(cut: Path, chat_data: Path, model: Path, **options) -> None:
    finetune(FinetuneConfig(data=str(chat_data), output=str(cut), model=str(model), device="cpu", grad_accum=4,
                            resume=True, **STEPS, **options))


def test_a_damaged_checkpoint_is_one_line(single, chat_data, tiny_instruct_path, tmp_path):
    cut = killed_after_step_2(single, tmp_path / "cut")
    checkpoint = cut / "checkpoints" / "step-2"
    (checkpoint / "__0_0.distcp").write_bytes((checkpoint / "__0_0.distcp").read_bytes()[:1000])  # truncated
    with pytest.raises(Olmo2KitError, match=r"step-2 is damaged or incomplete \(EOFError\): delete .*step-2 to resume"):
        resume_single(cut, chat_data, tiny_instruct_path)
    (checkpoint / "__0_0.distcp").write_bytes((single / "checkpoints" / "step-2" / "__0_0.distcp").read_bytes())
    (checkpoint / "rng-0.pt").write_bytes(b"")
    with pytest.raises(Olmo2KitError, match=r"damaged or incomplete \(.*\): delete"):
        resume_single(cut, chat_data, tiny_instruct_path)
    (checkpoint / ".metadata").unlink()  # not the old layout: no trainable.safetensors
    with pytest.raises(Olmo2KitError, match=r"damaged or incomplete \(no .metadata\)"):
        resume_single(cut, chat_data, tiny_instruct_path)


def test_a_checkpoint_of_other_shapes_is_one_line(single, chat_data, tiny_instruct_path, tmp_path):
    """The model directory rewritten in place with wider MLPs: a full fine-tune's checkpoint holds every weight, so
    nothing else notices; its shapes do."""
    from transformers import AutoConfig, AutoModelForCausalLM

    wider = tmp_path / "wider"
    shutil.copytree(tiny_instruct_path, wider)
    config = AutoConfig.from_pretrained(wider)
    config.intermediate_size *= 2
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    cut = killed_after_step_2(single, tmp_path / "cut")
    state = json.loads((cut / "checkpoints" / "step-2" / "state.json").read_text())
    state["identity"]["model"] = str(wider)
    (cut / "checkpoints" / "step-2" / "state.json").write_text(json.dumps(state))
    with pytest.raises(Olmo2KitError, match=r"holds weights of other shapes than this model's \(model.layers.0.mlp"):
        resume_single(cut, chat_data, wider)


def test_resuming_with_another_precision_is_refused(mixed, chat_data, tiny_instruct_path, tmp_path):
    cut = killed_after_step_2(mixed[0], tmp_path / "cut")
    # On one process, without --fsdp: a changed process count and sharding are fine, a changed precision is not.
    with pytest.raises(Olmo2KitError, match="mixed_precision: True then, False now"):
        resume_single(cut, chat_data, tiny_instruct_path)


def test_fsdp_refuses_what_it_cannot_shard(chat_data, tiny_instruct_path, tmp_path, monkeypatch):
    def config(**options) -> FinetuneConfig:
        return FinetuneConfig(data=str(chat_data), output=str(tmp_path / "out"), model=str(tiny_instruct_path),
                              device="cpu", **options)

    with pytest.raises(Olmo2KitError, match="--fsdp cannot shard quantized weights"):
        config(fsdp=True, lora=True, quantize="nf4")
    with pytest.raises(Olmo2KitError, match="shards the model over several processes"):
        finetune(config(fsdp=True))
    # What `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets: on CPUs accelerate would use DDP.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(Olmo2KitError, match="add --fsdp"):
        finetune(config())
    assert not (tmp_path / "out").exists()
    # On GPUs that config shards the model itself: --fsdp would shard it twice.
    with pytest.raises(Olmo2KitError, match="already shards on GPUs: drop --fsdp"):
        _check_sharding(config(fsdp=True), "cuda:0")


def test_accelerate_fsdp_on_gpus_reduces_in_fp32(monkeypatch):
    """What accelerate's FSDP plugin does with configs/accelerate/fsdp.yaml's `mixed_precision: bf16`
    (accelerate/state.py calls set_mixed_precision): the policy olmo2kit gives it stays, reducing in fp32."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert _accelerate_fsdp_plugin("cpu") is None
    plugin = _accelerate_fsdp_plugin("cuda:0")
    plugin.set_mixed_precision("bf16")
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_the_sharded_result_is_what_one_process_writes(sharded, single):
    output, _ = sharded
    # Written a tensor at a time by the first process, yet the same files as save_pretrained's in one process.
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((output / name).read_text()) == json.loads((single / name).read_text()), name
    with open(output / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {"F32"}


@pytest.fixture(scope="module")
def mixed(chat_data, tiny_instruct_path, tmp_path_factory) -> tuple[Path, str]:
    """A sharded run with bf16 mixed precision and activation checkpointing, and what it said on stderr."""
    output = tmp_path_factory.mktemp("mixed") / "out"
    options = ("--mixed-precision", "--gradient-checkpointing")
    return output, sharded_finetune(chat_data, output, tiny_instruct_path, *options).stderr


def test_bf16_mixed_precision_and_activation_checkpointing_train_and_resume(mixed, sharded, chat_data,
                                                                             tiny_instruct_path, tmp_path):
    output, stderr = mixed
    assert "bf16 compute and fp32 reduction" in stderr and "activation checkpointing" in stderr
    trained, fp32 = losses(output), losses(sharded[0])
    assert all(math.isfinite(loss) for loss in trained) and trained[-1] < trained[0]
    # bf16 compute: near the fp32 run's losses (measured: 3e-4 relative at most), and not equal to them (it is on).
    assert trained == pytest.approx(fp32, rel=0.01) and trained != pytest.approx(fp32, rel=1e-5)
    assert {w.dtype for w in load_file(output / "model.safetensors").values()} == {torch.float32}  # fp32 masters
    # Resumed from its checkpoint without activation checkpointing: steps 3 and 4 come out the same.
    cut = killed_after_step_2(output, tmp_path / "cut")
    resumed = sharded_finetune(chat_data, cut, tiny_instruct_path, "--mixed-precision", "--resume")
    assert "resuming from" in resumed.stderr and "activation checkpointing" not in resumed.stderr
    assert losses(cut) == pytest.approx(trained, rel=TOLERANCE)


def test_saves_hold_a_tensor_not_the_model_on_the_first_process(tmp_path):
    """benchmarks/bench_dcp_save.py on a small OLMo 2 (15 M weights in 6 layers, each tensor at most 2.4 MB) with
    Adam's moments: the first process's memory rise during each save, sharded against a full gather."""
    torchrun = Path(sys.executable).with_name("torchrun")
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(BENCH_SAVE), "--model", "1b", "--hidden-size",
         "384", "--intermediate-size", "1536", "--layers", "6", "--vocab-size", "1024", "--optimizer", "adamw",
         "--max-shard-size", "20MB", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.splitlines()[-1])
    weights, saves = figures["weights_bytes"], {name: f["rise_bytes"] for name, f in figures["saves"].items()}
    # A full gather holds the whole state on the first process (the measure sees it) ...
    assert saves["checkpoint full"] > 0.9 * 3 * weights and saves["result full"] > 0.9 * weights
    # ... the sharded saves a small part of it: the checkpoint its own shards, the result a few tensors at a time.
    assert saves["checkpoint sharded"] < 0.1 * saves["checkpoint full"]
    assert saves["result sharded"] < 0.3 * saves["result full"]
    # Several files and their index, holding what the full gather wrote.
    index = json.loads((tmp_path / "sharded-result" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == weights and len(set(index["weight_map"].values())) > 1
    full = load_file(tmp_path / "full-result" / "model.safetensors")
    written = {}
    for file in set(index["weight_map"].values()):
        written.update(load_file(tmp_path / "sharded-result" / file))
    assert written.keys() == full.keys()
    for name, weight in full.items():
        assert torch.equal(written[name], weight), name


TIED = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

from olmo2kit.training.checkpoints import save_weights_from_shards

dist.init_process_group("gloo")
model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
config = AutoConfig.from_pretrained(model_dir)
config.tie_word_embeddings = True
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
if dist.get_rank() == 0:
    model.save_pretrained(out / "whole")  # save_pretrained's own files, before sharding
    (out / "sharded").mkdir()
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
dist.barrier()
save_weights_from_shards(model, out / "sharded", dist.get_rank() == 0)
dist.destroy_process_group()
"""


def test_tied_weights_are_written_once_as_save_pretrained_writes_them(chat_data, tiny_instruct_path, tmp_path):
    script = tmp_path / "tied.py"
    script.write_text(TIED)
    torchrun = Path(sys.executable).with_name("torchrun")
    completed = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
                                str(tiny_instruct_path), str(tmp_path)],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    whole, written = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "sharded"))
    assert "lm_head.weight" not in whole and written.keys() == whole.keys()
    for name, weight in whole.items():
        assert torch.equal(written[name], weight), name
    shutil.copy(tmp_path / "whole" / "config.json", tmp_path / "sharded")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again on loading
    # The tied checkpoint fine-tuned with --fsdp: its sharded load (the weights sent from the first process) keeps
    # the tie, so one tensor trains and one is written.
    for item in Path(tiny_instruct_path).iterdir():
        if not (tmp_path / "whole" / item.name).exists():
            shutil.copy(item, tmp_path / "whole")
    sharded_finetune(chat_data, tmp_path / "trained", tmp_path / "whole")
    trained = load_file(tmp_path / "trained" / "model.safetensors")
    assert "lm_head.weight" not in trained and not torch.equal(trained["model.embed_tokens.weight"],
                                                               whole["model.embed_tokens.weight"])
