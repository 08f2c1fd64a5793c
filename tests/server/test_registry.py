"""Which models a server serves, in process (`create_app` through httpx's ASGI transport): names as
`--model` takes them, loads on first use only with allow_load, the LRU, and 404s with the nearest names.
Models load for real, from the loopback Hub."""

from __future__ import annotations

import asyncio
import shutil
import threading

import httpx2 as httpx
import pytest

from olmo2kit.model.tiny import build_tiny
from olmo2kit.server.app import create_app

REPO = "allenai/OLMo-2-0425-1B"
EARLY, LATE = "stage1-step1000-tokens3B", "stage1-step2000-tokens5B"


@pytest.fixture(scope="module")
def second_tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-seed1") / "tiny", seed=1)


@pytest.fixture
def checkpoints(hub, hub_env, tiny_path, second_tiny):
    """The repo with two training checkpoints (two different tiny models) and main."""
    hub.add_repo(REPO, {"main": tiny_path, EARLY: tiny_path, LATE: second_tiny})
    return hub


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://olmo2kit") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def complete(app, model: str, prompt: str = "Hello", **options) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, **options}
    return call(app, "POST", "/v1/completions", json=body)


def served_ids(app) -> list[str]:
    return [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]]


def test_a_model_is_found_by_any_name_that_resolves_to_it(checkpoints):
    app = create_app([f"1b@{EARLY}"], dtype="fp32")
    assert served_ids(app) == [f"1b@{EARLY}"]
    for name in (f"1b@{EARLY}", f"{REPO}@{EARLY}"):
        response = complete(app, name)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
    assert len(app.state.registry.loaded) == 1


def test_without_allow_load_only_the_named_models_are_served(checkpoints, tiny_path):
    app = create_app([f"{REPO}@{EARLY}"], dtype="fp32")
    for name, hint in ((f"{REPO}@{LATE}", f"{REPO}@{EARLY}"), (str(tiny_path), f"{REPO}@{EARLY}"),
                       ("not a model", "served")):
        response = complete(app, name)
        assert response.status_code == 404
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("model", "model_not_found")
        assert hint in error["message"]
    assert len(app.state.registry.loaded) == 1  # nothing else was loaded


def test_allow_load_loads_hub_checkpoints_on_first_use_in_an_lru(checkpoints, tiny_path):
    app = create_app([], dtype="fp32", allow_load=True, max_models=1, preload=False)
    early = complete(app, f"{REPO}@{EARLY}")
    assert early.status_code == 200, early.text
    late = complete(app, f"{REPO}@{LATE}")
    assert late.status_code == 200, late.text
    assert early.json()["choices"][0]["text"] != late.json()["choices"][0]["text"]  # two different checkpoints
    assert served_ids(app) == [f"{REPO}@{LATE}"]  # the least recently used one was unloaded to make room
    again = complete(app, f"{REPO}@{EARLY}")
    assert again.json()["choices"][0]["text"] == early.json()["choices"][0]["text"]
    local = complete(app, str(tiny_path))  # a directory the operator did not name stays out of reach
    assert local.status_code == 404
    assert "named at start-up" in local.json()["error"]["message"]


def test_an_unknown_revision_is_a_404_naming_the_nearest(checkpoints):
    app = create_app([], dtype="fp32", allow_load=True, preload=False)
    response = complete(app, f"{REPO}@stage1-step1001-tokens3B")
    assert response.status_code == 404, response.text
    assert EARLY in response.json()["error"]["message"]
    assert not app.state.registry.loaded


def test_named_models_load_on_first_use_without_preload(checkpoints):
    app = create_app([f"{REPO}@{EARLY}", f"{REPO}@{LATE}"], dtype="fp32", preload=False)
    assert not app.state.registry.loaded
    assert served_ids(app) == [f"{REPO}@{EARLY}", f"{REPO}@{LATE}"]
    assert complete(app, f"{REPO}@{LATE}").status_code == 200
    assert list(app.state.registry.loaded) == [f"{REPO}@{LATE}"]


def test_a_model_in_memory_is_served_under_its_name(tiny):
    app = create_app(loaded={"mine": tiny})
    response = complete(app, "mine", max_tokens=3)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


def test_a_new_model_waits_for_no_busy_one_it_answers_503(checkpoints):
    from olmo2kit.inference.batching import BatchRequest
    from olmo2kit.server.registry import ModelsBusy

    app = create_app([f"{REPO}@{EARLY}"], dtype="fp32", allow_load=True, max_models=1)
    registry = app.state.registry
    (busy,) = registry.loaded.values()
    gate = threading.Event()  # the scheduler's thread waits here on the request's first event: busy till set
    handle = busy.scheduler.submit(BatchRequest([1, 2, 3], 900), lambda event: gate.wait(30))
    try:
        with pytest.raises(ModelsBusy, match="busy"):
            asyncio.run(registry.get(f"{REPO}@{LATE}"))
        response = complete(app, f"{REPO}@{LATE}")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert list(registry.loaded.values()) == [busy]  # not unloaded under a running request
    finally:
        handle.cancel()
        gate.set()


def test_a_directory_is_served_under_the_name_given_or_its_folders_name(tiny_path, tmp_path, monkeypatch):
    twin = tmp_path / "elsewhere" / tiny_path.name  # another folder of the same name
    shutil.copytree(tiny_path, twin)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    app = create_app([str(tiny_path), str(twin), "../elsewhere"], dtype="fp32", preload=False)
    assert served_ids(app) == [tiny_path.name, f"elsewhere/{tiny_path.name}", "../elsewhere"]
    response = complete(app, f"elsewhere/{tiny_path.name}")  # loaded by the path it was given
    assert response.status_code == 200, response.text
    assert str(tmp_path) not in call(app, "GET", "/v1/models").text
