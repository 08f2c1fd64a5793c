"""Scoring on llama.cpp: perplexity, lm-eval's requests (directly, not through the server) and sweeps on the
llama.cpp engine give transformers' numbers on the tiny checkpoint's f32 GGUF, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub import REPO
from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.perplexity import perplexity
from olmo2kit.evals.sweep import read_results
from olmo2kit.evals.tasks import _harness_model, evaluate_tasks
from olmo2kit.inference.engines import engine_for
from olmo2kit.inference.generation import generate
from olmo2kit.model.gguf import gguf_cache_dir
from olmo2kit.model.loading import load

pytestmark = pytest.mark.usefixtures("one_thread")  # transformers' side: the tiny model is fastest on one thread

TASKS = Path(__file__).parents[1] / "evals" / "lm_eval_tasks"  # olmo2kit_tiny_mc: 8 questions from a local file
# Over two of the tiny model's 1024-token contexts: perplexity's windows hold 1024 tokens, two llama.cpp batches.
TEXT = "".join(f"Line {i}: language modeling is the task of predicting the next word, {i * 7 % 13} times.\n"
               for i in range(70))
# lm-eval's log-likelihoods and perplexity on llama.cpp's f32 GGUF against transformers' fp32, relative.
NLL_TOLERANCE = 1e-3


def test_perplexity_on_llamacpp_equals_transformers(llamacpp_tiny, tiny):
    ours, theirs = perplexity(*llamacpp_tiny, TEXT), perplexity(*tiny, TEXT)
    assert ours.tokens == theirs.tokens > 2 * 1024 and ours.windows == theirs.windows == 4
    assert ours.nll == pytest.approx(theirs.nll, rel=NLL_TOLERANCE)
    assert ours.bits_per_byte == pytest.approx(theirs.bits_per_byte, rel=NLL_TOLERANCE)


def test_windows_read_together_score_as_one_at_a_time(llamacpp_tiny, tiny):
    """Short windows share one llama.cpp decode (sequences of one cache), long ones span several; each window is
    scored as transformers scores it alone, and the scorer is reused from call to call."""
    model, tokenizer = llamacpp_tiny
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    windows = [(ids[:1025], 1), (ids[3:40], 30), (ids[100:101], 1), (ids[200:230], 1), (ids[5:700], 600),
               *((ids[i:i + 60], 20) for i in range(0, 1200, 50))]
    engine = engine_for(model, tokenizer)
    ours = engine.scored_nll(windows)
    assert engine.scored_nll(windows[:2]) == ours[:2]
    # transformers reads the 1025th token too, which only its own logits (unused) see: the same 1024 predictions.
    theirs = engine_for(*tiny).scored_nll(windows)
    assert ours[2] == 0.0  # nothing to score
    assert ours == pytest.approx(theirs, rel=NLL_TOLERANCE)
    for window in ((ids[:1026], 1), (ids[:10], 0)):  # over the cache less its unread last token; no context
        with pytest.raises(Olmo2KitError, match="cannot be scored"):
            engine.scored_nll([window])


def _requests(kind: str, *arguments: tuple) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_lm_eval_requests_on_llamacpp_equal_transformers(llamacpp_tiny, tiny):
    """lm-eval's three request kinds, answered on llama.cpp as lm-eval's HFLM answers them on transformers: an empty
    context, one cut to the context from the left, a continuation that is the greedy one, a rolling log-likelihood
    over several windows, and greedy text cut at a stop string."""
    ours, theirs = _harness_model(*llamacpp_tiny, 1), _harness_model(*tiny, 4)
    assert type(ours).__name__ == "LlamaCppLM" and ours.max_length == theirs.max_length == 1024
    fox = "The quick brown fox"
    pairs = _requests("loglikelihood", ("The capital of France is", " Paris"), ("The capital of France is ", "Rome"),
                      ("", "Language modeling"), ("Line 3:", " language modeling is the task"),
                      (TEXT, " Line 70: the end."), (fox, generate(*tiny, fox, do_sample=False, max_new_tokens=3).text))
    mine, reference = ours.loglikelihood(pairs), theirs.loglikelihood(pairs)
    assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in reference], rel=NLL_TOLERANCE)
    assert [greedy for _, greedy in mine] == [greedy for _, greedy in reference] == [False] * 5 + [True]
    rolling = _requests("loglikelihood_rolling", (TEXT,), ("Hello, world!",))
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling),
                                                                rel=NLL_TOLERANCE)

    prompts = ["Line 1: language modeling is", "Hello, world! 1 2 3", "The capital of France is"]
    whole = ours.generate_until(_requests("generate_until", *((p, {"do_sample": False, "max_gen_toks": 12})
                                                             for p in prompts)))
    stops = [next(w[i:i + 2] for i in range(2, len(w) - 1) if "\ufffd" not in w[i:i + 2]) for w in whole]
    asked = _requests("generate_until", *((p, {"until": [stop], "do_sample": False, "max_gen_toks": 12})
                                          for p, stop in zip(prompts, stops, strict=True)))
    texts = ours.generate_until(asked)
    assert texts == theirs.generate_until(asked)
    assert texts == [w[:w.index(stop)] for w, stop in zip(whole, stops, strict=True)] != whole


@pytest.fixture
def offline(offline_hub, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return offline_hub


def test_cli_eval_and_perplexity_on_llamacpp(cli, tiny_path, tiny, offline, tmp_path):
    args = ["--model", str(tiny_path), "--engine", "llamacpp", "--dtype", "fp32", "--json"]
    code, out, err = cli("eval", "--tasks", "olmo2kit_tiny_mc", "--include-path", str(TASKS), *args)
    assert code == 0, err
    report = json.loads(out)
    assert report["engine"] == "llamacpp"
    reference = evaluate_tasks(*tiny, "olmo2kit_tiny_mc", include_path=TASKS)
    assert {(s["metric"], s["value"], s["samples"]) for s in report["scores"]} == \
        {(s.metric, s.value, s.samples) for s in reference}

    (tmp_path / "t.txt").write_text(TEXT)
    code, out, err = cli("perplexity", str(tmp_path / "t.txt"), *args)
    assert code == 0, err
    report = json.loads(out)
    assert report["engine"] == "llamacpp" and "(GGUF f32, cpu, llamacpp)" in err
    assert report["total"]["nll"] == pytest.approx(perplexity(*tiny, TEXT).nll, rel=NLL_TOLERANCE)


def test_sweep_on_llamacpp_measures_and_frees_the_gguf(hub, hub_env, cli, tmp_path):
    revision = "stage1-step1000-tokens3B"
    data, out = tmp_path / "t.txt", tmp_path / "ppl.jsonl"
    data.write_text(TEXT)
    expected = perplexity(*load(REPO, revision=revision, dtype="fp32", device="cpu"), TEXT).perplexity
    code, _, err = cli("sweep", "--model", REPO, "--revisions", revision, "--data", str(data), "--out", str(out),
                       "--engine", "llamacpp", "--dtype", "fp32", "--delete-after")
    assert code == 0, err
    [row] = read_results(out)
    assert row["engine"] == "llamacpp" and row["setup"]["dtype"] == "f32"
    assert row["value"] == pytest.approx(expected, rel=NLL_TOLERANCE)
    assert not list((gguf_cache_dir() / ("models--" + REPO.replace("/", "--"))).rglob("*.gguf*"))
