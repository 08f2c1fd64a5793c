"""Serving throughput before and after a change: `olmo2kit serve` at C concurrent clients, two checkouts in turn.

    python benchmarks/bench_serve_ab.py --before /tmp/base/src             # 16 clients, 4 rounds each, tiny fp32
    python benchmarks/bench_serve_ab.py --before /tmp/base/src --clients 1 --rounds 4

`--before` is the `src` folder of another checkout (say `git worktree add /tmp/base <commit>`). Each round starts
one server for each side in turn (the before side first on odd rounds, last on even ones), its package taken from
that folder through PYTHONPATH or from this tree, and times C closed-loop clients over 64 streamed greedy
/v1/completions requests of 32 new tokens (bench_serve's `run_level`), the best of 3 passes after a warm-up. A
round's two sides run seconds apart, so that what else the machine does weighs on both; reported are each side's
generated tokens/s per round, their means and the ratio after / before.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(clients: int, model: str) -> float:
    """Tokens/s of the package this process imports, best of 3 passes (run in a child, one side at a time)."""
    import httpx2

    from bench_batch import make_prompts
    from bench_serve import run_level, serving

    async def passes(url: str) -> float:
        limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx2.AsyncClient(timeout=120, limits=limits) as client:
            prompts = make_prompts(64)
            await run_level(client, url, model, prompts[:clients], clients, 32)  # warm-up
            best = 0.0
            for _ in range(3):
                answers, wall = await run_level(client, url, model, prompts, clients, 32)
                best = max(best, sum(a.tokens for a in answers) / wall)
            return best

    with serving(model, "fp32", max(clients, 1), None) as (url, _):
        return asyncio.run(passes(url))


def side(before: Path | None, clients: int, model: str) -> float:
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    if before is not None:
        env["PYTHONPATH"] = str(before)
    out = subprocess.run([sys.executable, __file__, "--child", "--clients", str(clients), "--model", model],
                         env=env, cwd=HERE, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="The src folder of the checkout to compare with.")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.clients, args.model))
        return
    if args.before is None:
        parser.error("--before is required")
    from olmo2kit.model.tiny import build_tiny

    results: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny(Path(tmp) / "tiny", seed=0))
        for round_ in range(args.rounds):
            order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
            for name in order:
                results[name].append(side(args.before.resolve() if name == "before" else None, args.clients, model))
            print(f"round {round_ + 1}: before {results['before'][-1]:,.0f}, after {results['after'][-1]:,.0f} "
                  "tokens/s", file=sys.stderr)
    before, after = statistics.mean(results["before"]), statistics.mean(results["after"])
    print(f"| clients | before, tokens/s (rounds) | after, tokens/s (rounds) | after / before |\n|---|---|---|---|\n"
          f"| {args.clients} | {before:,.0f} ({', '.join(f'{v:,.0f}' for v in results['before'])}) | "
          f"{after:,.0f} ({', '.join(f'{v:,.0f}' for v in results['after'])}) | {after / before:.3f} |")


if __name__ == "__main__":
    main()
