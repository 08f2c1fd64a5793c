"""The `olmo2kit` Typer app: one explicit list of commands, and the entry point.

Each command lives in its own module and is registered here, as huggingface_hub's CLI does; no
command module imports this one. Heavy modules (torch, transformers) are imported inside the
commands that need them, so `olmo2kit --help` and `olmo2kit sizes` stay instant.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Annotated

import typer

from olmo2kit.cli import bench, chat, evals, export, generate, hub, imports, models, serve, soup, training
from olmo2kit.cli.options import Command
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


def _print_version(value: bool) -> None:
    if value:
        import importlib.metadata  # here, not at start-up: it costs every command about 20 ms

        # The installed version, which pyproject.toml takes from olmo2kit.__version__: modules import no
        # name from the package's public API (tests/test_layers.py).
        print(f"olmo2kit {importlib.metadata.version('olmo2kit')}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
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
    ("merge", training.merge_command),
    ("soup", soup.soup_command),
    ("download", hub.download),
    ("cache", hub.cache),
    ("serve", serve.serve),
]
for name, command in COMMANDS:
    app.command(name, cls=Command)(command)
app.add_typer(export.app, name="export")
app.add_typer(imports.app, name="import")


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


class _StdoutError(OSError):
    """A write to stdout failed: the disk is full, or the reader of a pipe has gone."""


class _Stdout:
    """sys.stdout, with its write errors raised as _StdoutError so that main can tell them from other OSErrors."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.failed = False

    def write(self, text: str) -> int:
        return self._guarded(self.stream.write, text)

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            self.failed = True
            raise _StdoutError(e.errno, e.strerror) from None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _check_arguments(arguments: list[str]) -> None:
    """Olmo2KitError for an argument that is not UTF-8 (Python hands such bytes on as lone surrogates)."""
    for argument in arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            try:  # the bytes as given, where the OS decoded them (surrogate escapes)
                shown = os.fsencode(argument).decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a lone surrogate that came from no bytes (Python callers)
                shown = argument.encode("utf-8", "backslashreplace").decode("utf-8")
            raise Olmo2KitError(f"the argument '{shown}' is not UTF-8 text: give it in UTF-8") from None


def _discard_output(stream) -> None:
    """Send what is left of a failed stdout to /dev/null, or Python's last flush at exit fails on it again."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return  # not a file (a test's capture): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2.

    A stdout that cannot be written (a full disk) is such an error too; a pipe whose reader has
    gone (`olmo2kit sizes | head -1`) ends the command quietly with exit code 1, as typer does.
    """
    logger = logging.getLogger("olmo2kit")
    if not any(isinstance(h, _Warnings) for h in logger.handlers):  # once, however often main() runs
        logger.addHandler(_Warnings())
    if sys.stdout is None:  # started with stdout closed (>&-): Python gives None, and output goes nowhere
        sys.stdout = open(os.devnull, "w")
    stdout = sys.stdout = _Stdout(sys.stdout)
    try:
        try:
            _check_arguments(sys.argv[1:])
            app()  # usage errors: click prints them with the usage line and exits 2
        finally:
            sys.stdout.flush()  # now, not at exit, where a full disk could no longer be reported
    except Olmo2KitError as e:
        if _debug:
            raise
        sys.stderr.write(f"error: {e}\n")  # one write: the processes of a torchrun launch share a terminal
        sys.stderr.flush()
        sys.exit(2)
    except _StdoutError as e:
        if e.errno == errno.EPIPE:
            sys.exit(1)
        print(f"error: cannot write to stdout ({e.strerror}): free some space or send the output elsewhere",
              file=sys.stderr)
        sys.exit(2)
    finally:
        sys.stdout = stdout.stream
        if stdout.failed:
            _discard_output(stdout.stream)
