"""Fixtures of the llama.cpp engine tests: the tiny checkpoints as GGUF files in a GGUF cache of this run.

`pytest tests/llamacpp_engine` selects these tests. Without llama-cpp-python or llama.cpp's converter they are
skipped, except in CI (CI=true), where their absence fails them. The directory is a package named
`llamacpp_engine`, not `llama_cpp`, so that it never stands in for the bindings themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib.util import find_spec
from pathlib import Path

import pytest

from conftest import long_context_copy
from serving import Server, serving


@pytest.fixture(scope="session", autouse=True)
def llamacpp_required(tmp_path_factory):
    """Skip without llama.cpp; in CI, fail instead. Every GGUF of the run goes to a cache of its own."""
    from olmo2kit.errors import Olmo2KitError
    from olmo2kit.model.gguf import converter_dir

    try:
        if find_spec("llama_cpp") is None:
            raise Olmo2KitError("llama-cpp-python is not installed")
        converter_dir()
    except Olmo2KitError as e:
        message = f"{e} (`make llamacpp` builds and installs both)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI runs the llama.cpp engine tests, so they fail rather than skip", pytrace=False)
        pytest.skip(message)
    cache = tmp_path_factory.mktemp("gguf-cache")
    before = os.environ.get("OLMO2KIT_GGUF_CACHE")
    os.environ["OLMO2KIT_GGUF_CACHE"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("OLMO2KIT_GGUF_CACHE", None)
    else:
        os.environ["OLMO2KIT_GGUF_CACHE"] = before


# llama.cpp's threads wait for one another spinning: on a shared machine (CI, two cores for several jobs) two of
# them decode the tiny model 40 times slower than one.
THREADS = 1


@pytest.fixture(scope="session")
def llamacpp_tiny(tiny_path):
    """(model, tokenizer) of the tiny base checkpoint on llama.cpp, from an f32 GGUF, on one thread."""
    from olmo2kit.model.llamacpp import load_llamacpp

    return load_llamacpp(str(tiny_path), dtype="fp32", threads=THREADS)


@pytest.fixture(scope="session")
def llamacpp_tiny_instruct(tiny_instruct_path):
    """(model, tokenizer) of the tiny instruct checkpoint on llama.cpp, from an f32 GGUF, on one thread."""
    from olmo2kit.model.llamacpp import load_llamacpp

    return load_llamacpp(str(tiny_instruct_path), dtype="fp32", threads=THREADS)


@contextmanager
def serving_llamacpp(checkpoint, *args: str) -> Iterator[Server]:
    """`olmo2kit serve --engine llamacpp --dtype fp32` over `checkpoint` (its f32 GGUF converted into this run's
    cache), decoding on THREADS threads: the server runs llama.cpp on every core it may use, so it starts on
    THREADS of this process's cores (a child inherits the starting thread's CPU affinity)."""
    cores = os.sched_getaffinity(0)
    with ExitStack() as stack:
        os.sched_setaffinity(0, sorted(cores)[-THREADS:])
        try:
            server = stack.enter_context(serving("--model", str(checkpoint), "--engine", "llamacpp", "--dtype", "fp32",
                                                 *args))
        finally:
            os.sched_setaffinity(0, cores)
        yield server


@pytest.fixture(scope="session")
def tiny_instruct_long_path(tiny_instruct_path, tmp_path_factory) -> Path:
    """The tiny instruct checkpoint with a 16384-token context (RoPE takes any position; the logits are those of
    `tiny_instruct_path`): a request may hold its batch slot for tens of seconds."""
    return long_context_copy(tiny_instruct_path, tmp_path_factory.mktemp("ckpt") / "tiny-instruct-long")


@pytest.fixture(scope="session")
def llamacpp_server(tiny_instruct_long_path) -> Iterator[Server]:
    """One llama.cpp server over the tiny instruct checkpoint (16384 positions) with 16 batch slots, shared by the
    session's tests; the f32 GGUF is converted by its start."""
    with serving_llamacpp(tiny_instruct_long_path, "--max-batch-size", "16") as running:
        yield running
