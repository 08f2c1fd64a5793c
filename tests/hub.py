"""A loopback Hugging Face Hub: the part of the Hub API that huggingface_hub's downloads use.

It speaks HTTP on 127.0.0.1, so huggingface_hub, transformers and olmo2kit run their real
code against it (HF_ENDPOINT points at it); nothing is mocked. Served, as huggingface_hub
2.4 reads them (huggingface_hub/hf_api.py, file_download.py, _snapshot_download.py):

  GET  /api/models/{repo}/refs                    branches and tags (HfApi.list_repo_refs)
  GET  /api/models/{repo}[/revision/{rev}]        repo info with sha and siblings (snapshot_download)
  GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (list_repo_tree, list_repo_files)
  HEAD/GET /{repo}/resolve/{rev}/{file}           a file, with X-Repo-Commit and ETag; a
                                                  .safetensors file is LFS: 302 to the CDN with
                                                  X-Linked-Etag (its sha256) and X-Linked-Size
  GET  /api/agent-harnesses                      an empty registry (huggingface_hub's user agent)
  GET  /lfs/{sha256}                              the CDN, on a second port (another origin, so
                                                  huggingface_hub reads the metadata off the
                                                  redirect and drops the token, as with the Hub)

Errors carry the Hub's X-Error-Code: RepoNotFound (401, as the Hub answers anonymous
callers), GatedRepo (401 without a token, 403 with a wrong one), RevisionNotFound and
EntryNotFound (404). Every request is logged, so tests can count them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

TOKEN = "hf_loopbackTestToken0123456789"  # the one token the gated repo accepts


@dataclass
class HubRepo:
    """A repo: its refs, and the files of each commit that has any."""

    repo_id: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit
    tags: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> content
    gated: bool = False

    def commit_of(self, revision: str) -> str | None:
        if revision in self.files or revision in self.branches.values() or revision in self.tags.values():
            return revision
        return self.branches.get(revision) or self.tags.get(revision)


def commit_for(repo_id: str, name: str) -> str:
    """The (made-up, stable) commit sha a branch of a loopback repo points at."""
    return hashlib.sha1(f"{repo_id}@{name}".encode()).hexdigest()


def read_checkpoint(path: Path) -> dict[str, bytes]:
    """Every file under `path`, keyed by its path relative to it."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def olmo_branch_names(n: int = 1000) -> list[str]:
    """`n` (100 or more) branch names shaped like OLMo 2 1B's, in no particular order:
    stage 1 every 1,000 steps, three stage-2 runs of 33 checkpoints, and main."""
    steps = range(1000, 34_000, 1000)
    stage2 = [f"stage2-ingredient{k}-step{s}-tokens{_tokens_b(s)}B" for k in (1, 2, 3) for s in steps]
    stage1 = [f"stage1-step{s}-tokens{_tokens_b(s)}B" for s in range(1000, 1000 * (n - len(stage2)), 1000)]
    return stage2[::2] + stage1[::-1] + ["main"] + stage2[1::2]


def _tokens_b(step: int) -> int:
    return -(-step * 2_097_152 // 10**9)  # 1B's batch in tokens; rounded up, as the Hub names are


class LoopbackHub:
    """The Hub on loopback: add repos, start it, point HF_ENDPOINT at `url`.

    >>> with LoopbackHub() as hub:  # doctest: +SKIP
    ...     hub.add_branches("org/big", olmo_branch_names(1000))
    ...     os.environ["HF_ENDPOINT"] = hub.url
    """

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path), in arrival order
        self.unhandled: list[tuple[str, str]] = []  # requests for endpoints this Hub does not speak
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._lfs: dict[str, bytes] = {}  # sha256 -> content, what the CDN serves

    def add_repo(
        self,
        repo_id: str,
        revisions: dict[str, Path | dict[str, bytes] | None],
        *,
        tags: dict[str, Path | dict[str, bytes] | None] | None = None,
        gated: bool = False,
    ) -> HubRepo:
        """A repo whose branches (and tags) serve the given checkpoint directories (or no files: None)."""
        repo = HubRepo(repo_id, gated=gated)
        for refs, specs in ((repo.branches, revisions), (repo.tags, tags or {})):
            for name, files in specs.items():
                commit = commit_for(repo_id, name)
                refs[name] = commit
                if files is not None:
                    repo.files[commit] = read_checkpoint(files) if isinstance(files, Path) else dict(files)
                    for path, content in repo.files[commit].items():
                        if _is_lfs(path):
                            self._lfs[hashlib.sha256(content).hexdigest()] = content
        self.repos[repo_id] = repo
        return repo

    def add_branches(self, repo_id: str, names: list[str], *, gated: bool = False) -> HubRepo:
        """A repo of branches with names only (for listing)."""
        return self.add_repo(repo_id, dict.fromkeys(names), gated=gated)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_port}"

    def count(self, prefix: str = "/", method: str | None = None) -> int:
        """Requests so far whose path starts with `prefix` (and whose method is `method`)."""
        with self._lock:
            return sum(1 for m, p in self.requests if p.startswith(prefix) and method in (None, m))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unhandled.clear()

    def start(self) -> LoopbackHub:
        for _ in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub = self  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _log(self, method: str, path: str, handled: bool) -> None:
        with self._lock:
            self.requests.append((method, path))
            if not handled:
                self.unhandled.append((method, path))


def _is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".pt"))


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server_version = "LoopbackHub/1"

    def log_message(self, format, *args) -> None:  # the request log is the Hub's, not stderr
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        hub: LoopbackHub = self.server.hub  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        parts = [unquote(p) for p in path.strip("/").split("/")]
        handled = True
        try:
            if parts == ["api", "agent-harnesses"]:  # huggingface_hub's user-agent asks once a day
                status, headers, body = _json({"standardEnvVars": [], "harnesses": {}})
            elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                status, headers, body = self._api(hub, parts[2] + "/" + parts[3], parts[4:])
            elif len(parts) >= 5 and parts[2] == "resolve":
                repo_id, revision, file = parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:])
                status, headers, body = self._resolve(hub, repo_id, revision, file)
            elif len(parts) == 2 and parts[0] == "lfs" and parts[1] in hub._lfs:
                status, headers, body = 200, {}, hub._lfs[parts[1]]
            else:
                handled = False
                raise _HubError(404, None, f"no route for {path}")
        except _HubError as e:
            status, body = e.status, json.dumps({"error": e.message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
        hub._log(self.command, path, handled)
        self.send_response(status)
        headers.setdefault("Content-Type", "application/octet-stream")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _repo(self, hub: LoopbackHub, repo_id: str) -> HubRepo:
        repo = hub.repos.get(repo_id)
        if repo is None:
            raise _HubError(401, "RepoNotFound", "Repository not found")
        if repo.gated:
            auth = self.headers.get("Authorization")
            if auth is None:
                raise _HubError(401, "GatedRepo", f"Access to model {repo_id} is restricted: log in")
            if auth != f"Bearer {TOKEN}":
                raise _HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted: ask for access")
        return repo

    def _commit(self, repo: HubRepo, revision: str) -> str:
        commit = repo.commit_of(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(self, hub: LoopbackHub, repo_id: str, rest: list[str]) -> tuple[int, dict, bytes]:
        repo = self._repo(hub, repo_id)
        if rest == ["refs"]:
            return _json(
                {
                    "branches": _refs_json(repo.branches, "heads"),
                    "tags": _refs_json(repo.tags, "tags"),
                    "converts": [],
                    "pullRequests": [],
                }
            )
        if rest == [] or (len(rest) == 2 and rest[0] == "revision"):
            commit = self._commit(repo, rest[1] if rest else "main")
            siblings = [{"rfilename": p} for p in repo.files.get(commit, {})]
            info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "tags": []}
            return _json({**info, "gated": "manual" if repo.gated else False, "siblings": siblings})
        if len(rest) >= 2 and rest[0] == "tree":
            commit = self._commit(repo, rest[1])
            files = repo.files.get(commit, {})
            folder = "/".join(rest[2:])
            if folder:
                files = {p: c for p, c in files.items() if p.startswith(folder + "/")}
                if not files:
                    raise _HubError(404, "EntryNotFound", f"{folder} does not exist on {rest[1]}")
            return _json([_tree_entry(p, c) for p, c in files.items()])
        raise _HubError(404, None, f"no API route {'/'.join(rest)}")

    def _resolve(self, hub: LoopbackHub, repo_id: str, revision: str, path: str) -> tuple[int, dict, bytes]:
        repo = self._repo(hub, repo_id)
        commit = self._commit(repo, revision)
        content = repo.files.get(commit, {}).get(path)
        if content is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_git_blob_oid(content)}"', "Accept-Ranges": "bytes"}
        if _is_lfs(path):
            sha256 = hashlib.sha256(content).hexdigest()
            headers["X-Linked-Etag"] = f'"{sha256}"'
            headers["X-Linked-Size"] = str(len(content))
            headers["Location"] = f"{hub.cdn_url}/lfs/{sha256}"
            return 302, headers, b""
        return 200, headers, content


def _json(data) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()


def _refs_json(refs: dict[str, str], kind: str) -> list[dict]:
    return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": commit} for n, commit in refs.items()]


def _tree_entry(path: str, content: bytes) -> dict:
    entry = {"type": "file", "oid": _git_blob_oid(content), "size": len(content), "path": path}
    if _is_lfs(path):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
    return entry


# Pytest fixtures: this module is a pytest plugin (conftest.py names it in `pytest_plugins`), so every
# test can ask for hub_server, hub and hub_env.

# Revisions of org/repo, each a tiny checkpoint with its own seed (so its own weights).
REPO = "org/repo"
REPO_REVISIONS = {"stage1-step1000-tokens3B": 1, "stage1-step2000-tokens5B": 2, "main": 2}
BIG = "org/big"
GATED = "org/gated"
MISSING = "org/missing"


@pytest.fixture(scope="session", name="hub_server")
def hub_server_fixture(tmp_path_factory) -> Iterator[LoopbackHub]:
    """The loopback Hub for the whole run: org/repo (loadable), org/big (1,000 names), org/gated."""
    from olmo2kit.model.tiny import build_tiny

    root = tmp_path_factory.mktemp("hub-checkpoints")
    checkpoints = {seed: build_tiny(root / f"seed{seed}", seed=seed) for seed in set(REPO_REVISIONS.values())}
    server = LoopbackHub()
    server.add_repo(REPO, {name: checkpoints[seed] for name, seed in REPO_REVISIONS.items()})
    server.add_branches(BIG, olmo_branch_names(1000))
    server.add_branches(GATED, ["main", "stage1-step1000-tokens3B"], gated=True)
    with server:
        yield server


@pytest.fixture(name="hub")
def hub_fixture(hub_server: LoopbackHub) -> Iterator[LoopbackHub]:
    """The loopback Hub with an empty request log."""
    hub_server.reset()
    yield hub_server
    assert hub_server.unhandled == [], "a client called an endpoint the loopback Hub does not speak"


@pytest.fixture(name="hub_env")
def hub_env_fixture(hub: LoopbackHub, tmp_path, monkeypatch) -> dict[str, str]:
    """Point huggingface_hub at the loopback Hub, with fresh caches and no token, in this process and
    in the environment (for subprocesses). Returns the environment for subprocess.run.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`;
    those constants are patched here for in-process calls.
    """
    from huggingface_hub import constants

    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
        "OLMO2KIT_CACHE_DIR": str(tmp_path / "olmo2kit-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    for name in ("HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "AGENT_HARNESSES_PATH"):
        filename = os.path.basename(getattr(constants, name))
        monkeypatch.setattr(constants, name, str(tmp_path / "hf-home" / filename))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # transformers keeps one HfApi, which took its endpoint when it was made: make it again.
    if (transformers_hub := sys.modules.get("transformers.utils.hub")) is not None:
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    return dict(os.environ)
