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

    async def _acquire(self, file: str) -> trio.CapacityLimiter:
        """A slot: a shared one, or after a second the spare, while every shared slot
        is held by one other file alone; turn about, so a waiter takes whichever frees
        first."""
        while True:
            with trio.move_on_after(SPARE_AFTER):
                await self._main.acquire()
                return self._main
            held_by = set(self._holders)
            if len(held_by) == 1 and file not in held_by:
                with trio.move_on_after(SPARE_AFTER):
                    await self._spare.acquire()
                    return self._spare

    @contextlib.asynccontextmanager
    async def slot(self, file: str) -> AsyncIterator[None]:
        limiter = await self._acquire(file)
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
