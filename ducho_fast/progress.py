"""How long work reports how far it got: a caller's progress factory (the CLI's bar, or lines
in a log) is given a label and a total, and yields a callback advanced by counts."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

ProgressFn = Callable[[int], None]
# Given a label and a total, returns a context manager yielding a progress callback.
ProgressFactory = Callable[[str, int], AbstractContextManager[ProgressFn]]
# Told what a long step with no progress bar is doing, in a few words (how far a large table's
# read got), and None when it is done: the CLI's line saying the command is still at work.
Status = Callable[[str | None], None]


def shown(
    progress: ProgressFactory | None, label: str, total: int
) -> AbstractContextManager[ProgressFn | None]:
    """``progress``'s context for ``label``, or one yielding None: no progress asked for, or
    nothing to do (no bar for work already done)."""
    return progress(label, total) if progress and total else nullcontext(None)


class Ticks:
    """Advances a progress callback (if any) every ``every`` items, not at every one: for
    loops over many quick items (fusing, assembling a matrix)."""

    def __init__(self, tick: ProgressFn | None, every: int = 64) -> None:
        self._tick = tick
        self._every = every
        self._pending = 0

    def add(self) -> None:
        self._pending += 1
        if self._pending == self._every:
            self.flush()

    def flush(self) -> None:
        if self._tick and self._pending:
            self._tick(self._pending)
        self._pending = 0
