"""The block reader's way to the disk cache: chunks loaded in worker threads, and what
was fetched written behind the reads, within a bound of bytes waiting for the disk.

The cache's own policy (what is kept, checked and evicted) is diskcache.py's; this
module decides only when the event loop hands work to it and when a fetch waits for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from zohofs.buffers import BufferPool
from zohofs.diskcache import DiskCache

log = logging.getLogger(__name__)

# Bytes fetched for the disk cache that it has not written yet: past this, what is
# fetched ahead waits, and what a read waits for is not kept (a disk slower than the
# network must not hold a read up, nor cost memory: the writers hold the cache's own
# buffers, beyond its size only those it evicted before they were written).
PENDING = 32 << 20
# Threads writing to the disk cache at once: each waits on the disk most of the time.
WRITERS = 4


class DiskIO:
    def __init__(self, disk: DiskCache, buffers: BufferPool,
                 nursery: Callable[[], trio.Nursery | None]) -> None:
        """``buffers``: the pool chunks are loaded into; ``nursery()``: the mount's,
        where writes run behind the reads (None before it starts: nothing is written
        then)."""
        self.disk = disk
        self._buffers = buffers
        self._nursery = nursery
        self._writers = trio.CapacityLimiter(WRITERS)
        self._pending = 0  # bytes fetched for the disk and not written yet
        self._caught_up = trio.Event()  # set (and replaced) as each write ends

    def opened(self, version: str) -> None:
        """A handle of ``version`` opened: the other versions of its file go (in a
        worker thread; once a mount per version, so at once after the first)."""
        nursery = self._nursery()
        if nursery is not None:
            nursery.start_soon(trio.to_thread.run_sync, self.disk.retire_others, version)

    async def load(self, version: str, first: int,
                   lengths: list[int]) -> list[memoryview] | None:
        """The chunks ``first``, … of ``version`` from disk, when it holds them all and
        they are sound; else None (no trip to a thread when it knows they are not there:
        a cold copy's case)."""
        if not self.disk.holds(version, range(first, first + len(lengths))):
            return None
        return await trio.to_thread.run_sync(self.disk.load, version, first, lengths,
                                             lambda _: self._buffers.take())

    async def keep(self, version: str, first: int, pieces: list[memoryview],
                   ahead: bool) -> None:
        """Write these fetched chunks behind the reads. Fetching ahead waits for the disk
        to catch up, so every chunk read is kept; a read never waits (its chunks are not
        kept when too much is waiting)."""
        length = sum(map(len, pieces))
        if ahead:
            while not self._room(length):
                await self._caught_up.wait()
        nursery = self._nursery()
        if nursery is not None and self._room(length):
            # From the buffers the cache holds: the pool hands none out again while a
            # view of it (these) exists.
            self._pending += length
            nursery.start_soon(self._write, version, first, pieces, length)

    def _room(self, length: int) -> bool:
        """Whether ``length`` more bytes may wait to be written (a run bigger than the
        limit may, alone)."""
        return not self._pending or self._pending + length <= PENDING

    async def _write(self, version: str, first: int, pieces: list[memoryview],
                     length: int) -> None:
        try:
            async with self._writers:
                await trio.to_thread.run_sync(self.disk.store, version, first, pieces)
        except Exception:  # in the mount's top-level nursery: must never end the mount
            log.exception("disk cache: unexpected error while writing")
        finally:
            self._pending -= length
            self._caught_up.set()
            self._caught_up = trio.Event()
