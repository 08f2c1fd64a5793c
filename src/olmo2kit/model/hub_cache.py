"""Checkpoints in the Hugging Face cache: download one ahead of time, list what is cached, remove a revision.

Everything goes through huggingface_hub (`snapshot_download`, `hf_hub_download`, `scan_cache_dir`), so it
honours HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_CACHE. Only what `olmo2kit.load` reads is downloaded:
config and tokenizer files and safetensors weights, never pickled weights.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from olmo2kit.compat import hub_network_errors, offline_mode
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.loading import ModelRef, cached_instead, resolve_model
from olmo2kit.model.revisions import check_revision

# What loading reads: config, generation config, tokenizer, the weights and their index.
LOADED_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "additional_chat_templates/*"]


@dataclass(frozen=True)
class CachedRevision:
    """One revision of a model repo in the cache."""

    repo: str
    commit: str
    refs: tuple[str, ...]  # branch or tag names pointing at it (empty when only a commit was asked for)
    size_bytes: int
    files: int
    last_modified: float  # POSIX time

    def to_dict(self) -> dict:
        return {**asdict(self), "refs": list(self.refs)}


def download(model: str, revision: str | None = None, *,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Download what `load(model, revision=...)` reads into the cache, and return the snapshot directory.

    Offline (HF_HUB_OFFLINE), or when the Hub cannot be reached, the cached snapshot is returned instead, by the
    rule `load` follows (`loading.cached_instead`); an Olmo2KitError when the cache holds none.
    `progress(bytes done, bytes in all)` is called as bytes arrive (files already cached count as done).

    >>> download("1b", "stage1-step140000-tokens294B")  # doctest: +SKIP
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    ref = resolve_model(model, revision)
    if ref.local:
        raise Olmo2KitError(f"{model} is a local directory: there is nothing to download")
    if offline_mode():
        if ref.revision:
            check_revision(ref.source, ref.revision)  # against the cached list of revisions, where there is one
        return _cached_snapshot(ref)
    if cached_instead(ref, model):  # asks the Hub once, and names a mistyped branch with its nearest ones
        return _cached_snapshot(ref)
    report = progress or (lambda done, total: None)
    with _hub_errors(str(ref)):
        planned = snapshot_download(ref.source, revision=ref.revision, allow_patterns=LOADED_FILES, dry_run=True)
        if not planned:
            raise Olmo2KitError(f"{ref} holds no config, tokenizer or safetensors files: nothing olmo2kit can load")
        total = sum(info.file_size or 0 for info in planned)
        done = [sum(info.file_size or 0 for info in planned if not info.will_download)]

        def add(n: int) -> None:
            done[0] += n
            report(done[0], total)

        report(done[0], total)
        for info in planned:
            # A file whose bytes another revision brought is linked into this snapshot without a download.
            if not Path(info.local_path).exists():
                hf_hub_download(ref.source, info.filename, revision=info.commit_hash, tqdm_class=_bytes_to(add))
        return Path(planned[0].local_path).parents[len(Path(planned[0].filename).parts) - 1]


def _cached_snapshot(ref: ModelRef) -> Path:
    """The snapshot directory of a revision in the cache, without asking the Hub; an Olmo2KitError when the cache
    holds none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref.source, revision=ref.revision, allow_patterns=LOADED_FILES,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        why = "huggingface_hub is in offline mode (HF_HUB_OFFLINE)" if offline_mode() else "the Hub cannot be reached"
        raise Olmo2KitError(f"{ref} is not in the local cache and {why}: download it where the Hub can be reached "
                            "(`olmo2kit download MODEL`)") from None


def cached_revisions(model: str | None = None) -> list[CachedRevision]:
    """The revisions in the cache, of one model (alias or repo id) or of every model, largest repo first."""
    cache = _scan_cache()
    return [] if cache is None else _revisions(cache, None if model is None else _repo_id(model))


def delete_cached_revision(repo_id: str, *revisions: str | None) -> int:
    """Remove a revision of `repo_id` from the cache, named by any of `revisions` (branch, tag or commit);
    files other revisions share stay. Returns the bytes freed: 0 when the cache holds nothing of it."""
    return _delete(repo_id, {r for r in revisions if r}) or 0


def remove_revision(model: str, revision: str) -> int:
    """Remove a cached revision of `model` (alias or repo id); Olmo2KitError when the cache holds none.
    Returns the bytes freed (0 when all its files are shared with other cached revisions)."""
    repo_id = _repo_id(model)
    freed = _delete(repo_id, {revision})
    if freed is None:
        raise Olmo2KitError(f"the cache holds no revision {revision!r} of {repo_id}: `olmo2kit cache {model}` lists "
                            "what it holds")
    return freed


def _scan_cache():
    """huggingface_hub's view of the cache, read once; None when there is no cache yet."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return None


def _revisions(cache, repo_id: str | None) -> list[CachedRevision]:
    found = []
    for repo in sorted(cache.repos, key=lambda r: -r.size_on_disk):
        if repo.repo_type != "model" or (repo_id is not None and repo.repo_id.lower() != repo_id.lower()):
            continue
        for cached in sorted(repo.revisions, key=lambda r: -r.last_modified):
            found.append(CachedRevision(repo.repo_id, cached.commit_hash, tuple(sorted(cached.refs)),
                                        cached.size_on_disk, cached.nb_files, cached.last_modified))
    return found


def _delete(repo_id: str, names: set[str]) -> int | None:
    """Delete the cached revisions of `repo_id` any of `names` points at, from one scan of the cache; the
    bytes freed, or None when no cached revision matched."""
    cache = _scan_cache()
    commits = [] if cache is None else [r.commit for r in _revisions(cache, repo_id) if names & {*r.refs, r.commit}]
    if not commits:
        return None
    strategy = cache.delete_revisions(*commits)
    strategy.execute()
    return strategy.expected_freed_size


def _repo_id(model: str) -> str:
    ref = resolve_model(model)
    if ref.local:
        raise Olmo2KitError(f"{model} is a local directory, not a Hub repo in the cache")
    return ref.source


@contextlib.contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """Hub failures during a download as Olmo2KitError."""
    from huggingface_hub.errors import DryRunError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        try:
            yield
        except DryRunError as e:  # the listing wraps why the repo could not be reached
            raise e.__cause__ or e from None
    except GatedRepoError:
        raise Olmo2KitError(f"{what} needs a token: accept its terms on the Hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise Olmo2KitError(f"{what} not found on the Hub: check the repo id, or set HF_TOKEN for a private one") \
            from None
    except (HfHubHTTPError, *hub_network_errors()) as e:
        raise Olmo2KitError(f"cannot download {what} ({type(e).__name__}): check the network and HF_ENDPOINT") \
            from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        raise Olmo2KitError(f"cannot write the Hugging Face cache ({e.strerror or e}): free some space or set "
                            "HF_HUB_CACHE") from None


def _bytes_to(on_bytes: Callable[[int], None]):
    """A class that hf_hub_download takes as `tqdm_class`: it hands each update's bytes to `on_bytes`."""

    class Forward:
        def __init__(self, *args, initial: int = 0, **kwargs) -> None:
            if initial:
                on_bytes(initial)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def update(self, n: int | float | None = 1) -> None:
            on_bytes(int(n or 0))

        def update_transfer(self, n: int | float | None = 1) -> None:
            pass  # the bytes on the wire; `update` counts the bytes written

        def set_postfix_str(self, *args, **kwargs) -> None:
            pass

        def set_transfer_postfix_str(self, *args, **kwargs) -> None:
            pass

        def close(self) -> None:
            pass

    return Forward
