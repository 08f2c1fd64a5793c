"""A sweep of 8 tiny checkpoints on a local Ray with 2 workers against 1, and what Ray costs per unit.

The loopback Hub of tests/hub.py serves org/bench-ray: 8 stage-1 branches, each a tiny checkpoint of its own
seed. Each way measures the perplexity of the same text over all 8 through `olmo2kit.evals.sweep.Sweep`, with a
fresh Hugging Face cache (every revision downloaded, as in a real sweep):

  no Ray, 1 thread     this process, torch on 1 thread (what each Ray worker gets: Ray sets OMP_NUM_THREADS to
                       the task's CPUs)
  no Ray, 2 threads    this process, torch on both cores (a sweep without --ray here)
  Ray, 1 worker        a local Ray of 1 CPU, a task of 1 CPU at a time
  Ray, 2 workers       a local Ray of 2 CPUs, 2 tasks at a time

A Ray way's time counts from the sweep's start (its probe task and worker start-up included) to its last row;
starting Ray itself is timed apart. Ray's overhead is Ray 1 worker - no Ray 1 thread, split into the set-up (building
the Sweep: on Ray its probe task, for which the first worker starts) and the rest per unit; and a no-op task's
round trip through RayPool.map (100 tasks, after a warm-up). Ways are interleaved over the rounds.

    .venv/bin/python benchmarks/bench_ray_sweep.py [--rounds 1] [--words 40000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hub import LoopbackHub  # noqa: E402  (tests/ is not a package)

REPO = "org/bench-ray"
BRANCHES = [f"stage1-step{step}000-tokens{2 * step + 1}B" for step in range(1, 9)]
WAYS = ("no Ray, 1 thread", "no Ray, 2 threads", "Ray, 1 worker", "Ray, 2 workers")


def noop(value: int) -> int:
    return value


def hub_env(hub: LoopbackHub, cache: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub"),
            "OLMO2KIT_CACHE_DIR": str(cache / "olmo2kit"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def point_at(env: dict[str, str]) -> None:
    """This process's huggingface_hub at `env` (it reads its environment once, at import)."""
    from huggingface_hub import constants

    os.environ.update(env)
    constants.ENDPOINT = env["HF_ENDPOINT"]
    constants.HUGGINGFACE_CO_URL_TEMPLATE = env["HF_ENDPOINT"] + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_CACHE = env["HF_HUB_CACHE"]


def run_way(way: str, data: Path, root: Path, hub: LoopbackHub) -> tuple[float, float, float | None, float | None]:
    """(sweep seconds, of which its set-up, Ray start seconds, no-op round trip seconds) of one way, in a fresh
    cache. The set-up is building the Sweep: listing the revisions and, on Ray, its probe task (the first worker
    starts and imports olmo2kit)."""
    import ray
    import torch

    from olmo2kit.evals.sweep import Sweep
    from olmo2kit.inference.ray_pool import RayOptions, RayPool

    cache = Path(tempfile.mkdtemp(dir=root))
    point_at(hub_env(hub, cache))  # set before ray.init: the workers inherit the raylet's environment
    started = noop_s = None
    options = None
    if way.startswith("Ray"):
        start = time.perf_counter()
        ray.init(num_cpus=2 if "2" in way else 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False, runtime_env={"env_vars": hub_env(hub, cache)})
        started = time.perf_counter() - start
        options = RayOptions(cpus=1, gpus=0)
    else:
        torch.set_num_threads(1 if "1 thread" in way else 2)
    try:
        start = time.perf_counter()
        sweep = Sweep(REPO, data=data, out=cache / "ppl.jsonl", dtype="fp32", device="cpu", ray=options)
        setup = time.perf_counter() - start
        steps = list(sweep.run())
        elapsed = time.perf_counter() - start
        if len(steps) != len(BRANCHES) or any(step.error for step in steps):
            raise SystemExit(f"{way}: {[step.error for step in steps if step.error]}")
        if options is not None:
            pool = RayPool(options)
            list(pool.map(noop, {i: (i,) for i in range(10)}))  # warm-up
            start = time.perf_counter()
            list(pool.map(noop, {i: (i,) for i in range(100)}))
            noop_s = (time.perf_counter() - start) / 100
    finally:
        if options is not None:
            ray.shutdown()
    return elapsed, setup, started, noop_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--words", type=int, default=40000, help="Words of text each checkpoint is measured on.")
    args = parser.parse_args()

    import torch

    from olmo2kit.model.tiny import build_tiny

    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    setups: dict[str, list[float]] = {way: [] for way in WAYS}
    ray_start: list[float] = []
    noops: list[float] = []
    with LoopbackHub() as hub, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hub.add_repo(REPO, {name: build_tiny(root / f"seed{seed}", seed=seed) for seed, name in enumerate(BRANCHES)})
        data = root / "data.txt"
        words = "the model reads a sentence and predicts the next word of it as it goes".split()
        data.write_text(" ".join(words[i % len(words)] for i in range(args.words)), encoding="utf-8")
        for round_index in range(args.rounds):
            order = list(WAYS) if round_index % 2 == 0 else list(reversed(WAYS))
            for way in order:
                elapsed, setup, started, noop_s = run_way(way, data, root, hub)
                times[way].append(elapsed)
                setups[way].append(setup)
                ray_start += [started] if started is not None else []
                noops += [noop_s] if noop_s is not None else []
                print(f"round {round_index + 1}, {way}: {elapsed:.2f} s (set-up {setup:.2f} s)", flush=True)
    torch.set_num_threads(threads)

    median = {way: statistics.median(values) for way, values in times.items()}
    setup = {way: statistics.median(values) for way, values in setups.items()}
    print(f"\nsweep of {len(BRANCHES)} tiny checkpoints, perplexity over {args.words} words, fp32, CPU; "
          f"median of {args.rounds} rounds")
    for way in WAYS:
        print(f"  {way:18s} {median[way]:6.2f} s   {len(BRANCHES) / median[way]:.2f} revisions/s   set-up "
              f"{setup[way]:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times[way])})")
    print(f"Ray 2 workers against 1: {median['Ray, 1 worker'] / median['Ray, 2 workers']:.2f}x")
    extra = median["Ray, 1 worker"] - median["no Ray, 1 thread"]
    extra_setup = setup["Ray, 1 worker"] - setup["no Ray, 1 thread"]
    print(f"Ray 1 worker - no Ray 1 thread: {extra:.2f} s, of which set-up {extra_setup:.2f} s (the first worker's "
          f"start); the rest per unit: {(extra - extra_setup) / len(BRANCHES):.3f} s")
    print(f"no-op task round trip through RayPool.map: median {statistics.median(noops) * 1000:.2f} ms")
    print(f"ray.init (local, not in the sweep times): median {statistics.median(ray_start):.2f} s")


if __name__ == "__main__":
    main()
