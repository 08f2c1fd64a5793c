"""Files that a crash or kill never leaves half-written: atomic writes, output directories, and the
append-only JSONL store that batch jobs, sweeps and the fine-tuning log share."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from olmo2kit.errors import Olmo2KitError


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` through a temporary file in the same directory, synced, then renamed
    into place: readers see the old file or the new one, never part of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON, whole or not at all."""
    return write_atomic(path, json.dumps(data, indent=2).encode())


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


LOCK_NAME = ".olmo2kit.lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, option: str) -> Iterator[Path]:
    """Hold an exclusive lock on an output that a long-running command owns, for as long as the block runs.

    `path` is the output: a directory (the lock file goes inside it, which must exist) or a file (the
    lock file goes beside it, `.NAME.lock`). A second run on the same output gets an Olmo2KitError
    naming the process that holds it and `option`, the command-line option that chose the output.
    The lock is the kernel's (flock): it goes with the process, so a killed run leaves none behind.

    >>> with output_lock("results.jsonl", option="--output"):  # doctest: +SKIP
    ...     run_the_job()
    """
    path = Path(path).expanduser()
    lock_file = path / LOCK_NAME if path.is_dir() else path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise Olmo2KitError(f"cannot write in {lock_file.parent} ({e.strerror}): give an {option} you can write to") \
            from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise Olmo2KitError(
                f"{path} is in use by another olmo2kit run ({holder}): wait for it to end, or give another {option}"
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        yield lock_file
    finally:
        os.close(fd)  # releases the lock


class JsonlStore:
    """An append-only file of JSON objects, one a line, that survives a kill at any moment.

    Each append is one write of whole lines, flushed and synced before it returns, so a kill
    can only cut the last line short. The one torn-line rule: what follows the last newline, if
    it begins a JSON object but is not a whole record, is torn; `read` leaves it out and `repair`
    cuts it off the file. (A whole record that lost only its newline is kept, and `repair` ends
    it.) Any other line that is not a record is an Olmo2KitError naming it: the file is not one
    this store wrote, and nothing in it is cut. Blank lines are skipped.

    `is_record(row)` says whether a parsed object is a record of this store; `what` names a
    record and `hint` what to do about a file that is not this store's, for the error message.

    >>> store = JsonlStore("results.jsonl", what="result line", hint="give another --output")  # doctest: +SKIP
    >>> store.append([{"id": 1}]); store.read()  # doctest: +SKIP
    [{'id': 1}]
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "JSON line", hint: str = "give another file",
                 is_record: Callable[[dict], bool] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.what = what
        self.hint = hint
        self.is_record = is_record or (lambda row: True)

    def read(self) -> list[dict]:
        """The records, in file order, less a torn last line; [] when there is no file."""
        return self._scan()[0]

    def torn(self) -> bool:
        """Whether the file ends with a torn line."""
        return self._scan()[1] is not None

    def repair(self) -> bool:
        """Cut a torn last line off the file, or end a last record that lacks its newline; True if either."""
        _, kept, whole = self._scan()
        if kept is None and not whole:
            return False
        with self.path.open("r+b") as f:
            if kept is not None:
                f.truncate(kept)
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            os.fsync(f.fileno())
        return True

    def append(self, records: Iterable[dict]) -> None:
        """Append `records`, on disk before this returns (one write, flush, fsync)."""
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not text:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise Olmo2KitError(f"cannot write {self.path} ({e.strerror}): give a file you can write to") from None

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the whole file with `records`, atomically."""
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        write_atomic(self.path, text.encode("utf-8"))

    def _scan(self) -> tuple[list[dict], int | None, bool]:
        """(records, bytes to keep when the tail is torn else None, whether the last record lacks its newline)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], None, False
        except IsADirectoryError:
            raise Olmo2KitError(f"{self.path} is a directory: give a file name") from None
        lines = data.split(b"\n")
        tail = lines.pop()  # what follows the last newline: empty unless the last write was cut short
        rows = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                rows.append(self._record(line, number))
        if not tail.strip():
            return rows, (len(data) - len(tail) if tail else None), False
        whole = self._parse(tail)
        if whole is not None:
            return [*rows, whole], None, True
        if not tail.lstrip().startswith(b"{"):
            self._record(tail, len(lines) + 1)  # raises: not a line this store wrote
        return rows, len(data) - len(tail), False

    def _record(self, line: bytes, number: int) -> dict:
        row = self._parse(line)
        if row is None:
            raise Olmo2KitError(f"{self.path} line {number} is not a {self.what}: fix or remove it, or {self.hint}")
        return row

    def _parse(self, line: bytes) -> dict | None:
        try:
            row = json.loads(line)
        except ValueError:  # UnicodeDecodeError included
            return None
        return row if isinstance(row, dict) and self.is_record(row) else None
