"""lm-evaluation-harness scoring through the server, as a researcher points it at an API: its own
`local-completions` client (echo and logprobs over token ids) against `olmo2kit serve` gives the scores
the harness gives on the model in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from olmo2kit.evals.tasks import evaluate_tasks

TASKS = Path(__file__).parents[1] / "evals" / "lm_eval_tasks"  # olmo2kit_tiny_mc: 8 questions from a local file


def test_lm_eval_local_completions_scores_through_the_server_as_in_memory(server, tiny, tiny_path, offline_hub,
                                                                          monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = tiny
    in_memory = {s.metric: s.value for s in evaluate_tasks(model, tokenizer, "olmo2kit_tiny_mc", include_path=TASKS)}
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": str(tiny_path), "base_url": f"{server.url}/completions", "tokenizer": str(tiny_path),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 4},
        tasks=["olmo2kit_tiny_mc"], task_manager=TaskManager(include_path=str(TASKS)),
    )
    scores = results["results"]["olmo2kit_tiny_mc"]
    assert scores["acc,none"] == pytest.approx(in_memory["acc"])
    assert scores["acc_norm,none"] == pytest.approx(in_memory["acc_norm"])
    assert 0 < in_memory["acc_norm"] < 1 or 0 < in_memory["acc"] < 1  # a score that tells right from wrong
