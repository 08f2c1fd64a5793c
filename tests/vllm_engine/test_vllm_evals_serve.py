"""vLLM behind olmo2kit's evaluation and serving, each command in a process of its own: perplexity through
vLLM's prompt logprobs, lm-eval's own vLLM class on the local task, a sweep over Hub revisions, bench, and
`serve --engine vllm` called by the official openai client; each against transformers. The served model keeps
olmo2kit's edges: no path of the server in /v1/models, half a request closed, SIGTERM ending a stream with the error
object within the grace."""

import json
import shutil
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import one_line_error
from olmo2kit.evals.perplexity import perplexity
from olmo2kit.inference.generation import generate
from olmo2kit.model.vllm import vllm_version
from olmo2kit.server.app import SHUTDOWN_GRACE_S
from serving import serving

from .conftest import VLLM_ENV
from .test_vllm_cli import ON_TRANSFORMERS, ON_VLLM, olmo2kit

TASKS = Path(__file__).parents[1] / "evals" / "lm_eval_tasks"  # olmo2kit_tiny_mc: 8 questions from a local file
TEXT = "Language modeling is the task of predicting the next word in a sequence of text. " * 4
SWEEP = "org/sweep64"
BRANCHES = {"stage1-step1000-tokens3B": 1, "stage1-step2000-tokens5B": 2}


def test_perplexity_agrees_with_transformers(tiny64, tiny64_path, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    args = ("perplexity", str(data), "--model", str(tiny64_path), "--max-length", "16", "--stride", "8", "--json")
    on_vllm, on_transformers = olmo2kit(*args, *ON_VLLM), olmo2kit(*args, *ON_TRANSFORMERS)
    assert on_vllm.returncode == 0 == on_transformers.returncode, on_vllm.stderr + on_transformers.stderr
    by_vllm, by_transformers = json.loads(on_vllm.stdout), json.loads(on_transformers.stdout)
    total_vllm, total_transformers = by_vllm["total"], by_transformers["total"]
    assert total_vllm["tokens"] == total_transformers["tokens"] > 16  # several windows
    assert total_vllm["perplexity"] == pytest.approx(total_transformers["perplexity"], rel=1e-4)
    in_process = perplexity(*tiny64, TEXT, max_length=16, stride=8)
    assert total_transformers["perplexity"] == pytest.approx(in_process.perplexity, rel=1e-6)
    assert (by_vllm["engine"], by_vllm["engine_version"]) == ("vllm", vllm_version())


def test_eval_on_vllm_gives_transformers_accuracy(tiny64_path, tmp_path):
    args = ("eval", "--model", str(tiny64_path), "--tasks", "olmo2kit_tiny_mc", "--include-path", str(TASKS),
            "--json")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    on_vllm = olmo2kit(*args, *ON_VLLM, env=offline)
    on_transformers = olmo2kit(*args, *ON_TRANSFORMERS, env=offline)
    assert on_vllm.returncode == 0 == on_transformers.returncode, on_vllm.stderr + on_transformers.stderr
    by_vllm, by_transformers = json.loads(on_vllm.stdout), json.loads(on_transformers.stdout)
    scores = {engine: {(s["task"], s["metric"]): s["value"] for s in result["scores"]}
              for engine, result in (("vllm", by_vllm), ("transformers", by_transformers))}
    assert ("olmo2kit_tiny_mc", "acc") in scores["vllm"]
    assert scores["vllm"] == scores["transformers"]
    assert by_vllm["engine"] == "vllm" and by_transformers["engine"] == "transformers"


@pytest.fixture(scope="module")
def sweep_repo(hub_server, tmp_path_factory):
    """org/sweep64 on the loopback Hub: two revisions, each a head-64 tiny checkpoint of its own seed."""
    from olmo2kit.model.tiny import build_tiny

    root = tmp_path_factory.mktemp("sweep64")
    built = {name: build_tiny(root / name, head_dim=64, seed=seed) for name, seed in BRANCHES.items()}
    hub_server.add_repo(SWEEP, {**built, "main": built[list(BRANCHES)[-1]]})
    return built


def test_sweep_on_vllm_measures_each_revision_as_transformers(sweep_repo, hub_env, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    rows = {}
    for engine, options in (("vllm", ON_VLLM), ("transformers", ON_TRANSFORMERS)):
        out = tmp_path / f"{engine}.jsonl"
        result = olmo2kit("sweep", "--model", SWEEP, "--data", str(data), "--out", str(out), *options,
                          env={**hub_env, **VLLM_ENV})
        assert result.returncode == 0, result.stderr
        rows[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["revision"] for r in rows["vllm"]] == list(BRANCHES) == [r["revision"] for r in rows["transformers"]]
    for on_vllm, on_transformers in zip(rows["vllm"], rows["transformers"], strict=True):
        assert on_vllm["value"] == pytest.approx(on_transformers["value"], rel=1e-4)
        assert (on_vllm["engine"], on_transformers["engine"]) == ("vllm", "transformers")
    assert rows["vllm"][0]["value"] != pytest.approx(rows["vllm"][1]["value"], rel=1e-3)  # each its own weights


def test_bench_on_vllm_reports_its_engine(tiny64_path):
    result = olmo2kit("bench", "--model", str(tiny64_path), "--new-tokens", "4", "--prompt-len", "8", "--repeat", "1",
                      "--json", *ON_VLLM)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["engine"], report["engine_version"]) == ("vllm", vllm_version())
    assert report["decode_tokens_per_s"] > 0 and report["ttft_s"] > 0 and report["peak_memory_gb"] is None


@pytest.fixture(scope="module")
def long_instruct_path(tiny64_instruct_path, tmp_path_factory) -> Path:
    """The head-64 instruct checkpoint with a 16384-token context (RoPE takes any position): a stream long
    enough to outlast the shutdown grace. Its greedy text is the checkpoint's own."""
    path = tmp_path_factory.mktemp("ckpt64-long") / "tiny-64-long"
    shutil.copytree(tiny64_instruct_path, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    return path


def test_serve_on_vllm_answers_the_openai_client_as_transformers(tiny64_instruct, long_instruct_path):
    from openai import OpenAI

    prompt, messages = "Language modeling is ", [{"role": "user", "content": "What is OLMo?"}]
    name = long_instruct_path.name  # a directory named by its absolute path is served under its folder's name
    with serving("--model", str(long_instruct_path), *ON_VLLM, "--header-timeout", "2", env=VLLM_ENV,
                 timeout=300) as server:
        deadline = time.monotonic() + 300
        while not healthy(server.root):  # vLLM's server answers once its engine has started
            assert server.process.poll() is None and time.monotonic() < deadline, "".join(server.stderr)
            time.sleep(0.5)
        client = OpenAI(base_url=server.url, api_key="unused")
        assert [m.id for m in client.models.list().data] == [name]
        with urllib.request.urlopen(f"{server.url}/models", timeout=30) as listing:
            assert str(long_instruct_path.parent) not in listing.read().decode()  # vLLM's `root` included
        ids = {"extra_body": {"return_token_ids": True}}  # vLLM's server gives the generated token ids too
        completion = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, **ids)
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0, **ids)
        assert half_a_request_line_is_closed(server.root, within=2 + 5)
        seconds, events, returncode = sigterm_mid_stream(server, client, name)
    assert seconds < SHUTDOWN_GRACE_S + 10, seconds  # the grace, then vLLM's teardown; it was 119 s
    assert returncode == 0
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "unavailable", events[-3:]
    expected = generate(*tiny64_instruct, prompt, do_sample=False, max_new_tokens=10)
    assert completion.choices[0].token_ids == expected.token_ids
    assert completion.choices[0].text == held_back(expected.text)
    assert completion.usage.completion_tokens == expected.new_tokens
    expected_chat = generate(*tiny64_instruct, messages=messages, do_sample=False, max_new_tokens=10)
    assert chat.choices[0].token_ids == expected_chat.token_ids
    assert chat.choices[0].message.content == held_back(expected_chat.text)
    assert chat.usage.prompt_tokens == expected_chat.prompt_tokens


def half_a_request_line_is_closed(root: str, within: float) -> bool:
    host, port = root.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=within) as sock:
        sock.sendall(b"GET /hea")
        return sock.recv(1024) == b""


def sigterm_mid_stream(server, client, name: str) -> tuple[float, list[str], int]:
    """SIGTERM while a long stream runs: the seconds to the exit, the stream's events (what follows `data: `), and
    the exit code."""
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with client.completions.with_streaming_response.create(model=name, prompt="Hello", max_tokens=15000,
                                                               stream=True, temperature=0) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) >= 3:
                        started.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert started.wait(120), events
    seconds = server.stop(signal.SIGTERM, timeout=120)
    reader.join(30)
    assert not reader.is_alive()
    return seconds, events, server.process.returncode


def held_back(text: str) -> str:
    """`text` as vLLM's server writes it: its detokenizer holds back the bytes of an unfinished UTF-8 character
    at the end of a reply, where olmo2kit (and `tokenizer.decode`) show them as U+FFFD. The random tiny models
    end replies mid-character often; a trained model rarely does."""
    return text.rstrip("\ufffd")


def healthy(root: str) -> bool:
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_vllm_on_a_head_size_its_cpu_attention_lacks_is_one_line(tiny_path):
    result = olmo2kit("generate", "Hi", "--model", str(tiny_path), "--engine", "vllm", "--device", "cpu")
    one_line_error(result.returncode, result.stderr, "head sizes", alone=False)
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_serve_on_vllm_takes_one_model(tiny64_path):
    result = olmo2kit("serve", "--model", str(tiny64_path), "--model", "1b", "--engine", "vllm", "--port", "0")
    one_line_error(result.returncode, result.stderr, "one model", alone=True)


def test_serve_on_vllm_refuses_max_models(tiny64_path):
    for models in ("1", "2"):  # README: no --max-models with --engine vllm
        result = olmo2kit("serve", "--model", str(tiny64_path), "--engine", "vllm", "--max-models", models,
                          "--port", "0")
        one_line_error(result.returncode, result.stderr, "--max-models", alone=True)
