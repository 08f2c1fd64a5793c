"""Does one heavy request stall the others? `/health` latency while heavy requests run on `olmo2kit serve`.

    python benchmarks/bench_isolation.py                       # tiny checkpoint, fp32, CPU
    PYTHONPATH=/path/to/other/src python benchmarks/bench_isolation.py   # the same against another checkout

The server runs as a subprocess on loopback (bench_serve's `serving`). A client polls GET /health every 50 ms,
timing each answer, while others send, a few at a time, each kind of heavy request the server must refuse or
bound: a `response_format` schema nested 450 deep, one 31 deep (as deep as the server compiles), a 4 MB text
prompt, a prompt of 2 million token ids, and a 4 MB chat message. Reported per kind: the requests' status codes
and seconds, and /health's p50, p99 and largest latency while they ran; with none running, the same for a
baseline. Target (the hardening issue): /health under 1 s throughout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2

from bench_serve import serving
from olmo2kit.model.tiny import build_tiny


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def heavy_requests(model: str) -> dict[str, tuple[str, dict]]:
    chat = "/chat/completions"

    def schema(depth: int) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(depth)}}}

    return {
        "schema 450 deep": (chat, schema(450)),
        "schema 31 deep (compiled)": (chat, schema(31)),
        "4 MB prompt": ("/completions", {"model": model, "prompt": "x " * 2_000_000, "max_tokens": 1}),
        "2 M token ids": ("/completions", {"model": model, "prompt": list(range(200)) * 10_000, "max_tokens": 1}),
        "4 MB chat message": (chat, {"model": model, "messages": [{"role": "user", "content": "word " * 800_000}],
                                     "max_tokens": 1}),
    }


def health_while(root: str, work) -> tuple[list[float], object]:
    """/health latencies (seconds) polled every 50 ms while `work()` runs, and what it returned."""
    done = threading.Event()
    latencies: list[float] = []

    def poll():
        while not done.is_set():
            start = time.perf_counter()
            httpx2.get(f"{root}/health", timeout=120)
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        result = work()
    finally:
        done.set()
        poller.join()
    return latencies, result


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"polls": len(ordered), "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max_ms": 1000 * ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="A checkpoint directory (default: build a tiny one in a temporary directory).")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--concurrent", type=int, default=4, help="Heavy requests of a kind in flight at once.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import olmo2kit

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny(Path(tmp) / "tiny", seed=0, instruct=True))
        rows = []
        with serving(model, args.dtype, 16, None) as (url, _):
            root = url.removesuffix("/v1")
            idle, _ = health_while(root, lambda: time.sleep(3))
            rows.append({"kind": "none (idle)", "statuses": "", "seconds": 0.0, **summary(idle)})
            for kind, (path, body) in heavy_requests(model).items():
                def send(_, path=path, body=body):
                    start = time.perf_counter()
                    answer = httpx2.post(url + path, json=body, timeout=600)
                    return answer.status_code, time.perf_counter() - start

                def work(send=send):
                    with ThreadPoolExecutor(args.concurrent) as pool:
                        return list(pool.map(send, range(args.concurrent)))

                latencies, answers = health_while(root, work)
                statuses = ",".join(sorted({str(status) for status, _ in answers}))
                rows.append({"kind": kind, "statuses": statuses, "seconds": max(s for _, s in answers),
                             **summary(latencies)})
    print(f"olmo2kit {olmo2kit.__version__} from {Path(olmo2kit.__file__).parent}, {args.concurrent} at once",
          file=sys.stderr)
    print("| heavy requests | status | slowest answer | /health polls | p50 | p99 | largest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['statuses']} | {r['seconds']:.2f} s | {r['polls']} | {r['p50_ms']:.1f} ms | "
              f"{r['p99_ms']:.1f} ms | {r['max_ms']:.1f} ms |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
