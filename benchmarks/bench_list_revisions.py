"""Wall time of `olmo2kit list-revisions MODEL --json` over 1,000 branches, end to end.

Starts the loopback Hub of tests/hub.py with a repo of 1,000 OLMo-2-shaped branches and runs
the installed console script against it in a fresh process each time: interpreter start,
imports, the refs request, parsing, sorting and printing. Cold runs get an empty
OLMO2KIT_CACHE_DIR and HF_HOME each; warm runs reuse one whose refs list is cached.

    .venv/bin/python benchmarks/bench_list_revisions.py [--runs 7] [--branches 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hub import LoopbackHub, olmo_branch_names  # noqa: E402  (tests/ is not a package)

OLMO2KIT = Path(sys.executable).with_name("olmo2kit")
REPO = "org/big"
TARGET_S = 1.0


def run_once(hub: LoopbackHub, cache_root: Path, branches: int) -> float:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(cache_root / "hf-home"),
        "OLMO2KIT_CACHE_DIR": str(cache_root / "olmo2kit"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"):
        env.pop(key, None)
    start = time.perf_counter()
    result = subprocess.run(
        [str(OLMO2KIT), "list-revisions", REPO, "--json"], env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or len(json.loads(result.stdout)) != branches:
        raise SystemExit(f"list-revisions failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--branches", type=int, default=1000)
    args = parser.parse_args()

    with LoopbackHub() as hub, tempfile.TemporaryDirectory() as tmp:
        hub.add_branches(REPO, olmo_branch_names(args.branches))
        cold = [run_once(hub, Path(tmp, f"cold{i}"), args.branches) for i in range(args.runs)]
        refs_requests = hub.count(f"/api/models/{REPO}/refs")
        run_once(hub, Path(tmp, "warm"), args.branches)  # fills the cache
        hub.reset()
        warm = [run_once(hub, Path(tmp, "warm"), args.branches) for _ in range(args.runs)]
        assert hub.count(f"/api/models/{REPO}/refs") == 0, "warm runs should not ask the Hub"

    print(f"olmo2kit list-revisions {REPO} --json: {args.branches} branches, loopback Hub, {args.runs} runs")
    print(f"cold cache ({refs_requests} refs requests): {summary(cold)}")
    print(f"warm cache (0 refs requests): {summary(warm)}")
    verdict = "under" if statistics.median(cold) < TARGET_S else "OVER"
    print(f"cold median is {verdict} the {TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
