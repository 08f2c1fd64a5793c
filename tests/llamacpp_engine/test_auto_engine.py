"""`--engine auto` on a CPU: llama.cpp for generate, chat and serve where it runs the request as asked and the model
is big enough for its speed to pay for the conversion to GGUF; transformers otherwise, with the reason on stderr.

Sizes come from the size table or a config.json alone, so a 1B config without weights is enough to see llama.cpp
taken; no test here converts or loads a large model.
"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import one_line_error
from olmo2kit.cli.common import keep_sampling_on_transformers, pick_engine, sampling_options
from olmo2kit.inference.sampling import DEFAULTS
from olmo2kit.model.engines import choose_engine
from olmo2kit.model.sizes import hf_config

TAKEN = "engine: llamacpp (on a CPU llama.cpp decodes faster, from a bf16 GGUF made once)"
NO_WEIGHTS = "has no safetensors weights; olmo2kit converts safetensors only"  # llama.cpp's loader (gguf.py)


@pytest.fixture(scope="module")
def big_config(tmp_path_factory):
    """A directory with the 1B's config.json and nothing else: the size of a real checkpoint, no weights."""
    path = tmp_path_factory.mktemp("ckpt") / "1b-config-only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config("1b").to_dict()))
    return path


def auto(model, **options) -> tuple[str, list[str]]:
    """choose_engine's "auto" on the CPU as the CLI's generate, chat and serve ask for it: (chosen, said)."""
    told = []
    chosen = choose_engine("auto", str(model), device="cpu", cpu_llamacpp=True, say=told.append, **options)
    return chosen, told


@pytest.mark.parametrize("model", ["1b", "1b-instruct", "allenai/OLMo-2-0425-1B@stage1-step140000-tokens294B",
                                   "big_config"])
def test_auto_takes_llamacpp_for_a_big_model(model, big_config, hub, hub_env):
    # an empty Hub cache: an OLMo 2 name is sized by the table, a directory by its config.json, and no one is asked
    # (the 1B, whose 3 GB GGUF the disk must have room for)
    chosen, told = auto(big_config if model == "big_config" else model)
    assert (chosen, told) == ("llamacpp", [TAKEN])
    assert hub.requests == []


def test_another_hub_model_is_not_sized_and_stays_on_transformers(hub, hub_env):
    """A Hub repo outside the size table is not sized: its config.json would be fetched before the loader has
    checked the name and revision."""
    chosen, told = auto("org/repo")  # the loopback Hub's tiny checkpoint
    assert (chosen, told) == ("transformers", ["engine: transformers (the size of org/repo is not known without "
                                               "reading it: auto takes llama.cpp for OLMo 2's own repos and local "
                                               "checkpoints (--engine llamacpp for this one))"])
    assert not [path for _, path in hub.requests if "/resolve/" in path], hub.requests


def test_tiny_checkpoint_stays_on_transformers(tiny_path):
    chosen, told = auto(tiny_path)
    assert chosen == "transformers"
    assert told == [f"engine: transformers ({tiny_path} has 0.1M parameters: auto takes llama.cpp from 100M, "
                    "where its speed pays for the conversion to GGUF)"], told


def test_only_when_asked_for(big_config):
    """The library's own "auto" (and perplexity, eval, sweep, bench, finetune through it) stays as it was."""
    told = []
    assert choose_engine("auto", str(big_config), device="cpu", say=told.append) == "transformers"
    assert told == ["engine: transformers (--device cpu)"]


@pytest.mark.parametrize(("options", "reason"), [
    ({"quantize": "nf4"}, "--quantize nf4 is bitsandbytes, which runs on transformers"),
    ({"quantize": "int8"}, "--quantize int8 is bitsandbytes, which runs on transformers"),
    ({"unsupported": "--draft-model"}, "llama.cpp does not take --draft-model"),
    ({"dtype": "fp32"}, "--dtype fp32: auto runs llama.cpp in bf16, the type measured faster"),
    ({"keep_transformers": "2 prompts decode together on transformers"}, "2 prompts decode together on transformers"),
])
def test_reasons_to_stay_on_transformers(big_config, options, reason):
    assert auto(big_config, **options) == ("transformers", [f"engine: transformers ({reason})"])


def test_a_gguf_type_is_llamacpp_whatever_the_size(tiny_path):
    assert auto(tiny_path, quantize="q8_0") == ("llamacpp", ["engine: llamacpp (q8_0 is a GGUF type)"])


def test_lora_adapter_stays_on_transformers(big_config, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(big_config)}))
    (adapter / "config.json").write_text((big_config / "config.json").read_text())
    assert auto(adapter) == ("transformers", [f"engine: transformers ({adapter} is a LoRA adapter, which llama.cpp "
                                              "does not load)"])


@pytest.mark.parametrize(("model", "ref"), [("1b", "allenai/OLMo-2-0425-1B"),
                                            ("someone/olmo2-finetune", "someone/olmo2-finetune")])
def test_offline_and_not_cached_stays_on_transformers(offline_hub, model, ref):
    # nothing to run on either engine: transformers' loader says what to do, as without llama.cpp
    assert auto(model) == ("transformers", [f"engine: transformers ({ref} is not in the local cache, and "
                                            "huggingface_hub is offline)"])


def test_unknown_size_stays_on_transformers(tmp_path):
    chosen, told = auto(tmp_path)  # a directory without config.json
    assert (chosen, told) == ("transformers", [f"engine: transformers (the size of {tmp_path} is not known from its "
                                               "config.json)"])


def test_a_gguf_bigger_than_the_free_disk_stays_on_transformers(tmp_path):
    huge = tmp_path / "huge"
    huge.mkdir()
    # a million 1B layers: petabytes of bf16, more than any disk this runs on has free
    (huge / "config.json").write_text(json.dumps(hf_config("1b", num_hidden_layers=1_000_000).to_dict()))
    chosen, told = auto(huge)
    assert chosen == "transformers"
    assert "would not fit the" in told[0] and "free for the GGUF cache" in told[0], told


def test_llamacpp_not_installed(big_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where llama-cpp-python is not installed: no spec
    assert auto(big_config) == ("transformers", ["engine: transformers (llama.cpp's Python bindings are not "
                                                 "installed)"])


def test_converter_not_installed(big_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OLMO2KIT_LLAMA_CPP", str(tmp_path))  # a directory without llama.cpp's converter
    assert auto(big_config) == ("transformers", ["engine: transformers (llama.cpp's GGUF converter is not installed "
                                                 "(`make llamacpp`))"])


def test_sampling_llamacpp_runs_otherwise_stays_on_transformers(big_config):
    options = sampling_options(DEFAULTS.max_new_tokens, 1.0, 50, 0.95, False, None, repetition_penalty=1.2)
    assert keep_sampling_on_transformers(sampling_options(DEFAULTS.max_new_tokens, 1.0, 50, 0.95, False, None)) is None
    chosen, note = pick_engine("auto", str(big_config), None, "cpu", None, cpu_llamacpp=True,
                               keep_transformers=keep_sampling_on_transformers(options))
    assert (chosen, note) == ("transformers", "engine: transformers (--repetition-penalty: llama.cpp's looks back "
                                              "64 tokens, transformers' at the whole text)")


def test_generate_says_which_engine_and_why(cli, tiny_path):
    code, out, err = cli("generate", "Hello", "-m", str(tiny_path), "--greedy", "-n", "2", "--device", "cpu")
    assert code == 0 and out.strip(), err
    assert f"engine: transformers ({tiny_path} has 0.1M parameters: auto takes llama.cpp from 100M, where its " \
           "speed pays for the conversion to GGUF)" in err.splitlines(), err


def batch_job(tmp_path) -> tuple[str, ...]:
    (tmp_path / "in.jsonl").write_text('{"prompt": "Hello"}\n')
    return ("generate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))


@pytest.mark.parametrize("batched", ["prompts", "batch job"])
def test_generate_keeps_batches_on_transformers(cli, big_config, tmp_path, batched):
    # llama.cpp would be taken for one prompt at a time; two with --json, or a batch job's 8 rows, decode as one
    # batch on transformers, which then loads the directory and finds no tokenizer (its loader's error, not llama.cpp's)
    command = ("generate", "A", "B", "--json") if batched == "prompts" else batch_job(tmp_path)
    code, _, err = cli(*command, "-m", str(big_config), "--device", "cpu")
    assert NO_WEIGHTS not in one_line_error(code, err, "cannot load the tokenizer")


@pytest.mark.parametrize("command", ["generate", "batch job", "chat", "serve"])
def test_commands_take_llamacpp_on_auto(cli, big_config, tmp_path, command):
    # The 1B's config without weights: auto takes llama.cpp, whose loader refuses a checkpoint without safetensors
    args = {"generate": ("generate", "Hello"), "batch job": (*batch_job(tmp_path), "--batch-size", "1"),
            "chat": ("chat",), "serve": ("serve", "--port", "0", "--host", "127.0.0.1")}[command]
    code, _, err = cli(*args, "-m", str(big_config), "--device", "cpu", stdin="Hi\n")
    one_line_error(code, err, NO_WEIGHTS)
