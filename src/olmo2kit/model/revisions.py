"""Checkpoint revisions: the Hub branches of an OLMo 2 repo, parsed, ordered and searched.

OLMo 2 publishes its intermediate checkpoints as branches of the model repo, named
`stage1-step{N}-tokens{T}B`, `stage2-ingredient{K}-step{N}-tokens{T}B` or (older repos)
`step{N}-tokens{T}B`. The token labels are rounded and some finals carry nominal budgets,
so names cannot be built from step numbers: they are listed from the Hub, through
`huggingface_hub.HfApi.list_repo_refs` (which honours HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE), and the list is cached on disk for an hour.

This module imports neither torch nor transformers, so `olmo2kit list-revisions` stays fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from olmo2kit.compat import hub_endpoint, hub_network_errors, offline_mode
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import write_atomic
from olmo2kit.model.sizes import resolve_alias

CACHE_TTL_S = 3600  # how long a cached refs list is trusted while online

# Revisions the Hub resolves that are not branches or tags: checked by the download itself.
_UNLISTED = re.compile(r"main|[0-9a-f]{40}|refs/pr/\d+", re.ASCII)
# re.ASCII: str patterns would otherwise take any Unicode digit ("step١٢") as a number.
_STAGE1 = re.compile(r"(?:stage1-)?step(\d+)-tokens(\d+)B", re.ASCII)
_STAGE2 = re.compile(r"stage2-ingredient(\d+)-step(\d+)-tokens(\d+)B", re.ASCII)
# Pieces of a name a user may have half-remembered, for "did you mean".
_PIECES = {key: re.compile(rf"{key}(\d+)", re.ASCII) for key in ("stage", "ingredient", "step", "tokens")}


@dataclass(frozen=True)
class Revision:
    """One branch (or tag) of a model repo; the fields its name does not carry are None.

    >>> parse_revision("stage2-ingredient3-step23852-tokens50B").ingredient
    3
    """

    name: str
    stage: int | None
    ingredient: int | None
    step: int | None
    tokens_b: int | None  # the token count in the name, in billions (rounded up by the Hub names)
    commit: str | None

    def to_dict(self) -> dict:
        """The six fields, as `list-revisions --json` prints them."""
        return asdict(self)


def parse_revision(name: str, commit: str | None = None) -> Revision:
    """Read stage, ingredient, step and tokens off a branch name. Never raises.

    >>> parse_revision("stage1-step140000-tokens294B").step
    140000
    >>> parse_revision("main").stage is None
    True
    """
    if m := _STAGE1.fullmatch(name):
        return Revision(name, 1, None, int(m[1]), int(m[2]), commit)
    if m := _STAGE2.fullmatch(name):
        return Revision(name, 2, int(m[1]), int(m[2]), int(m[3]), commit)
    return Revision(name, None, None, None, None, commit)


def training_order(revision: Revision) -> tuple:
    """Sort key: stage 1 by step, stage 2 by ingredient then step, then `main`, then the rest by name."""
    if revision.stage == 1:
        return (0, revision.step, 0, revision.name)
    if revision.stage == 2:
        return (1, revision.ingredient, revision.step, revision.name)
    if revision.name == "main":
        return (2, 0, 0, "")
    return (3, 0, 0, revision.name)


def list_revisions(
    model: str,
    *,
    stage: int | None = None,
    ingredient: int | None = None,
    step: int | None = None,
    tokens: float | None = None,
    limit: int | None = None,
    refresh: bool = False,
) -> list[Revision]:
    """The revisions of a model repo in training order, optionally filtered.

    `model` is a size alias (`1b`, `7b-instruct`) or a repo id. `stage` and `ingredient`
    keep matching revisions only. `step` or `tokens` (in billions) keep the revision
    nearest to it within `stage` (stage 1 by default, stage 2 if `ingredient` is given),
    all of them on a tie. `limit` keeps the first K. `refresh` skips the on-disk cache.

    >>> [r.name for r in list_revisions("1b", step=140000)]  # doctest: +SKIP
    ['stage1-step140000-tokens294B']
    """
    _check_filters(stage, ingredient, step, tokens, limit)
    repo_id = resolve_alias(model) or model
    revisions = sorted(
        (parse_revision(name, commit) for name, commit in _refs(repo_id, refresh=refresh)), key=training_order
    )
    if ingredient is not None:
        stage = 2
    if stage is not None:
        revisions = [r for r in revisions if r.stage == stage]
    if ingredient is not None:
        revisions = [r for r in revisions if r.ingredient == ingredient]
    if step is not None or tokens is not None:
        revisions = _nearest(revisions, stage or 1, step=step, tokens=tokens)
        if not revisions:
            raise Olmo2KitError(f"{repo_id} has no stage-{stage or 1} checkpoint branches to compare with")
    return revisions if limit is None else revisions[:limit]


def nearest_revision(
    model: str, *, step: int | None = None, tokens: float | None = None, stage: int = 1
) -> Revision:
    """The revision of `stage` nearest to `step` or to `tokens` (billions); the earlier one on a tie.

    >>> nearest_revision("1b", tokens=300).name  # doctest: +SKIP
    'stage1-step143000-tokens300B'
    """
    if step is None and tokens is None:
        raise Olmo2KitError("nearest_revision needs step= or tokens=")
    return list_revisions(model, stage=stage, step=step, tokens=tokens)[0]


def check_revision(repo_id: str, revision: str) -> None:
    """Raise Olmo2KitError unless `repo_id` has a branch or tag named `revision`.

    `main`, 40-hex commit shas and pull-request refs (`refs/pr/N`) pass unchecked. The
    error names the nearest existing revisions ("did you mean stage1-step140000-tokens294B?").
    Offline with no cached list there is nothing to check against, and the call returns.
    """
    if _UNLISTED.fullmatch(revision):
        return
    if offline_mode():
        refs = _read_cache(repo_id, max_age=None)
        if refs is None:
            return  # nothing to check against: the download cache decides
    else:
        refs = _read_cache(repo_id, max_age=CACHE_TTL_S)
        if refs is None or revision not in dict(refs):
            # Not cached, or the cached list may predate the branch: ask the Hub.
            refs = _refs(repo_id, refresh=True)
    names = [name for name, _ in refs]
    if revision in names:
        return
    suggestions = _did_you_mean(revision, names)
    hint = f"did you mean {' or '.join(suggestions)}? " if suggestions else ""
    raise Olmo2KitError(
        f"{repo_id} has no revision {revision!r}: {hint}(`olmo2kit list-revisions {repo_id}` lists them all)"
    )


def _did_you_mean(revision: str, names: list[str]) -> list[str]:
    """The existing names nearest to `revision`: by step (or tokens) if it names one, else by spelling."""
    wanted = {key: int(m[1]) for key, pattern in _PIECES.items() if (m := pattern.search(revision))}
    if "step" in wanted or "tokens" in wanted:
        stage = 2 if wanted.get("stage") == 2 or "ingredient" in wanted else 1
        candidates = sorted((r for r in map(parse_revision, names) if r.stage == stage), key=training_order)
        same_run = [r for r in candidates if r.ingredient == wanted.get("ingredient")]
        if same_run:
            candidates = same_run
        if candidates:
            step, tokens = wanted.get("step"), wanted.get("tokens")
            nearest = _nearest(candidates, stage, step=step, tokens=None if step is not None else tokens)
            return [r.name for r in nearest][:3]
    return difflib.get_close_matches(revision, names, n=2, cutoff=0.6)


def check_stage(stage: int | None) -> None:
    """Olmo2KitError unless `stage` is None, 1 or 2."""
    if stage not in (None, 1, 2):
        raise Olmo2KitError(f"no stage {stage}: OLMo 2 trained in stage 1 (pretraining) and 2 (mid-training)")


def _check_filters(stage, ingredient, step, tokens, limit) -> None:
    check_stage(stage)
    if ingredient is not None and stage == 1:
        raise Olmo2KitError("--ingredient picks a stage-2 run: drop --stage 1 or use --stage 2")
    if step is not None and tokens is not None:
        raise Olmo2KitError("give --step or --tokens, not both")
    counts = {"--ingredient": ingredient, "--step": step, "--tokens": tokens, "--limit": limit}
    for label, value in counts.items():
        if value is not None and value < 0:
            raise Olmo2KitError(f"{label} must be 0 or more, not {value}")


def _nearest(
    revisions: list[Revision], stage: int, *, step: int | None, tokens: float | None
) -> list[Revision]:
    """The revisions of `stage` nearest to `step` (else `tokens`), all of them on a tie; [] if none."""
    candidates = [r for r in revisions if r.stage == stage]
    if not candidates:
        return []
    field, target = ("step", step) if step is not None else ("tokens_b", tokens)
    best = min(abs(getattr(r, field) - target) for r in candidates)
    return [r for r in candidates if abs(getattr(r, field) - target) == best]


def _refs(repo_id: str, *, refresh: bool) -> list[tuple[str, str]]:
    """(name, commit) of every branch and tag of `repo_id`, from the cache when it is fresh enough."""
    if offline_mode():
        if refresh:
            raise Olmo2KitError("--refresh asks the Hub, but HF_HUB_OFFLINE is set: unset one of them")
        cached = _read_cache(repo_id, max_age=None)
        if cached is None:
            raise Olmo2KitError(
                f"no cached revision list for {repo_id} and HF_HUB_OFFLINE is set: "
                "run the command once online (or unset HF_HUB_OFFLINE)"
            )
        return cached
    if not refresh and (cached := _read_cache(repo_id, max_age=CACHE_TTL_S)) is not None:
        return cached
    refs = _fetch_refs(repo_id)
    _write_cache(repo_id, refs)
    return refs


def _fetch_refs(repo_id: str) -> list[tuple[str, str]]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    endpoint = hub_endpoint()
    try:
        refs = HfApi().list_repo_refs(repo_id)
    except HFValidationError:
        raise Olmo2KitError(
            f"{repo_id!r} is not a size alias or a Hub repo id (like allenai/OLMo-2-0425-1B)"
        ) from None
    except GatedRepoError:
        raise Olmo2KitError(_needs_token(repo_id)) from None
    except RepositoryNotFoundError:
        raise Olmo2KitError(
            f"{repo_id} not found on {endpoint}: check the repo id, or for a private repo "
            "set HF_TOKEN or run `hf auth login`"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise Olmo2KitError(_needs_token(repo_id)) from None
        raise Olmo2KitError(f"cannot list the revisions of {repo_id}: {endpoint} answered {status}") from None
    except (*hub_network_errors(), ValueError, KeyError) as e:
        # ValueError and KeyError: something answered, but not with the Hub's refs JSON.
        raise Olmo2KitError(
            f"cannot reach the Hub at {endpoint} ({type(e).__name__}): check the network and HF_ENDPOINT, "
            "or set HF_HUB_OFFLINE=1 to use a cached revision list"
        ) from None
    refs_by_name: dict[str, str] = {}
    for ref in (*refs.branches, *refs.tags):
        refs_by_name.setdefault(ref.name, ref.target_commit)
    return list(refs_by_name.items())


def _needs_token(repo_id: str) -> str:
    return (
        f"{repo_id} needs a token: accept its terms on the Hub, then set HF_TOKEN "
        "or run `hf auth login` with an account that has access"
    )


def cache_dir() -> Path:
    """Where olmo2kit keeps its own small caches: $OLMO2KIT_CACHE_DIR, else $XDG_CACHE_HOME/olmo2kit."""
    if override := os.environ.get("OLMO2KIT_CACHE_DIR"):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "olmo2kit"


def refs_cache_path(repo_id: str) -> Path:
    """The cache file of `repo_id`'s refs at the current HF_ENDPOINT."""
    key = hashlib.sha256(f"{hub_endpoint()}\n{repo_id}".encode()).hexdigest()[:24]
    return cache_dir() / "refs" / f"{key}.json"


def _read_cache(repo_id: str, *, max_age: float | None) -> list[tuple[str, str]] | None:
    path = refs_cache_path(repo_id)
    try:
        if max_age is not None and time.time() - path.stat().st_mtime >= max_age:
            return None
        data = json.loads(path.read_text())
        if data["endpoint"] != hub_endpoint() or data["repo_id"] != repo_id:
            return None  # a hash collision, however unlikely, must not serve another repo's list
        return [(name, commit) for name, commit in data["refs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: fetch again


def _write_cache(repo_id: str, refs: list[tuple[str, str]]) -> None:
    path = refs_cache_path(repo_id)
    data = {"endpoint": hub_endpoint(), "repo_id": repo_id, "refs": refs}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data).encode())
    except (OSError, Olmo2KitError):
        pass  # an unwritable cache only costs the next call another request
