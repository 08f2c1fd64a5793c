import json
import logging
import shutil
import sys

import pytest
import torch

from olmo2kit import devices
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.loading import load, resolve_model


def test_resolve_aliases_repos_revisions_and_directories(tiny_path):
    assert resolve_model("1b").source == "allenai/OLMo-2-0425-1B"
    ref = resolve_model("7b-instruct@main")
    assert (ref.source, ref.revision, ref.local) == ("allenai/OLMo-2-1124-7B-Instruct", "main", False)
    ref = resolve_model("allenai/OLMo-2-0425-1B@stage1-step140000-tokens294B")
    assert ref.revision == "stage1-step140000-tokens294B"
    assert resolve_model("org/repo", revision="r1").revision == "r1"
    local = resolve_model(str(tiny_path))
    assert local.local and local.revision is None


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        ("8b", {}, "unknown model '8b': use a size alias \\(1b, 1b-sft"),
        ("./no/such/dir", {}, "no such directory"),
        ("", {}, "no model given"),
        ("org/repo@a", {"revision": "b"}, "two revisions given"),
    ],
)
def test_resolve_errors(model, kwargs, message):
    with pytest.raises(Olmo2KitError, match=message):
        resolve_model(model, **kwargs)


def test_local_directory_takes_no_revision(tiny_path):
    with pytest.raises(Olmo2KitError, match="local directory"):
        resolve_model(str(tiny_path), revision="main")


def test_load_is_ready_for_generation(tiny):
    model, tokenizer = tiny
    assert not model.training
    assert model.config.use_cache and model.generation_config.use_cache
    assert model.dtype == torch.float32  # auto on a CPU
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|endoftext|>"


def test_instruct_config_with_cache_off_is_turned_on(tiny_instruct_path, tmp_path):
    path = shutil.copytree(tiny_instruct_path, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["use_cache"] = False  # as the OLMo 2 instruct configs ship
    (path / "config.json").write_text(json.dumps(config))
    model, _ = load(str(path), dtype="fp32", device="cpu")
    assert model.config.use_cache is True


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                                 ("float16", torch.float16)])
def test_dtypes(tiny_path, dtype, expected):
    model, _ = load(str(tiny_path), dtype=dtype, device="cpu")
    assert model.dtype == expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_is_bf16_only_where_the_cpu_has_it(tiny_path, monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    model, _ = load(str(tiny_path), device="cpu")
    assert model.dtype == (torch.bfloat16 if native else torch.float32)
    assert load(str(tiny_path), dtype="fp32", device="cpu")[0].dtype == torch.float32  # fp32 still forces fp32


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_flags_say():
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    assert devices.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


@pytest.mark.parametrize("native", [True, False])
def test_the_load_line_says_what_auto_took_on_the_cpu(cli, tiny_path, monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    code, _, err = cli("generate", "Hi", "--model", str(tiny_path), "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0, err
    loaded = next(line for line in err.splitlines() if line.startswith("loaded "))
    expected = "bfloat16: auto, this CPU has native bf16 (--dtype fp32 for fp32)" if native else \
        "float32: auto, this CPU has no native bf16"
    assert f"({expected}, cpu)" in loaded
    code, _, err = cli("generate", "Hi", "--model", str(tiny_path), "--max-new-tokens", "2", "--device", "cpu",
                       "--dtype", "fp32")
    assert "(float32, cpu)" in err  # asked for: no note


def test_fp16_warns_about_overflow(tiny_path, caplog):
    with caplog.at_level(logging.WARNING, logger="olmo2kit"):
        load(str(tiny_path), dtype="fp16", device="cpu")
    assert "overflow" in caplog.text


@pytest.mark.parametrize(("quantize", "layer_type"), [("int8", "Linear8bitLt"), ("nf4", "Linear4bit"),
                                                      ("fp4", "Linear4bit")])
def test_quantized_loads_through_bitsandbytes_config(tiny_path, quantize, layer_type):
    model, _ = load(str(tiny_path), quantize=quantize, dtype="fp32", device="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer_type
    assert type(model.lm_head).__name__ == "Linear"  # transformers keeps lm_head unquantized
    if quantize != "int8":
        assert model.config.quantization_config.bnb_4bit_quant_type == quantize


def test_bad_options_fail_before_loading(tiny_path):
    with pytest.raises(Olmo2KitError, match="unknown dtype"):
        load(str(tiny_path), dtype="fp8", device="cpu")
    with pytest.raises(Olmo2KitError, match="unknown quantization"):
        load(str(tiny_path), quantize="int4", dtype="fp32", device="cpu")
    with pytest.raises(Olmo2KitError, match="unknown device"):
        load(str(tiny_path), device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_user_error(tiny_path):
    with pytest.raises(Olmo2KitError, match="no CUDA GPU"):
        load(str(tiny_path), device="cuda")


def test_missing_bitsandbytes_is_a_user_error(tiny_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(Olmo2KitError, match="needs bitsandbytes: pip install"):
        load(str(tiny_path), quantize="nf4", dtype="fp32", device="cpu")


def test_safetensors_only(tiny_path, tmp_path):
    path = shutil.copytree(tiny_path, tmp_path / "bin-only")
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(Olmo2KitError, match="safetensors"):
        load(str(path), dtype="fp32", device="cpu")


def test_model_neither_cached_nor_reachable(offline_hub):
    with pytest.raises(Olmo2KitError, match="neither in the local cache nor reachable.*olmo2kit tiny"):
        load("1b", dtype="fp32", device="cpu")


def test_lora_adapter_directory_loads_on_its_base(tiny_path, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from olmo2kit.inference.generation import generate

    base, tokenizer = load(str(tiny_path), dtype="fp32", device="cpu")
    before = generate(base, tokenizer, "Hello", do_sample=False, max_new_tokens=10).token_ids
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter): make it act
                param.normal_(0, 0.5)
    adapted.save_pretrained(tmp_path / "adapter")
    expected = generate(adapted, tokenizer, "Hello", do_sample=False, max_new_tokens=10).token_ids

    model, _ = load(str(tmp_path / "adapter"), dtype="fp32", device="cpu")
    assert isinstance(model, PeftModel)
    result = generate(model, tokenizer, "Hello", do_sample=False, max_new_tokens=10).token_ids
    assert result == expected != before


def _hub_down(monkeypatch) -> None:
    """Point huggingface_hub at a loopback port where nothing listens."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")


def test_unreachable_hub_fails_at_once_without_a_cached_copy(hub_env, monkeypatch):
    import time

    _hub_down(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(Olmo2KitError, match="not in the local cache and the Hub cannot be reached.*olmo2kit tiny"):
        load("org/repo", dtype="fp32", device="cpu")
    assert time.perf_counter() - start < 10  # no retry loop


def test_unreachable_hub_says_a_repo_shaped_name_is_no_directory_either(hub_env, monkeypatch):
    _hub_down(monkeypatch)
    with pytest.raises(Olmo2KitError, match=r"pass --model \./tiny \(nor is there a local directory out/1b-sft\)$"):
        load("out/1b-sft", dtype="fp32", device="cpu")
    with pytest.raises(Olmo2KitError, match=r"pass --model \./tiny$"):  # an alias is never a directory
        load("1b", dtype="fp32", device="cpu")


def test_unreachable_hub_loads_the_cached_copy(hub_env, monkeypatch, caplog):
    first, _ = load("org/repo", dtype="fp32", device="cpu")
    _hub_down(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="olmo2kit"):
        again, _ = load("org/repo", dtype="fp32", device="cpu")
    assert "cannot reach the Hub: loading the cached copy" in caplog.text
    assert torch.equal(first.lm_head.weight, again.lm_head.weight)


def test_missing_repo_is_reported_before_any_download(hub, hub_env):
    with pytest.raises(Olmo2KitError, match="org/nothing not found on the Hub"):
        load("org/nothing", dtype="fp32", device="cpu")
    assert not any("/resolve/" in path for _, path in hub.requests)
