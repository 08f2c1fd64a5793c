"""Files that a crash or kill never leaves half-written: atomic writes, output directories, and the
append-only JSONL store that batch jobs, sweeps and the fine-tuning log share."""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from olmo2kit.errors import Olmo2KitError


def write_target(path: str | os.PathLike, hint: str = "give another file") -> Path:
    """The file that a write to `path` changes: `path` itself, or, when `path` is a symbolic link, the file at
    the end of its chain of links. Every writer here writes there, so the links stay links and the file they
    point to gets the new content.

    A dangling link names the file to create, and it is created where its directory exists. A link into a
    directory that does not exist, or a loop of links, is an Olmo2KitError ending in `hint`.

    >>> write_target("latest.json")  # latest.json -> runs/7.json  # doctest: +SKIP
    PosixPath('/home/me/runs/7.json')
    """
    path = Path(path).expanduser()
    if not path.is_symlink():
        return path
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        target = Path(os.path.realpath(path))
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise cannot_write(path, e, hint) from None
        target = path  # a loop of links: said below
    if target.is_symlink():
        raise Olmo2KitError(f"{path} is a symbolic link in a loop of links, so there is no file to write: {hint}")
    if not target.parent.is_dir():
        raise Olmo2KitError(f"{path} is a symbolic link to {target}, and there is no directory {target.parent}: "
                            f"{hint}")
    return target


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` through a temporary file in the same directory, synced, then renamed
    into place: readers see the old file or the new one, never part of one.

    A symbolic link at `path` stays: the file it leads to is written, through a temporary file beside
    that one (`write_target` says which file, dangling links included). Only regular files are written:
    a directory, device, fifo or socket at `path` is an Olmo2KitError and stays as it is. A failed write
    (a full disk, say) is an Olmo2KitError naming `path`, and leaves the old file, if any, and no
    temporary file. Returns `path` as given.
    """
    path = Path(path)
    hint = "give the name of a regular file to write"
    target = write_target(path, hint)
    _refuse_special(target, hint)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise cannot_write(path, e, "give a place you can write to") from None
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


def check_new_output_dir(out: str | os.PathLike) -> Path:
    """`out`, made absolute, as a directory to create: nothing there yet, or an empty directory, and neither the
    current directory nor one above it (a rename onto it would pull the directory from under this process). Nothing
    is created: the nearest directory above `out` that exists must be one this user can write in. An Olmo2KitError
    saying what to give otherwise."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise Olmo2KitError(f"{out} exists: give a new directory (or remove it)")
    if out == Path.cwd() or out in Path.cwd().parents:
        raise Olmo2KitError(f"{out} is the current directory (or holds it): give a new directory to write")
    above = out.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise Olmo2KitError(f"cannot create {out}: {above} is not a directory you can write in; give another place")
    return out


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, and another user's
        pass
    return True


def staging_path(out: Path) -> Path:
    """Where this process stages the file `out` before renaming it into place: `.NAME.PID.partial` beside it, named
    by the process, so that `remove_abandoned_staging` can tell what a killed process left."""
    return out.with_name(f".{out.name}.{os.getpid()}.partial")


def remove_abandoned_staging(folder: Path, name: str = ".+") -> None:
    """Remove, in `folder`, what outputs were staged in (files or directories `.NAME.PID[.*].partial`, NAME
    matching the regular expression `name`) by processes that are gone; a running process's are left alone."""
    staged = re.compile(rf"\.(?:{name})\.(?P<pid>\d+)(?:\..+)?\.partial")
    for partial in folder.glob(".*.partial"):
        match = staged.fullmatch(partial.name)
        if match and not process_alive(int(match["pid"])):
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_output_dir(out: Path, hint: str = "give a directory you can write to", mode: int = 0o755) -> Iterator[Path]:
    """A new directory beside `out` (`.NAME.PID.*.partial`) to write the directory `out` in, renamed to `out` when
    the block ends (onto nothing, or onto an empty directory: `check_new_output_dir` again, as one may have
    appeared meanwhile); removed if anything fails, so `out` is whole or not there. The parents of `out` are made
    here, not before, and what killed processes staged for `out` is removed first. `out` gets `mode` (readable by
    all, as a directory save_pretrained makes). A failed write is an Olmo2KitError ending in `hint`."""
    make_output_dir(out.parent)
    remove_abandoned_staging(out.parent, re.escape(out.name))
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise cannot_write(out, e, hint) from None
    try:
        staging.chmod(mode)  # mkdtemp makes it private
        yield staging
        check_new_output_dir(out)
        os.replace(staging, out)
    except OSError as e:
        raise cannot_write(out, e, hint) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def numbered_lines(f, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Each line of the binary file `f` with its number (from 1), or None for a line over `max_bytes`: such a
    line is read past a piece at a time, so no line is ever held whole beyond the cap."""
    number = 0
    while raw := f.readline(max_bytes + 1):
        number += 1
        if len(raw) <= max_bytes:
            yield number, raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(max_bytes)
        yield number, None


def read_stdin(limit: int | None = None) -> str:
    """All of stdin as text, decoded strictly as UTF-8; Olmo2KitError naming the first bad byte, or when stdin
    holds more than `limit` bytes (read no further: stdin may be endless)."""
    import sys

    size = -1 if limit is None else limit + 1
    if hasattr(sys.stdin, "buffer"):
        data = sys.stdin.buffer.read(size)
    else:  # a text stream put in place of stdin (tests, embedding programs)
        data = sys.stdin.read(size).encode("utf-8", "surrogateescape")
    if limit is not None and len(data) > limit:
        raise Olmo2KitError(f"stdin holds more than {limit:,} bytes, more than olmo2kit reads here: shorten it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Olmo2KitError(f"stdin is not UTF-8 text (byte {e.start}): convert it first") from None


LOCK_NAME = ".olmo2kit.lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, option: str) -> Iterator[Path]:
    """Hold an exclusive lock on an output that a long-running command owns, for as long as the block runs.

    `path` is the output: a directory (the lock file goes inside it, which must exist) or a file (the
    lock file goes beside it, `.NAME.lock`; beside the file a symbolic link leads to, so that every
    link to one output shares one lock). A second run on the same output gets an Olmo2KitError
    naming the process that holds it and `option`, the command-line option that chose the output.
    The lock is the kernel's (flock): it goes with the process, so a killed run leaves none behind.

    >>> with output_lock("results.jsonl", option="--output"):  # doctest: +SKIP
    ...     run_the_job()
    """
    path = Path(path).expanduser()
    if path.is_dir():
        lock_file = path / LOCK_NAME
    else:
        target = write_target(path, f"give another {option}")
        lock_file = target.parent / f".{target.name}.lock"
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


def _kind(mode: int) -> str | None:
    """What a file is, when it is not a regular file (None when it is)."""
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISFIFO, "fifo (named pipe)"), (stat.S_ISSOCK, "socket")]
    return next((name for test, name in kinds if test(mode)), "special file")


def _refuse_special(path: Path, hint: str, mode: int | None = None) -> None:
    """Raise Olmo2KitError if `path` is there and is not a regular file (`mode`: its st_mode, if known)."""
    if mode is None:
        try:
            mode = path.stat().st_mode
        except OSError:
            return  # nothing there, or nothing to see: the write that follows says why if it fails
    kind = _kind(mode)
    if kind:
        raise Olmo2KitError(f"{path} is a {kind}, not a regular file: {hint}")


def cannot_write(path: Path, error: OSError, hint: str) -> Olmo2KitError:
    """The Olmo2KitError for a failed write to `path`: a full disk needs space, anything else `hint`."""
    what_next = "free some space, then run again" if error.errno in (errno.ENOSPC, errno.EDQUOT) else hint
    return Olmo2KitError(f"cannot write {path} ({error.strerror}): {what_next}")


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


class JsonlStore:
    """An append-only file of JSON objects, one a line, that survives a kill at any moment.

    Each append is one write of whole lines, synced before it returns, so a kill (or a full
    disk) can only cut the last line short. The one torn-line rule: what follows the last
    newline, if it begins a JSON object and does not parse, is torn; `read` leaves it out and
    `repair` cuts it off the file. (A whole record that lost only its newline is kept, and
    `repair` ends it.) Any other line that is not a record, a whole line or JSON that parses
    included, is an Olmo2KitError naming it: the file is not one this store wrote, and nothing in
    it is cut. Blank lines are skipped.

    A symbolic link at the path stays a link: appends and rewrites go to the file it leads to
    (`write_target`, which says what a dangling link does).

    The file is read a line at a time, so memory stays bounded: a line longer than
    `max_line_bytes` (its newline included) is an Olmo2KitError, and so is anything at the path
    that is not a regular file (a directory, a device such as /dev/zero, a fifo).

    `is_record(row)` says whether a parsed object is a record of this store; `what` names a
    record and `hint` what to do about a file that is not this store's, for the error message.

    >>> store = JsonlStore("results.jsonl", what="result line", hint="give another --output")  # doctest: +SKIP
    >>> store.append([{"id": 1}]); store.read()  # doctest: +SKIP
    [{'id': 1}]
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "JSON line", hint: str = "give another file",
                 is_record: Callable[[dict], bool] | None = None, max_line_bytes: int = 64 << 20) -> None:
        self.path = Path(path).expanduser()
        self.what = what
        self.hint = hint
        self.is_record = is_record or (lambda row: True)
        self.max_line_bytes = max_line_bytes

    def check(self) -> None:
        """Raise Olmo2KitError if something that is not a regular file is at the path (nothing there is fine)."""
        _refuse_special(self.path, self.hint)

    def read(self) -> list[dict]:
        """The records, in file order, less a torn last line; [] when there is no file."""
        return list(self.records())

    def records(self) -> Iterator[dict]:
        """The records one at a time, in file order, less a torn last line; none when there is no file."""
        return (row for row, _, _ in self._scan() if row is not None)

    def torn(self) -> bool:
        """Whether the file ends with a torn line."""
        return any(row is None for row, _, _ in self._scan())

    def repair(self) -> bool:
        """Cut a torn last line off the file, or end a last record that lacks its newline; True if either."""
        last = collections.deque(self._scan(), maxlen=1)  # the scan checks every line on the way
        if not last or last[0][2]:
            return False
        row, start, _ = last[0]
        with self.path.open("r+b") as f:
            if row is None:
                f.truncate(start)
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            os.fsync(f.fileno())
        return True

    def append(self, records: Iterable[dict]) -> None:
        """Append `records`, on disk before this returns (written whole, then fsync).

        A failed write (a full disk) is an Olmo2KitError; what it wrote of the last line is a torn line.
        """
        data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
        if not data:
            return
        self.check()
        target = write_target(self.path, self.hint)
        try:
            # O_NONBLOCK: a fifo made in the meantime fails here instead of waiting for a reader
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        except OSError as e:
            raise Olmo2KitError(f"cannot write {self.path} ({e.strerror}): {self.hint}") from None
        try:
            _refuse_special(self.path, self.hint, os.fstat(fd).st_mode)
            view = memoryview(data)
            while view:  # a write may take only part of the bytes
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            raise cannot_write(self.path, e, self.hint) from None
        finally:
            os.close(fd)

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the whole file with `records`, atomically."""
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        write_atomic(self.path, text.encode("utf-8"))

    def _scan(self) -> Iterator[tuple[dict | None, int, bool]]:
        """(record, where its line starts, whether it ends with a newline) for each record, in file order;
        (None, where it starts, False) for a torn last line."""
        f = self._open()
        if f is None:
            return
        with f:
            start, number = 0, 0
            while line := f.readline(self.max_line_bytes + 1):
                number += 1
                if len(line) > self.max_line_bytes:
                    raise Olmo2KitError(f"{self.path} line {number} is longer than {_size(self.max_line_bytes)}, "
                                        f"so it is not a {self.what}: {self.hint}")
                if line.endswith(b"\n"):
                    if line.strip():
                        yield self._record(line, number), start, True
                elif line.strip():  # the last line, and its newline was never written
                    yield self._tail(line, number), start, False
                else:
                    yield None, start, False  # blanks after the last newline: torn too
                start += len(line)

    def _open(self):
        """The file for reading, or None when there is none."""
        try:
            # O_NONBLOCK: a fifo opens at once (to be refused below) instead of waiting for a writer
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise Olmo2KitError(f"cannot read {self.path} ({e.strerror}): {self.hint}") from None
        try:
            _refuse_special(self.path, self.hint, os.fstat(fd).st_mode)
        except Olmo2KitError:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")

    def _tail(self, line: bytes, number: int) -> dict | None:
        """A last line without its newline: the record it holds whole, or None when it is torn, the start of
        an object cut short (no part of a record short of all of it parses). Anything else raises, JSON that
        is no record included: it is not a line this store wrote."""
        try:
            json.loads(line)
        except (ValueError, RecursionError):  # UnicodeDecodeError included: a cut can split a character
            if line.lstrip().startswith(b"{"):
                return None
        return self._record(line, number)

    def _record(self, line: bytes, number: int) -> dict:
        row = self._parse(line)
        if row is None:
            raise Olmo2KitError(f"{self.path} line {number} is not a {self.what}: fix or remove it, or {self.hint}")
        return row

    def _parse(self, line: bytes) -> dict | None:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # UnicodeDecodeError included; nesting past Python's stack too
            return None
        return row if isinstance(row, dict) and self.is_record(row) else None


def file_stamp(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: its size, mtime, ctime, inode and device. The ctime is the
    one no tool sets back (tar, Docker layers, Nix and `touch` set mtimes, not ctimes), so a file whose stamp is
    the one recorded holds the bytes it held then, and one copied over it with the old mtime does not."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read a piece at a time (memory stays bounded for files of many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(chunk):
            digest.update(piece)
    return digest.hexdigest()
