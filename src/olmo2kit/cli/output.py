"""What the commands print: tables and numbers on stdout, messages and the one progress bar on stderr.

This module imports no command module and nothing heavy.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def info(message: str) -> None:
    """A message for people, on stderr."""
    print(message, file=sys.stderr, flush=True)


def print_table(lines: list[tuple[str, ...]]) -> None:
    """Rows of cells in aligned columns, the first row the header."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def format_bytes(n: float) -> str:
    """Bytes as GB with two decimals, or as MB below a tenth of a GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def dash(value) -> str:
    """A table cell: the value, or - for None."""
    return "-" if value is None else str(value)


def report(result) -> None:
    """A generation's counts and speed, on stderr."""
    if result is None:
        return
    memory = "" if result.peak_memory_gb is None else f", peak memory {result.peak_memory_gb:.2f} GB"
    info(f"{result.new_tokens} tokens in {result.elapsed_s:.2f} s, {result.tokens_per_s:.1f} tokens/s{memory}")


class ProgressBar:
    """`[=====>      ] 12/40  2.10 prompts/s  ETA 0:00:13  note` on stderr: the one progress style of the CLI.

    Redrawn in place on a terminal; elsewhere (a log file, a pipe) a line at most every
    `interval` seconds, and one at the end. The rate counts from `first`, or from the first update
    (a library reports where a resumed run starts before its first item). Without a total (a stream
    of unknown length) it shows the count and the rate. The library reports progress through
    callbacks; this draws it.
    """

    width = 24

    def __init__(self, unit: str = "prompts", stream: TextIO | None = None, interval: float = 10.0,
                 first: int | None = None) -> None:
        self.unit = unit
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = interval
        self.start = time.perf_counter()
        # The count the rate starts from: `first` from now, else the first update's (a resumed run's position).
        self.first = first
        self.shown = -math.inf
        self.drawn = False

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first, self.start = done, now
        finished = total is not None and done >= total
        if total == 0 or (not self.live and now - self.shown < self.interval and not finished):
            return
        self.shown = now
        line = self.render(done, total, now - self.start, self.unit, done - self.first, note)
        self.stream.write(f"\r{line}\x1b[K" if self.live else line + "\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.live and self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    @classmethod
    def render(cls, done: int, total: int | None, elapsed: float, unit: str = "prompts", counted: int | None = None,
               note: str = "") -> str:
        """One line of the bar; `counted` is how many of `done` this run did (default: all)."""
        counted = done if counted is None else counted
        rate = counted / elapsed if counted and elapsed > 0 else None
        speed = "-" if rate is None else f"{rate:.2f}"
        if total is None:
            line = f"{done} {unit}  {speed} {unit}/s"
        else:
            filled = cls.width * done // total
            bar = ("=" * filled + ">")[: cls.width].ljust(cls.width)
            eta = "0:00:00" if done >= total else "?" if rate is None else clock((total - done) / rate)
            line = f"[{bar}] {done}/{total}  {speed} {unit}/s  ETA {eta}"
        return f"{line}  {note}" if note else line
