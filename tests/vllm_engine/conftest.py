"""Fixtures of the vLLM engine tests: tiny checkpoints that vLLM's CPU attention runs (head size 64), each loaded
once per run on both engines.

`pytest tests/vllm_engine` selects these tests. Without vLLM they are skipped, except in CI (CI=true), where a
missing vLLM fails them: the second engine is never left untested by accident.

The directory is a package named `vllm_engine`, not `vllm`: a `tests/vllm/__init__.py` would be imported as
`vllm` in place of vLLM itself (tests/ is on sys.path), and a second conftest.py outside a package would take
the module name `conftest` from tests/conftest.py, which other tests import helpers from.

vLLM's engine runs in a process of its own here, while tests/conftest.py's `cli` and the transformers models
share this one. olmo2kit's CPU default (VLLM_ENABLE_V1_MULTIPROCESSING=0) runs it in the calling process, where
vLLM 0.32, serving OLMo 2 through its transformers backend, rewrites transformers' `Olmo2Model` class in
place: every transformers OLMo 2 model of the process then fails (models loaded before raise AttributeError
'do_not_compile', models loaded after raise "Current vLLM config is not set"), and `torch.set_num_threads`
becomes a no-op. The CLI tests run that default, each in a process of its own.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import pytest

# The KV cache each vLLM engine sets aside on the CPU, in GiB (olmo2kit's default is 4); CLI processes inherit it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}


@pytest.fixture(scope="session", autouse=True)
def vllm_required():
    """Skip without vLLM; in CI, fail instead."""
    if find_spec("vllm") is None:
        message = "vLLM is not installed (`make vllm` installs it; its CPU build where there is no GPU)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI runs the vLLM engine tests, so they fail rather than skip", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def tiny64_path(tmp_path_factory):
    from olmo2kit.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("ckpt64") / "tiny-64", head_dim=64, seed=0)


@pytest.fixture(scope="session")
def tiny64_instruct_path(tmp_path_factory):
    from olmo2kit.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("ckpt64") / "tiny-64-instruct", head_dim=64, instruct=True, seed=1)


@pytest.fixture(scope="session")
def tiny64(tiny64_path):
    """(model, tokenizer) of the base checkpoint on transformers, fp32 on the CPU."""
    from olmo2kit.model.loading import load

    return load(str(tiny64_path), dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny64_instruct(tiny64_instruct_path):
    """(model, tokenizer) of the instruct checkpoint on transformers, fp32 on the CPU."""
    from olmo2kit.model.loading import load

    return load(str(tiny64_instruct_path), dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def vllm_tiny64(tiny64_path):
    """(VllmModel, tokenizer) of the base checkpoint, fp32 and eager, its engine started once."""
    yield from _on_vllm(tiny64_path)


@pytest.fixture(scope="session")
def vllm_tiny64_instruct(tiny64_instruct_path):
    """(VllmModel, tokenizer) of the instruct checkpoint, fp32 and eager, its engine started once."""
    yield from _on_vllm(tiny64_instruct_path)


def _on_vllm(path):
    from olmo2kit.model.vllm import VllmOptions, load_vllm

    model, tokenizer = load_vllm(str(path), dtype="fp32", device="cpu", options=VllmOptions(enforce_eager=True))
    with pytest.MonkeyPatch.context() as patch:  # the engine in its own process (see the module's docstring)
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        model.llm  # noqa: B018  (starts vLLM's engine)
    yield model, tokenizer
    model.close()


def stop_inside(text: str, size: int = 3) -> str:
    """A stop string that cuts `text` short: printable ASCII, first found past the text's first character and
    before its end."""
    for start in range(1, len(text) - size):
        stop = text[start:start + size]
        if stop.isascii() and stop.isprintable() and stop.strip() and text.find(stop) == start:
            return stop
    raise AssertionError(f"no stop string cuts {text!r}")
