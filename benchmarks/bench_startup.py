"""Start-up time of the CLI: `olmo2kit --help` and `olmo2kit sizes` must stay under 0.3 s.

    python benchmarks/bench_startup.py [--repeat 15] [--json out.json]

Each command runs --repeat times in a fresh process; the median wall time is reported.
`hf --help` and `transformers --help` run too when installed, for scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def wall(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    commands = {
        "olmo2kit --help": [str(BIN / "olmo2kit"), "--help"],
        "olmo2kit sizes": [str(BIN / "olmo2kit"), "sizes"],
        "olmo2kit sizes --json": [str(BIN / "olmo2kit"), "sizes", "--json"],
    }
    for other in ("hf", "transformers"):
        path = BIN / other if (BIN / other).exists() else shutil.which(other)
        if path:
            commands[f"{other} --help (for scale)"] = [str(path), "--help"]
    results = {name: wall(command, args.repeat) for name, command in commands.items()}
    print(f"{'command':32} median wall (s), {args.repeat} runs")
    for name, seconds in results.items():
        print(f"{name:32} {seconds:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
