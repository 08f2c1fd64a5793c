"""export olmo-core / import olmo-core: OLMo 2 checkpoints to OLMo-core's distributed checkpoint and back, checked
against OLMo-core itself (its model, its checkpoint functions, its trainer's Checkpointer), not a copy of it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.olmo_core import CONFIG_FILE, MODEL_DIR, export_olmo_core, import_olmo_core

pytest.importorskip("olmo_core")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: as meant

# Both models in fp32 on the same weights: measured 0 on the tiny checkpoints; 1e-5 is the bound.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_path) -> Path:
    return export_olmo_core(str(tiny_path), tmp_path_factory.mktemp("oc") / "exported").path


def probe(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(7))


def olmo_core_model(config_path: Path):
    """OLMo-core's model of an experiment config.json, empty, built by OLMo-core."""
    from olmo_core.nn.transformer import TransformerConfig

    model = TransformerConfig.from_dict(json.loads(config_path.read_text())["model"]).build(init_device="cpu")
    return model.eval()


def olmo_core_checkpoint(step: Path, tokenizer: Path, *, seed: int = 0, corrupt: str | None = None):
    """A checkpoint of a 4-layer OLMo 2 (OLMo-core's olmo2_14M preset at the tiny vocabulary) as OLMo-core writes
    one: model and AdamW state after one step by its save_model_and_optim_state, and the run's config.json."""
    from olmo_core.data import TokenizerConfig
    from olmo_core.distributed.checkpoint import save_model_and_optim_state
    from olmo_core.nn.transformer import TransformerConfig
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    config = TransformerConfig.olmo2_14M(vocab_size=len(hf_tokenizer))
    torch.manual_seed(seed)
    model = config.build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=probe(len(hf_tokenizer))).logsumexp(-1).mean().backward()
    optim.step()
    if corrupt:
        with torch.no_grad():
            model.get_parameter(corrupt).view(-1)[0] = float("nan")
    save_model_and_optim_state(str(step / MODEL_DIR), model, optim)
    tokenizer_config = TokenizerConfig(vocab_size=len(hf_tokenizer), eos_token_id=hf_tokenizer.eos_token_id,
                                       pad_token_id=hf_tokenizer.pad_token_id, identifier=str(tokenizer))
    (step / CONFIG_FILE).write_text(json.dumps({"model": config.as_config_dict(),
                                                "dataset": {"tokenizer": tokenizer_config.as_config_dict()}}))
    return model.eval()


def test_export_loads_in_olmo_cores_trainer_with_transformers_logits(exported, tiny, tmp_path):
    """OLMo-core's trainer's Checkpointer loads the export (as `load_path`) into a train module's model, whose
    logits are transformers' on the same checkpoint."""
    from olmo_core.optim import AdamWConfig
    from olmo_core.train.checkpoint import Checkpointer
    from olmo_core.train.train_module import TransformerTrainModuleConfig

    hf_model, _ = tiny
    model = olmo_core_model(exported / CONFIG_FILE)
    train_module = TransformerTrainModuleConfig(rank_microbatch_size=64, max_sequence_length=64,
                                                optim=AdamWConfig(lr=1e-4)).build(model)
    load_path = exported / MODEL_DIR
    assert Checkpointer.contains_checkpoint(load_path)
    Checkpointer(work_dir=tmp_path).load(load_path, train_module)
    ids = probe(hf_model.config.vocab_size)
    with torch.no_grad():
        expected, got = hf_model(input_ids=ids).logits, model.eval()(input_ids=ids)
    assert (expected - got).abs().max() <= TOLERANCE


@pytest.mark.parametrize("size, preset", [("1b", "olmo2_1B_v2"), ("7b", "olmo2_7B"), ("13b", "olmo2_13B"),
                                          ("32b", "olmo2_32B")])
def test_the_config_of_each_size_is_olmo_cores_own_preset(size, preset):
    """The exported config of each OLMo 2 size is the preset OLMo-core's training scripts build (1B:
    src/scripts/train/OLMo2/OLMo2-1B.py; 32B: src/scripts/official/OLMo2/OLMo-2-0325-32B-train.py), so their
    models take the export's weights by name and shape."""
    from olmo_core.nn.transformer import TransformerConfig

    from olmo2kit.model.olmo_core import transformer_config
    from olmo2kit.model.sizes import VOCAB_SIZE, hf_config

    expected = getattr(TransformerConfig, preset)(vocab_size=VOCAB_SIZE)
    assert transformer_config(hf_config(size)).as_config_dict() == expected.as_config_dict()


def test_a_lora_adapter_is_exported_merged_into_its_base(tiny, tiny_path, tmp_path):
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from peft import LoraConfig, get_peft_model

    from olmo2kit.model.loading import load

    base, _ = load(str(tiny_path), dtype="fp32", device="cpu")
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter): make it act
                param.normal_(0, 0.5)
    adapted.save_pretrained(tmp_path / "adapter")
    ids = probe(base.config.vocab_size)
    with torch.no_grad():
        expected, unadapted = adapted(input_ids=ids).logits, tiny[0](input_ids=ids).logits
    done = export_olmo_core(str(tmp_path / "adapter"), tmp_path / "oc")
    model = olmo_core_model(done.path / CONFIG_FILE)
    load_model_and_optim_state(str(done.path / MODEL_DIR), model)
    with torch.no_grad():
        got = model(input_ids=ids)
    assert (expected - got).abs().max() <= TOLERANCE < (unadapted - got).abs().max()
    # the adapter holds no tokenizer: the base's was loaded, and is the one the run's config names
    named = json.loads((done.path / CONFIG_FILE).read_text())["dataset"]["tokenizer"]["identifier"]
    assert named == str(tiny_path.resolve())


TRAIN = """
import json, sys
from pathlib import Path
import numpy as np
from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig
from olmo_core.train import Duration, TrainerConfig, prepare_training_environment, teardown_training_environment
from olmo_core.train.callbacks import ConfigSaverCallback
from olmo_core.train.train_module import TransformerTrainModuleConfig

export, root, load_path = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
prepare_training_environment(backend="gloo")
experiment = json.loads((export / "config.json").read_text())
tokenizer = TokenizerConfig.from_dict(experiment["dataset"]["tokenizer"])
model = TransformerConfig.from_dict(experiment["model"]).build(init_device="meta")
train_module = TransformerTrainModuleConfig(rank_microbatch_size=128, max_sequence_length=64,
                                            optim=AdamWConfig(lr=0.0, weight_decay=0.0)).build(model)
tokens = root / "tokens.npy"
np.random.default_rng(0).integers(0, tokenizer.vocab_size, 64 * 8, dtype=np.uint32).tofile(tokens)
dataset = NumpyFSLDatasetConfig(tokenizer=tokenizer, paths=[str(tokens)], sequence_length=64,
                                work_dir=str(root / "work")).build()
loader = NumpyDataLoaderConfig(global_batch_size=128, seed=0, work_dir=str(root / "work")).build(dataset)
trainer = (TrainerConfig(save_folder=str(root / "run"), load_path=load_path, max_duration=Duration.steps(1))
           .with_callback("config_saver", ConfigSaverCallback())).build(train_module, loader)
trainer.callbacks["config_saver"].config = experiment
trainer.fit()
print(json.dumps({"loaded": trainer.checkpoint_loaded}))
teardown_training_environment()
"""


def train_one_step(export: Path, root: Path, load_path: Path) -> bool:
    """OLMo-core's Trainer, in one process under torchrun, one step at lr 0 from `load_path`: whether it loaded."""
    (root / "train.py").write_text(TRAIN)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "1", str(root / "train.py"),
                           str(export), str(root), str(load_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["loaded"]


def test_olmo_cores_trainer_continues_from_an_export_and_its_step_comes_back(exported, tiny_path, tmp_path):
    """OLMo-core's own Trainer takes `OUT/model_and_optim` as its load path and trains a step (at lr 0, so the
    weights stay); the step directory it writes (model, AdamW state, trainer state, config.json) imports back to
    the tensors it started from, bit for bit. Given `OUT` itself, the Trainer finds no checkpoint there."""
    assert train_one_step(exported, tmp_path, exported / MODEL_DIR)
    back = import_olmo_core(tmp_path / "run" / "step1", tmp_path / "back")
    original, returned = load_file(tiny_path / "model.safetensors"), load_file(back.path / "model.safetensors")
    assert all(torch.equal(returned[k], v) for k, v in original.items())
    shutil.rmtree(tmp_path / "run")
    assert not train_one_step(exported, tmp_path, exported)  # what the README warns of


def test_hf_to_olmo_core_to_hf_is_bit_exact(exported, tiny_path, tmp_path):
    back = import_olmo_core(exported, tmp_path / "back")
    assert back.max_logit_diff <= TOLERANCE
    original, returned = load_file(tiny_path / "model.safetensors"), load_file(back.path / "model.safetensors")
    assert sorted(original) == sorted(returned)
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name
    config = json.loads((back.path / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024  # the tiny tokenizer's, not OLMo-core's -1
    assert (back.path / "tokenizer.json").read_bytes() == (tiny_path / "tokenizer.json").read_bytes()
    assert back.path.stat().st_mode & 0o777 == exported.stat().st_mode & 0o777 == 0o755  # readable by all


def test_a_bf16_checkpoint_stays_bf16_and_exact(tiny, tiny_path, tmp_path):
    hf_model, tokenizer = tiny
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_path, bf16)
    (bf16 / "model.safetensors").unlink()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in hf_model.state_dict().items()},
              bf16 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    exported = export_olmo_core(str(bf16), tmp_path / "oc")
    assert exported.dtype == "bfloat16"
    back = import_olmo_core(exported.path, tmp_path / "back")
    original, returned = load_file(bf16 / "model.safetensors"), load_file(back.path / "model.safetensors")
    assert all(returned[k].dtype == torch.bfloat16 and torch.equal(returned[k], v) for k, v in original.items())


def test_a_checkpoint_olmo_core_wrote_generates_and_scores(tiny_path, tmp_path):
    """A model built, stepped and saved by OLMo-core's own code comes back as a checkpoint olmo2kit loads, with
    OLMo-core's logits; generate and perplexity run on it."""
    import olmo2kit

    step = tmp_path / "run" / "step1"
    trained = olmo_core_checkpoint(step, tiny_path)
    done = import_olmo_core(step, tmp_path / "hf")
    assert done.max_logit_diff <= TOLERANCE and done.dtype == "float32"
    model, tokenizer = olmo2kit.load(str(done.path), dtype="fp32", device="cpu")
    ids = probe(len(tokenizer))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - trained(input_ids=ids)).abs().max() <= TOLERANCE
    generation = olmo2kit.generate(model, tokenizer, "Language modeling is", max_new_tokens=5, do_sample=False)
    assert generation.new_tokens > 0
    scored = olmo2kit.perplexity(model, tokenizer, "The capital of France is Paris.")
    assert 1 < scored.perplexity < float("inf")


SHARDED = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from safetensors.torch import save_file
from olmo_core.distributed.checkpoint import save_model_and_optim_state
from olmo_core.nn.transformer import TransformerConfig

step, vocab = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
config = TransformerConfig.olmo2_14M(vocab_size=vocab)
torch.manual_seed(0)
model = config.build(init_device="cpu")
model.init_weights(device=torch.device("cpu"))
for block in model.blocks.values():
    fully_shard(block)
fully_shard(model)
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(dist.get_rank()))
model(input_ids=ids).logsumexp(-1).mean().backward()
optim.step()
save_model_and_optim_state(step + "/model_and_optim", model, optim)
full = {k: v.full_tensor() for k, v in model.state_dict().items()}
if dist.get_rank() == 0:
    save_file(full, step + "/reference.safetensors")
    with open(step + "/config.json", "w") as f:
        json.dump({"model": config.as_config_dict()}, f)
dist.destroy_process_group()
"""


def test_a_checkpoint_sharded_by_two_processes_imports(tiny_path, tmp_path):
    """Two processes (FSDP2 over gloo) each write their shards of model and optimizer; the import gathers them."""
    from olmo_core.nn.hf import convert_state_to_hf, get_hf_config
    from transformers import AutoTokenizer

    step = tmp_path / "run" / "step1"
    step.mkdir(parents=True)
    (tmp_path / "sharded.py").write_text(SHARDED)
    vocab = len(AutoTokenizer.from_pretrained(tiny_path))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(tmp_path / "sharded.py"),
                           str(step), str(vocab)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name[:3] for p in (step / MODEL_DIR).glob("*.distcp")} == {"__0", "__1"}  # both ranks wrote
    back = import_olmo_core(step, tmp_path / "hf", tokenizer=str(tiny_path))
    reference = load_file(step / "reference.safetensors")
    model = olmo_core_model(step / CONFIG_FILE)
    expected = convert_state_to_hf(get_hf_config(model), reference)
    returned = load_file(back.path / "model.safetensors")
    assert sorted(returned) == sorted(expected)
    assert all(torch.equal(returned[k], v) for k, v in expected.items())


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_a_mismatch_is_refused_and_nothing_written(exported, tmp_path):
    """A config whose model transformers cannot express (the final norm's epsilon, which Olmo2Config shares with
    every norm) gives other logits: refused, with the largest difference said."""
    changed = tmp_path / "changed"
    shutil.copytree(exported, changed)
    config = json.loads((changed / CONFIG_FILE).read_text())
    config["model"]["lm_head"]["layer_norm"]["eps"] = 10.0
    (changed / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Olmo2KitError, match="largest difference") as refused:
        import_olmo_core(changed, tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert nothing_written(tmp_path / "out")


def test_what_a_killed_conversion_left_is_removed_by_the_next(exported, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".back.{gone.stdout.strip()}.abc.partial"  # a staging directory whose process has ended
    (left / MODEL_DIR).mkdir(parents=True)
    running = tmp_path / f".back.{os.getpid()}.xyz.partial"  # one of a process still running: kept
    running.mkdir()
    import_olmo_core(exported, tmp_path / "back")
    assert not left.exists() and running.exists()


def test_a_corrupted_tensor_is_refused_and_nothing_written(tiny_path, tmp_path):
    step = tmp_path / "run" / "step1"
    olmo_core_checkpoint(step, tiny_path, corrupt="blocks.1.feed_forward.w2.weight")
    with pytest.raises(Olmo2KitError, match="not finite"):
        import_olmo_core(step, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_index_that_would_run_code_is_refused(exported, tmp_path):
    """The DCP index is a pickle: one that names anything but a checkpoint's classes is refused unrun."""
    hostile = tmp_path / "hostile"
    shutil.copytree(exported, hostile)
    marker = tmp_path / "ran"
    (hostile / MODEL_DIR / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Olmo2KitError, match="not a torch distributed checkpoint's index"):
        import_olmo_core(hostile, tmp_path / "out")
    assert not marker.exists()
    assert nothing_written(tmp_path / "out")


def test_without_olmo_core_the_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "olmo_core", None)  # what `import olmo_core` meets where it is not installed
    with pytest.raises(Olmo2KitError, match="make olmo-core"):
        import_olmo_core(tmp_path, tmp_path / "out")


def test_the_inputs_are_checked_before_any_work(exported, tmp_path):
    with pytest.raises(Olmo2KitError, match="no such directory"):
        import_olmo_core(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(Olmo2KitError, match="not an OLMo-core checkpoint"):
        import_olmo_core(tmp_path, tmp_path / "out")
    shutil.copytree(exported, tmp_path / "run" / "step5")
    with pytest.raises(Olmo2KitError, match="give one of them, e.g."):
        import_olmo_core(tmp_path / "run", tmp_path / "out")  # a run's folder of step directories
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(Olmo2KitError, match="exists"):
        import_olmo_core(exported, tmp_path / "taken")
    with pytest.raises(Olmo2KitError, match="exists"):
        export_olmo_core(str(exported), tmp_path / "taken")


def test_a_config_naming_any_other_function_as_a_class_is_refused_unrun(exported, tmp_path, monkeypatch):
    """OLMo-core's Config.from_dict imports the module a `_CLASS_` names and calls what it finds: a config naming
    olmo_core.io.clear_directory would delete the victim. Refused, and a module outside OLMo-core is not even
    imported."""
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    hostile = tmp_path / "hostile"
    shutil.copytree(exported, hostile)
    config = json.loads((hostile / CONFIG_FILE).read_text())
    config["model"]["lm_head"]["layer_norm"] = {"_CLASS_": "olmo_core.io.clear_directory", "dir": str(victim)}
    (hostile / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Olmo2KitError, match="olmo_core.io.clear_directory.*not one of OLMo-core's config classes"):
        import_olmo_core(hostile, tmp_path / "out")
    assert (victim / "keep").is_dir() and nothing_written(tmp_path / "out")
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass C: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config["model"]["lm_head"]["layer_norm"] = {"_CLASS_": "planted.C"}
    (hostile / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Olmo2KitError, match="planted.C"):
        import_olmo_core(hostile, tmp_path / "out")
    assert not (tmp_path / "imported").exists()


def test_an_export_from_a_revision_takes_that_revisions_dtype(hub, hub_env, tiny, tiny_path, tmp_path):
    """main is bf16, the revision fp32: the export of repo@revision is fp32 and exact, though main's config is
    cached beside it."""
    from olmo2kit.model.loading import load_tokenizer

    hf_model, _ = tiny
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_path, bf16)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in hf_model.state_dict().items()},
              bf16 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    hub.add_repo("org/oc-dtypes", {"main": bf16, "fp32": tiny_path})
    load_tokenizer("org/oc-dtypes")  # main's config.json in the cache
    done = export_olmo_core("org/oc-dtypes@fp32", tmp_path / "oc")
    assert done.dtype == "float32"
    back = import_olmo_core(done.path, tmp_path / "back")
    original, returned = load_file(tiny_path / "model.safetensors"), load_file(back.path / "model.safetensors")
    assert all(torch.equal(returned[k], v) for k, v in original.items())


def test_weights_a_cast_would_change_are_refused(tiny_path, tmp_path):
    """A config.json saying bfloat16 over fp32 weights: the export would round them; refused, nothing written."""
    mislabelled = tmp_path / "mislabelled"
    shutil.copytree(tiny_path, mislabelled)
    config = json.loads((mislabelled / "config.json").read_text())
    (mislabelled / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    with pytest.raises(Olmo2KitError, match="not exactly representable in bfloat16"):
        export_olmo_core(str(mislabelled), tmp_path / "oc")
    assert nothing_written(tmp_path / "oc")


def test_a_checkpoint_of_mixed_dtypes_is_refused(tiny_path, tmp_path):
    """bf16 embeddings and fp32 elsewhere: refused in one line, not written with every tensor in bf16."""
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    step = tmp_path / "run" / "step1"
    model = olmo_core_checkpoint(step, tiny_path)
    shutil.rmtree(step / MODEL_DIR)
    model.embeddings.to(torch.bfloat16)
    save_model_and_optim_state(str(step / MODEL_DIR), model)
    with pytest.raises(Olmo2KitError, match=r"several dtypes \(bfloat16 \(embeddings.weight\), float32") as refused:
        import_olmo_core(step, tmp_path / "out")
    assert "\n" not in str(refused.value) and nothing_written(tmp_path / "out")


def test_a_mapping_that_changes_a_tensor_is_refused():
    """convert_each checks each converted tensor against its source: a converter that damages a row (which the
    probe's tokens may never read) or maps two names to one is refused."""
    from olmo2kit.model.olmo_core import convert_each

    state = {"a": torch.ones(4, 3), "b": torch.zeros(2)}
    assert set(convert_each(lambda _, one: {k.upper(): v.clone() for k, v in one.items()}, None, dict(state))) \
        == {"A", "B"}

    def damaging(_, one):
        return {k: v.clone().index_fill_(0, torch.tensor([v.shape[0] - 1]), 7.0) for k, v in one.items()}

    with pytest.raises(Olmo2KitError, match="did not copy a"):
        convert_each(damaging, None, dict(state))
    with pytest.raises(Olmo2KitError, match="did not copy b"):
        convert_each(lambda _, one: {"same": next(iter(one.values()))}, None, dict(state))


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(exported, tiny_path, tmp_path):
    from transformers import AutoTokenizer

    bigger = AutoTokenizer.from_pretrained(tiny_path)
    bigger.add_tokens([f"<extra_{i}>" for i in range(200)])
    bigger.save_pretrained(tmp_path / "bigger")
    with pytest.raises(Olmo2KitError, match="more than the .* the model of .* has embeddings for"):
        import_olmo_core(exported, tmp_path / "out", tokenizer=str(tmp_path / "bigger"))
    other = tmp_path / "other-run"
    shutil.copytree(exported, other)
    config = json.loads((other / CONFIG_FILE).read_text())
    config["dataset"]["tokenizer"]["eos_token_id"] += 1
    (other / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Olmo2KitError, match="eos_token_id"):
        import_olmo_core(other, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def rewrite_index(step: Path, change) -> None:
    """The DCP index of `step` (olmo2kit's own export: trusted here) with `change(metadata)` applied."""
    index = step / MODEL_DIR / ".metadata"
    metadata = pickle.loads(index.read_bytes())
    change(metadata)
    index.write_bytes(pickle.dumps(metadata))


def test_an_index_of_allowed_classes_that_is_no_index_is_refused(exported, tmp_path):
    from collections import OrderedDict

    step = tmp_path / "step"
    shutil.copytree(exported, step)
    index = step / MODEL_DIR / ".metadata"
    for content in (pickle.dumps({1, 2}), pickle.dumps(OrderedDict(a=1)),
                    b"ctorch.serialization\n_get_layout\n(Vbogus\ntR."):
        index.write_bytes(content)
        with pytest.raises(Olmo2KitError, match="not a torch distributed checkpoint's index") as refused:
            import_olmo_core(step, tmp_path / "out")
        assert "\n" not in str(refused.value)


def test_a_shard_path_out_of_the_checkpoint_is_refused(exported, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(exported, step)
    (tmp_path / "other").mkdir()
    shutil.copy(next((step / MODEL_DIR).glob("*.distcp")), tmp_path / "other" / "file")

    def outside(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = "../../other/file"

    rewrite_index(step, outside)
    with pytest.raises(Olmo2KitError, match="a shard is at '../../other/file', not a file of the checkpoint"):
        import_olmo_core(step, tmp_path / "out")


def test_a_config_of_huge_sizes_is_refused_before_any_memory_is_taken(exported, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(exported, step)
    config = json.loads((step / CONFIG_FILE).read_text())
    config["model"]["d_model"] = 1 << 20
    (step / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Olmo2KitError, match=r"holds model.embeddings.weight of shape \(\d+, 64\) where its config"):
        import_olmo_core(step, tmp_path / "out")


def test_a_missing_shard_is_said_in_one_short_line(exported, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(exported, step)
    next((step / MODEL_DIR).glob("*.distcp")).unlink()
    with pytest.raises(Olmo2KitError, match="No such file or directory") as refused:
        import_olmo_core(step, tmp_path / "out")
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400


def test_the_output_is_resolved_and_checked_before_any_work(exported, tmp_path, monkeypatch):
    """`.` (an empty current directory) is refused at once, and a failed run leaves no parent directories."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(Olmo2KitError, match="is the current directory"):
        import_olmo_core(exported, ".")
    with pytest.raises(Olmo2KitError, match="no such directory"):
        export_olmo_core(str(tmp_path / "nonexistent"), "a/b/c")
    assert not (empty / "a").exists()
