"""download, cached_revisions and remove_revision against the loopback Hub, with a fresh cache per test."""

import json
import re
from pathlib import Path

import pytest

from hub import REPO
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.hub_cache import cached_revisions, download, remove_revision

REV = "stage1-step1000-tokens3B"


def test_download_fetches_what_load_reads_with_progress_then_nothing_more(hub, hub_env):
    seen = []
    path = download(REPO, REV, progress=lambda done, total: seen.append((done, total)))
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    total = seen[0][1]
    assert total > 0 and seen[0][0] == 0 and seen[-1] == (total, total)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)  # bytes only go up
    weights = (path / "model.safetensors").stat().st_size
    assert total >= weights
    downloads = hub.count("/lfs")
    assert downloads >= 1
    again = []
    assert download(f"{REPO}@{REV}", progress=lambda done, total: again.append((done, total))) == path
    assert again == [(total, total)] and hub.count("/lfs") == downloads  # all cached: nothing fetched


def test_a_downloaded_revision_loads_offline(hub, hub_env, monkeypatch):
    from huggingface_hub import constants

    from olmo2kit.model.loading import load

    download(REPO, REV)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _ = load(REPO, revision=REV, dtype="fp32", device="cpu")
    assert model.config.model_type == "olmo2"


def test_a_cached_revision_is_its_own_download_offline_or_with_the_hub_down(hub, hub_env, monkeypatch):
    from huggingface_hub import constants

    path = download(REPO, REV)
    asked = hub.count()
    with monkeypatch.context() as m:
        m.setattr(constants, "HF_HUB_OFFLINE", True)
        assert download(REPO, REV) == path and hub.count() == asked  # the Hub is not asked
        with pytest.raises(Olmo2KitError, match="not in the local cache and huggingface_hub is in offline mode"):
            download(REPO, "main")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert download(f"{REPO}@{REV}") == path
    with pytest.raises(Olmo2KitError, match="not in the local cache and the Hub cannot be reached"):
        download(REPO, "main")


def test_cache_lists_and_removes_a_revision(hub, hub_env):
    assert cached_revisions() == []
    download(REPO, REV)
    download(REPO, "main")
    listed = cached_revisions(REPO)
    assert {ref for r in listed for ref in r.refs} == {REV, "main"}
    assert all(r.repo == REPO and r.size_bytes > 0 and r.files >= 3 for r in listed)
    assert remove_revision(REPO, REV) > 0
    assert [r.refs for r in cached_revisions(REPO)] == [("main",)]
    with pytest.raises(Olmo2KitError, match=f"the cache holds no revision '{REV}' of {REPO}"):
        remove_revision(REPO, REV)


def test_download_errors_are_one_line(hub, hub_env, tiny_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(Olmo2KitError, match="not found on the Hub"):
        download("org/missing")
    with pytest.raises(Olmo2KitError, match="stage1-step1000-tokens3B"):  # names the nearest real branch
        download(REPO, "stage1-step1001-tokens3B")
    with pytest.raises(Olmo2KitError, match="is a local directory"):
        download(str(tiny_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Olmo2KitError, match="offline mode"):
        download(REPO)


def test_download_and_cache_commands(cli, hub, hub_env):
    code, out, err = cli("download", f"{REPO}@{REV}")
    assert code == 0, err
    assert (Path(out.strip()) / "config.json").is_file()
    total = sum(p.stat().st_size for p in Path(out.strip()).iterdir()) // 1000
    assert re.search(rf"\] {total}/{total}  [0-9.]+ kB/s  ETA 0:00:00", err), err  # the bar's last line
    code, out, _ = cli("cache", "--json")
    assert code == 0 and [(r["repo"], r["refs"]) for r in json.loads(out)] == [(REPO, [REV])]
    code, out, _ = cli("cache")
    assert code == 0 and REV in out and REPO in out
    code, _, err = cli("cache", REPO, "--remove", REV)
    assert code == 0 and f"removed {REPO}@{REV}, freed" in err
    code, _, err = cli("cache", REPO, "--remove", REV)
    assert code == 2 and err.startswith("error: the cache holds no revision")
    code, _, err = cli("cache", "--remove", REV)
    assert code == 2 and "needs the MODEL" in err
    code, _, err = cli("download", "org/missing")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: org/missing not found on the Hub")
