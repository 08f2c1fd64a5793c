"""The Ray plumbing every command with --ray shares: the options (cli/options.py) and RayPool
(inference/ray_pool.py), on the one local Ray of conftest.local_ray. The units are this module's functions,
which the workers import (local_ray puts the test directories on their path)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.ray_pool import RayOptions, RayPool


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
    (("local", None, None, -1), "--ray-retries -1: give 0 to 100"),
    (("local", None, None, 10**23), "--ray-retries 100000000000000000000000: give 0 to 100"),
    (("local", 0.00001, None, None), "--ray-cpus 1e-05: give 0, or 0.0001 or more"),
    (("local", None, 0.00009, None), "--ray-gpus 9e-05: give 0, or 0.0001 or more"),
    (("local", 0, 0, None), "--ray-cpus 0 with --ray-gpus 0: each task would ask for nothing"),
    (("nowhere", None, None, None), "--ray nowhere: give local, auto, HOST:PORT or ray://HOST:PORT of a Ray head; "
                                    "to start a Ray here, write --ray local, or put --ray last"),
    (("", None, None, None), "--ray '': give local, auto"),
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


@pytest.mark.parametrize(("nodes", "cpus", "gpus", "needle"), [
    ([{"CPU": 2}, {"CPU": 2}], 3, 0, "--ray-cpus 3: no node of the Ray cluster has 3 CPUs (the largest has 2)"),
    ([{"CPU": 8}, {"CPU": 1, "GPU": 1}], 1, 2, "--ray-gpus 2: no node of the Ray cluster has 2 GPUs (the largest "
                                              "has 1)"),
    ([{"CPU": 8}, {"CPU": 1, "GPU": 1}], 2, 1, "--ray-cpus 2 with --ray-gpus 1: no node of the Ray cluster has both"),
    ([{"CPU": 8}], 1, 1, "--ray-gpus 1: the Ray cluster has 0 GPUs"),
    ([{"CPU": 2}, {"CPU": 2}], 2, 0, None),
    ([{"CPU": 8}, {"CPU": 1, "GPU": 1}], 1, 1, None),
])
def test_a_task_must_fit_one_node_not_the_cluster(nodes, cpus, gpus, needle):
    """Ray keeps a task that no node can hold waiting, silently: asked for more than the largest node has (two
    nodes of 2 CPUs make 4, yet no task of 3 runs), it is refused before any work starts."""
    from olmo2kit.inference.ray_pool import check_fits

    if needle is None:
        check_fits(nodes, cpus, gpus)
    else:
        with pytest.raises(Olmo2KitError, match=re.escape(needle)):
            check_fits(nodes, cpus, gpus)


@pytest.mark.parametrize(("options", "needle"), [
    (RayOptions(cpus=3), "--ray-cpus 3: no node of the Ray cluster has 3 CPUs (the largest has 2)"),
    (RayOptions(cpus=0), "--ray-cpus 0 with --ray-gpus 0"),  # no GPU here: the default asks for none
])
def test_the_resources_asked_are_checked_against_the_running_ray(local_ray, options, needle):
    with pytest.raises(Olmo2KitError, match=re.escape(needle)):
        RayPool(options)


def test_a_joined_ray_is_named_by_the_address_it_runs_on(local_ray):
    pool = RayPool(RayOptions(address="auto"))
    assert pool.describe().startswith(f"the Ray this process runs already, at {local_ray}: 2 CPUs, 0 GPUs; ")
    assert pool.slots() == 2


def tried(marks: str) -> int:
    """Count this try in the directory `marks` (a file named by the worker's pid), and return the tries before it."""
    before = len(list(Path(marks).iterdir()))
    (Path(marks) / f"{before}-{os.getpid()}").touch()
    return before


def sleep_on_first_try(marks: str, value: int) -> int:
    """The first try sleeps (for the test to kill its worker); the next returns."""
    if tried(marks) == 0:
        time.sleep(120)
    return value * 10


def fail(marks: str, error: str) -> None:
    tried(marks)
    raise Olmo2KitError("the user's mistake") if error == "user" else RuntimeError(f"try {len(os.listdir(marks))}")


def test_a_worker_killed_during_a_unit_is_retried(local_ray, tmp_path):
    """The worker process running a unit is killed (SIGKILL, from outside): Ray tries the unit again on
    another worker, and the driver gets its value as if nothing happened."""
    marks = tmp_path / "marks"
    marks.mkdir()
    pool = RayPool(RayOptions(retries=1))
    done = []
    thread = threading.Thread(target=lambda: done.extend(pool.map(sleep_on_first_try, {"slow": (str(marks), 4)})))
    thread.start()
    deadline = time.monotonic() + 60
    while not list(marks.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = next(marks.iterdir()).name
    os.kill(int(first.split("-")[1]), signal.SIGKILL)
    thread.join(timeout=60)
    assert [(unit.key, unit.value, unit.error) for unit in done] == [("slow", 40, None)]
    pids = [name.split("-")[1] for name in sorted(os.listdir(marks))]
    assert len(pids) == 2 and pids[0] != pids[1]


def test_a_unit_that_always_raises_is_tried_a_bounded_number_of_times(local_ray, tmp_path):
    marks = {key: tmp_path / key for key in ("exception", "user")}
    for path in marks.values():
        path.mkdir()
    pool = RayPool(RayOptions(retries=2))
    done = {unit.key: unit for unit in pool.map(fail, {key: (str(path), key) for key, path in marks.items()})}
    # An exception: 1 try and 2 more, then reported with the worker's own exception.
    assert (done["exception"].value, done["exception"].error) == (None, "RuntimeError: try 3")
    assert len(list(marks["exception"].iterdir())) == 3
    # The user's mistake fails the same way every time: reported after one try, in its own words.
    assert (done["user"].value, done["user"].error) == (None, "the user's mistake")
    assert len(list(marks["user"].iterdir())) == 1


def spell_out(span: str, key: int) -> int:
    """Record when this unit ran (a file named by its start and end), briefly."""
    start = time.monotonic()
    time.sleep(0.3)
    Path(span, f"{key}-{start}-{time.monotonic()}").touch()
    return key


def test_at_most_in_flight_units_are_submitted_at_a_time(local_ray, tmp_path):
    """With two CPUs two units would run side by side; one in flight runs them one after another, and every
    unit still comes back, each once."""
    pool = RayPool(RayOptions(cpus=1))
    assert pool.slots() == 2
    done = [unit.value for unit in pool.map(spell_out, {key: (str(tmp_path), key) for key in range(5)}, in_flight=1)]
    assert sorted(done) == list(range(5))
    spans = sorted(tuple(map(float, name.split("-")[1:])) for name in os.listdir(tmp_path))
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def sleep_then_mark(marks: str, key: str, seconds: float) -> str:
    """Mark the unit's start, sleep, mark its end."""
    Path(marks, f"{key}-started").touch()
    time.sleep(seconds)
    Path(marks, f"{key}-finished").touch()
    return key


def test_units_left_when_the_caller_stops_early_are_cancelled(local_ray, tmp_path):
    """The caller stops reading (an interrupt, its own error: the generator is closed): a unit still running is
    cancelled, not left to finish for nobody."""
    pool = RayPool(RayOptions(cpus=1))
    done = pool.map(sleep_then_mark, {"quick": (str(tmp_path), "quick", 0), "slow": (str(tmp_path), "slow", 2)})
    assert next(done).key == "quick"
    deadline = time.monotonic() + 60
    while not (tmp_path / "slow-started").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    done.close()
    time.sleep(max(0.0, started + 3 - time.monotonic()))  # past the 2 s it would have slept
    assert (tmp_path / "slow-started").exists() and not (tmp_path / "slow-finished").exists()


def test_a_port_where_no_ray_head_answers_fails_in_seconds(local_ray, monkeypatch):
    """A server that is not a Ray head (a web server, a gRPC server without Ray's GCS) answers TCP, where Ray
    itself would keep trying for minutes: refused in CONNECT_TIMEOUT_S, in one line; a head's GCS passes."""
    import concurrent.futures
    import http.server

    import grpc
    import ray

    from olmo2kit.inference import ray_pool

    monkeypatch.setattr(ray_pool, "CONNECT_TIMEOUT_S", 1)
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    rpc = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    rpc_port = rpc.add_insecure_port("127.0.0.1:0")
    rpc.start()
    try:
        for address, needle in [
            (f"127.0.0.1:{web.server_port}", "no Ray head answered there within 1 s: give the head's GCS port"),
            (f"ray://127.0.0.1:{web.server_port}", "no Ray Client answered there within 1 s"),
            (f"127.0.0.1:{rpc_port}", "a server answered, but not a Ray head's GCS"),
        ]:
            start = time.monotonic()
            with pytest.raises(Olmo2KitError, match=re.escape(f"--ray {address}: {needle}")):
                ray_pool._connect(ray, RayOptions(address=address))
            assert time.monotonic() - start < 4
        ray_pool._check_head(local_ray, local_ray)
    finally:
        web.shutdown()
        rpc.stop(0)
