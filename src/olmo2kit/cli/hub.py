"""`olmo2kit download` and `cache`: checkpoints fetched ahead of time, and what the cache holds."""

from __future__ import annotations

import datetime
import json
from typing import Annotated

import typer

from olmo2kit.cli.options import JsonOpt, RevisionOpt
from olmo2kit.cli.output import ProgressBar, format_bytes, info, print_table


def download(
    model: Annotated[str, typer.Argument(help="Size alias (1b, 7b-instruct, ...), Hub repo id or repo@revision.")],
    revision: RevisionOpt = None,
) -> None:
    """Download a model or checkpoint into the Hugging Face cache, for later offline use.

    Only what olmo2kit loads is fetched: config, tokenizer and safetensors weights.
    Prints the snapshot directory; progress goes to stderr.

    Examples:

      olmo2kit download 1b-instruct

      olmo2kit download 1b@stage1-step140000-tokens294B
    """
    from olmo2kit.model.hub_cache import download as run_download

    bar = ProgressBar("kB")
    try:
        path = run_download(model, revision, progress=lambda done, total: bar.update(done // 1000, total // 1000))
    finally:
        bar.close()
    print(path)


def cache(
    model: Annotated[str | None, typer.Argument(help="Only this model (alias or repo id).")] = None,
    remove: Annotated[
        str | None, typer.Option("--remove", help="Remove this revision (branch, tag or commit) of MODEL.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the models and revisions in the Hugging Face cache, or remove one revision.

    Files a revision shares with other cached revisions stay.

    Examples:

      olmo2kit cache

      olmo2kit cache 1b --remove stage1-step140000-tokens294B
    """
    from olmo2kit.errors import Olmo2KitError
    from olmo2kit.model.hub_cache import cached_revisions, remove_revision

    if remove is not None:
        if model is None:
            raise Olmo2KitError("--remove needs the MODEL it is a revision of: olmo2kit cache MODEL --remove REV")
        freed = remove_revision(model, remove)
        info(f"removed {model}@{remove}, freed {format_bytes(freed)}")
        return
    revisions = cached_revisions(model)
    if as_json:
        print(json.dumps([r.to_dict() for r in revisions], indent=2))
        return
    lines = [("repo", "revision", "commit", "size", "files", "modified")]
    for r in revisions:
        modified = datetime.datetime.fromtimestamp(r.last_modified).strftime("%Y-%m-%d %H:%M")
        lines.append((r.repo, ",".join(r.refs) or "-", r.commit[:10], format_bytes(r.size_bytes), str(r.files),
                      modified))
    if len(lines) == 1:
        info("the Hugging Face cache holds no models" + ("" if model is None else f" for {model}"))
        return
    print_table(lines)
