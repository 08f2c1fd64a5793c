"""The one exception type users see, and the output-path check that raises it."""

import os
from pathlib import Path


class Olmo2KitError(Exception):
    """A user error: bad input, missing file, unreachable model.

    The message says what went wrong and what to do next. The CLI prints it
    as one line and exits with code 2; anything else is a bug and keeps its
    traceback.
    """


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the directory `path` (and its parents) for output and return it.

    Raises Olmo2KitError, saying why, where it cannot be: a file is in the way, or the
    place is not writable (a read-only or virtual file system such as /proc).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise Olmo2KitError(f"{path} is a file, not a directory: give a directory to write to")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Olmo2KitError(f"cannot create the directory {path} ({e.strerror}): give one you can write to") from None
    return path
