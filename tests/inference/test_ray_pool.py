"""The Ray plumbing every command with --ray shares: the options (cli/options.py) and RayPool
(inference/ray_pool.py), on the one local Ray of conftest.local_ray."""

from __future__ import annotations

import re

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.ray_pool import RayOptions


def parsed(*args: str) -> dict:
    """The parameters the real sweep command parses from `args` (nothing runs)."""
    import typer.main

    from olmo2kit.cli.app import app

    command = typer.main.get_command(app).commands["sweep"]
    return command.make_context("sweep", ["--out", "r.jsonl", *args]).params


@pytest.mark.parametrize(("args", "address"), [
    ([], None),
    (["--ray"], "local"),
    (["--ray", "--ray-cpus", "2"], "local"),
    (["--ray-cpus", "2", "--ray"], "local"),
    (["--ray", "local"], "local"),
    (["--ray", "auto"], "auto"),
    (["--ray", "127.0.0.1:1"], "127.0.0.1:1"),
    (["--ray=ray://head:10001"], "ray://head:10001"),
])
def test_ray_takes_an_address_or_none(args, address):
    params = parsed(*args)
    assert params["ray"] == address
    assert params["ray_cpus"] == (2 if "--ray-cpus" in args else None)


def test_a_bare_value_is_not_filled_in_after_a_double_dash():
    from olmo2kit.cli.options import with_bare_values

    assert with_bare_values(["--ray", "--", "--ray"], {"--ray"}) == ["--ray", "local", "--", "--ray"]


@pytest.mark.parametrize(("args", "needle"), [
    (("local", -1, None, None), "--ray-cpus -1: give 0 or more"),
    (("local", float("inf"), None, None), "--ray-cpus inf: give 0 or more"),
    (("local", None, -0.5, None), "--ray-gpus -0.5: give 0 or more"),
    (("local", None, None, -1), "--ray-retries -1: give 0 or more"),
    (("nowhere", None, None, None), "give local, auto, HOST:PORT or ray://HOST:PORT"),
    (("ray://head", None, None, None), "give local, auto, HOST:PORT or ray://HOST:PORT"),
    (("head:99999", None, None, None), "give local, auto, HOST:PORT or ray://HOST:PORT"),
    ((None, 2, None, None), "--ray-cpus size each Ray task: give them with --ray"),
    ((None, None, 1, 3), "--ray-gpus and --ray-retries size each Ray task: give them with --ray"),
])
def test_bad_ray_options_are_refused_before_anything_connects(args, needle):
    from olmo2kit.cli.options import ray_options

    with pytest.raises(Olmo2KitError, match=re.escape(needle)):
        ray_options(*args)


def test_ray_options_defaults():
    from olmo2kit.cli.options import ray_options

    assert ray_options(None, None, None, None) is None
    assert ray_options("auto", None, None, None) == RayOptions(address="auto", cpus=1, gpus=None, retries=2)
    assert ray_options("h:1", 0.5, 0, 0) == RayOptions(address="h:1", cpus=0.5, gpus=0, retries=0)
