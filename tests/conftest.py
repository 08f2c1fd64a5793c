"""Shared fixtures: tiny OLMo 2 checkpoints built once per test run, and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["hub", "serving"]  # the loopback Hub (hub_server, hub, hub_env); a served tiny model (server)

# No test reaches the network: anything that tries to resolve a Hub model goes offline.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

OLMO2KIT = Path(sys.executable).with_name("olmo2kit")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    from olmo2kit.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_instruct_path(tmp_path_factory) -> Path:
    from olmo2kit.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-instruct", instruct=True, seed=1)


# The context of `tiny_long_path`: a request that holds its batch slot for seconds needs more than the tiny
# checkpoint's 1024 positions (the tiny model writes about 1000 tokens a second).
LONG_CONTEXT = 16384


def long_context_copy(source: Path, path: Path) -> Path:
    """A copy of checkpoint `source` at `path` whose config gives a 16384-token context (RoPE takes any position;
    the logits are the source's)."""
    import json
    import shutil

    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG_CONTEXT}))
    return path


@pytest.fixture(scope="session")
def tiny_long_path(tiny_path, tmp_path_factory) -> Path:
    """The tiny checkpoint with a 16384-token context."""
    return long_context_copy(tiny_path, tmp_path_factory.mktemp("ckpt") / "tiny-long")


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """(model, tokenizer) loaded through olmo2kit in fp32 on the CPU."""
    from olmo2kit.model.loading import load

    return load(str(tiny_path), dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_instruct(tiny_instruct_path):
    """(model, tokenizer) of the tiny instruct checkpoint, loaded through olmo2kit in fp32 on the CPU."""
    from olmo2kit.model.loading import load

    return load(str(tiny_instruct_path), dtype="fp32", device="cpu")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache in offline mode: nothing can be downloaded or found."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OLMO2KIT_CACHE_DIR", str(tmp_path / "olmo2kit-cache"))
    # huggingface_hub reads these once, at import; a fresh process would see the variables.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in this process: cli("generate", "x") -> (exit code, stdout, stderr)."""
    from olmo2kit.cli import app as cli_module

    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            import io

            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        monkeypatch.setattr(sys, "argv", ["olmo2kit", *args])
        monkeypatch.setattr(cli_module, "_debug", False)
        try:
            cli_module.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_line_error(code: int, err: str, needle: str = "", *, alone: bool = False) -> str:
    """Assert a user error as the CLI reports one: exit 2, no traceback, and the last line of stderr (the only
    line, with `alone`) an `error: ` line holding `needle`; return that line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], err
    assert not alone or len(lines) == 1, err
    return lines[-1]


def run_olmo2kit(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script in a fresh process."""
    return subprocess.run(
        [str(OLMO2KIT), *args], capture_output=True, text=True, input=stdin,
        env={**os.environ, **(env or {})}, timeout=300,
    )


@pytest.fixture(scope="session")
def local_ray(hub_server, tmp_path_factory) -> str:
    """One local Ray for the whole run, started by the first test that asks for it: 2 CPUs, loopback, no
    dashboard. Its workers see the loopback Hub, a Hugging Face cache of their own, this tree's olmo2kit and the
    test directories (a test may send them a function of its own module). Returns the address another driver
    joins it by: `--ray ADDRESS`, or RAY_ADDRESS with `--ray auto`."""
    ray = pytest.importorskip("ray")
    import olmo2kit

    hf_home = tmp_path_factory.mktemp("ray-worker-hf")
    tests = Path(__file__).parent
    # pytest puts each test directory on sys.path as it imports its modules ("prepend" import mode), all of them
    # before the first test runs: the workers get the same, so a test module's functions unpickle there.
    paths = [str(Path(olmo2kit.__file__).parents[1])] + [p for p in sys.path if Path(p).is_relative_to(tests)]
    env = {
        "HF_ENDPOINT": hub_server.url, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
        "OLMO2KIT_CACHE_DIR": str(hf_home / "olmo2kit-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
    }
    # Workers inherit the raylet's environment, so the variables are set while it starts too: they then also
    # reach the workers of a second driver that joins this Ray (a CLI the test runs), which runtime_env's do not.
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        # Idle workers are kept past Ray's soft limit of one per CPU: a second driver's workers (a CLI the test
        # runs) would otherwise push this process's warm workers out, and each new one imports torch again.
        # address="local": a Ray of its own even where RAY_ADDRESS is set or `ray start` ran on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, runtime_env={"env_vars": env}, _system_config={"num_workers_soft_limit": 8})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread; on a shared 2-core machine two threads can be 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
