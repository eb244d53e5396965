"""A tiny progress printer for the slow steps (one line on stderr, redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int) -> Iterator[T]:
    """Yields ``items`` while showing ``description: i/total  elapsed s`` on stderr."""
    start = time.perf_counter()
    stream = sys.stderr
    redraw = stream.isatty()  # a log file gets one final line, not a line per step
    prefix = "\r" if redraw else ""

    def show(done: int, end: str) -> None:
        stream.write(f"{prefix}{description}: {done}/{total}  {time.perf_counter() - start:.1f} s{end}")
        stream.flush()

    if redraw:
        show(0, "")
    done = 0
    for item in items:
        yield item
        done += 1
        if redraw:
            show(done, "")
    show(done, "\n")


def step(description: str) -> "_Step":
    """``with step("loading"):`` prints ``loading ... 12.3 s`` on stderr around a slow block."""
    return _Step(description)


class _Step:
    def __init__(self, description: str) -> None:
        self.description = description

    def __enter__(self) -> "_Step":
        sys.stderr.write(f"{self.description} ...\n")
        sys.stderr.flush()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            sys.stderr.write(f"{self.description}: done in {time.perf_counter() - self.start:.1f} s\n")
            sys.stderr.flush()
