"""The `olmo2kit` Typer app: one explicit list of commands, and the entry point.

Each command lives in its own module and is registered here, as huggingface_hub's CLI does; no
command module imports this one. Heavy modules (torch, transformers) are imported inside the
commands that need them, so `olmo2kit --help` and `olmo2kit sizes` stay instant.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from olmo2kit.cli import bench, chat, evals, generate, models, training
from olmo2kit.errors import Olmo2KitError

app = typer.Typer(
    name="olmo2kit",
    help="Work with the OLMo 2 language models: load any size or training checkpoint, generate, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    global _debug
    _debug = debug


COMMANDS = [
    ("generate", generate.generate),
    ("chat", chat.chat),
    ("sizes", models.sizes),
    ("tiny", models.tiny),
    ("list-revisions", models.list_revisions_command),
    ("perplexity", evals.perplexity_command),
    ("eval", evals.eval_command),
    ("scores", evals.scores_command),
    ("sweep", evals.sweep_command),
    ("bench", bench.bench),
    ("estimate", bench.estimate),
    ("prepare-data", training.prepare_data_command),
    ("finetune", training.finetune_command),
]
for name, command in COMMANDS:
    app.command(name)(command)


class _Warnings(logging.StreamHandler):
    """The library's warnings as `warning: ...` lines on whatever sys.stderr is at the time."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("warning: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the property reads sys.stderr instead
        pass


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    logger = logging.getLogger("olmo2kit")
    if not any(isinstance(h, _Warnings) for h in logger.handlers):  # once, however often main() runs
        logger.addHandler(_Warnings())
    try:
        app()  # usage errors: click prints them with the usage line and exits 2
    except Olmo2KitError as e:
        if _debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
