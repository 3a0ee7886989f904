"""How many requests one host gets at once, and the spare that keeps a stuck file from
holding another file's reads hostage."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator

import trio

# How long a request waits for a slot before it may take the host's spare one.
SPARE_AFTER = 1.0


class HostSlots:
    """The connections one host gets: ``size`` at a time, shared by every file, plus one
    spare for a file whose requests wait behind another file's alone.

    A file whose server drips or went silent can hold every slot until its requests time
    out (the request deadline, 30 s); a read of another file waiting behind them gets the
    spare after :data:`SPARE_AFTER`. Requests of several files sharing the slots, as
    concurrent copies do, take turns as usual.
    """

    def __init__(self, size: int) -> None:
        self._main = trio.CapacityLimiter(size)
        self._spare = trio.CapacityLimiter(1)
        self._holders: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def slot(self, file: str) -> AsyncIterator[None]:
        limiter = self._main
        with trio.move_on_after(SPARE_AFTER) as waited:
            await limiter.acquire()
        if waited.cancelled_caught:
            # Every slot is held: by one other file alone, the spare is this file's.
            held_by = set(self._holders)
            limiter = self._spare if len(held_by) == 1 and file not in held_by else limiter
            await limiter.acquire()
        if limiter is self._main:
            self._holders[file] += 1
        try:
            yield
        finally:
            if limiter is self._main:
                self._holders[file] -= 1
                if not self._holders[file]:
                    del self._holders[file]
            limiter.release()
