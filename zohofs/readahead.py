"""Sequential-read detection: how far ahead to fetch for one open file."""

from __future__ import annotations


class Readahead:
    """A window (in blocks) that doubles while a reader moves forward and resets on a jump.

    The kernel's own readahead issues requests a little out of order, so a read that lands
    within ``slack`` bytes of where the last one ended still counts as sequential.
    """

    def __init__(self, max_window: int, slack: int) -> None:
        self._max = max_window
        self._slack = slack
        self._next: int | None = None
        self.window = 0

    def advise(self, offset: int, size: int) -> int:
        """Record a read of ``size`` bytes at ``offset``; return the blocks to fetch ahead."""
        if self._next is None:
            sequential = offset == 0
        else:
            sequential = self._next - self._slack <= offset <= self._next + self._slack
        if sequential:
            self.window = min(self._max, max(1, self.window * 2))
            self._next = max(self._next or 0, offset + size)
        else:
            self.window = 0
            self._next = offset + size
        return self.window
