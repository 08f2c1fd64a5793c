"""`estimate` answers for what `generate` would load (the same dtype on the same device), and a config it cannot
trust (garbage, another architecture, a size that is not positive) is one line and exit 2, never a figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from olmo2kit import devices
from olmo2kit.devices import DTYPES, device_memory
from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.estimate import estimate
from olmo2kit.model.loading import load
from olmo2kit.model.sizes import weight_bytes


def test_the_default_dtype_is_what_load_picks_on_this_machine(tiny_path):
    model, _ = load(str(tiny_path))  # every default: dtype auto, device auto
    loaded_dtype = next(d.name for d in DTYPES.values() if getattr(torch, d.torch_name) == model.dtype)
    result = estimate(str(tiny_path))
    assert result.dtype == loaded_dtype
    assert result.device == device_memory(model.device.type)[0]
    assert estimate(str(tiny_path), dtype="auto").to_dict() == result.to_dict()


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU answers")
@pytest.mark.parametrize(("native", "dtype"), [(False, "fp32"), (True, "bf16")])
def test_without_a_gpu_auto_is_what_the_cpu_runs_best(cli, monkeypatch, native, dtype):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    result = estimate("7b")
    assert (result.dtype, result.device) == (dtype, "CPU")
    assert result.weights_bytes == weight_bytes("7b", dtype)  # what generate loads there
    code, out, err = cli("estimate", "7b")
    assert code == 0 and f"weights ({dtype})" in out
    assert err.splitlines()[-1].startswith(f"7b in {dtype} on CPU: ")
    code, out, err = cli("estimate", "7b", "--dtype", "auto")  # refused by estimate alone before
    assert code == 0 and f"weights ({dtype})" in out


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(), reason="needs a bf16 GPU")
def test_on_a_bf16_gpu_auto_is_bf16_against_the_gpus_memory():
    result = estimate("7b")
    assert result.dtype == "bf16" and result.device == torch.cuda.get_device_name(0)
    assert result.device_bytes == torch.cuda.get_device_properties(0).total_memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_refused_as_load_refuses_it(cli, tiny_path):
    with pytest.raises(Olmo2KitError) as refused:
        estimate("7b", device="cuda")
    with pytest.raises(Olmo2KitError) as load_refused:
        load(str(tiny_path), device="cuda")
    assert str(refused.value) == str(load_refused.value)
    code, out, err = cli("estimate", "7b", "--device", "cuda")
    assert code == 2 and out == "" and err == f"error: {refused.value}\n"


def test_dtype_spellings_are_loads(cli):
    assert estimate("1b", dtype="bfloat16").dtype == "bf16"
    assert estimate("1b", dtype="float32", device="cpu").weights_bytes == weight_bytes("1b", "fp32")
    code, _, err = cli("estimate", "1b", "--dtype", "fp8")
    assert code == 2 and err == "error: unknown dtype 'fp8': use auto, bf16, fp16 or fp32\n"


def test_the_readme_command_still_answers(cli):
    code, out, _ = cli("estimate", "32b", "--quantize", "nf4", "--context", "8192", "--json")
    row = json.loads(out)
    assert code == 0 and row["quantize"] == "nf4" and row["context"] == 8192
    assert row["weights_bytes"] == weight_bytes("32b", row["dtype"], "nf4")
    assert row["total_bytes"] == row["weights_bytes"] + row["kv_cache_bytes"] + row["working_bytes"]


def checkpoint_with(tiny_path: Path, tmp_path: Path, **changes) -> Path:
    path = Path(shutil.copytree(tiny_path, tmp_path / "ckpt"))
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": -1}, "gives num_hidden_layers -1: it must be a positive whole number"),
        ({"num_hidden_layers": 0}, "gives num_hidden_layers 0: it must be a positive whole number"),
        ({"hidden_size": -64}, "gives hidden_size -64: it must be a positive whole number"),
        ({"vocab_size": "512"}, "gives vocab_size '512': it must be a positive whole number"),
        ({"num_key_value_heads": 0}, "gives num_key_value_heads 0: it must be a positive whole number"),
        ({"intermediate_size": None}, "gives intermediate_size no value: it must be a positive whole number"),
        ({"num_attention_heads": 3}, "gives hidden_size 64, not a multiple of its num_attention_heads 3"),
    ],
)
def test_a_size_that_is_not_positive_is_refused_not_estimated(tiny_path, tmp_path, cli, changes, message):
    path = checkpoint_with(tiny_path, tmp_path, **changes)
    with pytest.raises(Olmo2KitError, match=f"^the config of {path} {message}"):
        estimate(str(path))
    code, out, err = cli("estimate", str(path))
    assert code == 2 and out == "" and err == f"error: the config of {path} {message} (fix its config.json)\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "config.json is not valid JSON"),
        (b"\xff\xfe\x00", "config.json is not valid JSON"),
        (b"[1, 2]", "config.json holds a JSON list, not an object"),
        (b"null", "config.json holds a JSON NoneType, not an object"),
        (b"{}", "is not an OLMo 2 checkpoint: its config.json gives no model_type"),
        (b'{"model_type": "llama", "num_hidden_layers": 2}', "its config.json gives model_type 'llama'"),
        (b" " * (16 << 20) + b"{}", "config.json is over 16 MB, too large for a config file"),
    ],
)
def test_estimate_on_a_garbage_config_is_one_line(tiny_path, tmp_path, cli, content, message):
    path = checkpoint_with(tiny_path, tmp_path)
    (path / "config.json").write_bytes(content)
    with pytest.raises(Olmo2KitError, match=message):
        estimate(str(path))
    code, out, err = cli("estimate", str(path))
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_config_nested_past_the_stack_is_one_line(cli, tmp_path):
    (tmp_path / "config.json").write_bytes(b"[" * 100_000)
    code, out, err = cli("estimate", str(tmp_path), "--device", "cpu")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'config.json'} is not valid JSON")
