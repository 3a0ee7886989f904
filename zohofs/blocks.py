"""The block reader: the one way to read a file's bytes. Open handles, the chunk cache,
the prefetch budget, fetches planned to follow each reader, and whole-file streams for
servers that ignore Range.

A read is served from cached chunks; what is missing is claimed (one fetch per chunk,
whoever asks) and fetched by the reader's own task, and what the planner expects next is
fetched ahead in the mount's nursery, held for its reader within one budget.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field

import trio

from zohofs.answers import RemoteInfo
from zohofs.auth import TokenSource
from zohofs.buffers import BufferPool
from zohofs.cache import Abandoned, ChunkCache
from zohofs.chunkfiles import version_name
from zohofs.diskcache import DiskCache
from zohofs.diskio import DiskIO
from zohofs.errors import AccessDenied, BadAnswer, RemoteChanged, TransportError, ZohofsError, again
from zohofs.interest import Interest
from zohofs.planner import CHUNK, PrefetchBudget, ReadPattern, chunk_range, slice_chunks
from zohofs.probes import check_expiry, validated
from zohofs.remote import RangeReader
from zohofs.stats import FileActivity
from zohofs.tree import KernelCache, Node
from zohofs.zoho import BackupFile

log = logging.getLogger(__name__)

# Buffers of evicted chunks kept for the next ones (16 MiB), recycled as a copy reads.
BUFFERS_KEPT = 128


@dataclass(eq=False)
class OpenFile:
    node: Node
    file: BackupFile  # as it was at open: a later listing may bring a new link
    info: RemoteInfo
    pattern: ReadPattern
    activity: FileActivity  # what `zohofs status` shows of this handle
    # What the cache keys of this handle's blocks say about the version: the validators,
    # or for a server that sends none, this open alone (nothing proves two opens saw the
    # same bytes, so they share no blocks).
    version: Hashable = None
    # Chunks fetched (or being fetched) ahead for this reader and not yet read, with the
    # bytes each took from the prefetch budget.
    held: dict[Hashable, int] = field(default_factory=dict)
    # The version's name in the disk cache; None without one, or without validators
    # (nothing would prove that a later mount reads the same bytes).
    on_disk: str | None = None
    # zohofs's own reads of an archive (--expand): no member boundaries to learn for them.
    own: bool = False


class BlockReader:
    """One class, about 350 lines: claiming, prefetching, holding and dropping chunks
    share the cache, the budget and each handle's held chunks, whose invariants (a
    chunk claimed once, a held chunk counted once) are easier to keep in one place."""

    def __init__(self, remote: RangeReader, tokens: Mapping[str, TokenSource], *,
                 cache_size: int, max_request: int, max_ahead: int, read_deadline: float,
                 kernel: KernelCache | None = None,
                 also_cached: Callable[[], int] = lambda: 0,
                 disk: DiskCache | None = None) -> None:
        """``also_cached`` says how much other memory counts in ``cache_size``
        (``--expand``'s inflation checkpoints)."""
        self._remote = remote
        self._tokens = tokens
        self._kernel = kernel
        self.read_deadline = read_deadline
        self.stats = remote.stats
        # Up to half the cache holds chunks fetched ahead and not yet read (never evicted);
        # what was read fills the rest, and all of it when nothing is fetched ahead.
        self._budget = PrefetchBudget(cache_size // 2)
        self._buffers = BufferPool(CHUNK, limit=BUFFERS_KEPT)
        # Chunks on their way count too: the cache's memory stays within its size.
        self.cache = ChunkCache(cache_size,
                                reserved=lambda: self._budget.used + also_cached(),
                                on_evict=self._buffers.give)
        self._max_request = max_request
        self._max_ahead = max_ahead
        self._open: set[OpenFile] = set()
        self._opens = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._interest: Interest[OpenFile] = Interest(
            lambda handle, i: self.cache.peek(self._key(handle, i)), lambda: self._nursery)
        self._disk = None if disk is None else DiskIO(disk, self._buffers, lambda: self._nursery)

    def start(self, nursery: trio.Nursery) -> None:
        """Give the reader a place to run background prefetches."""
        self._nursery = nursery

    def open(self, node: Node, info: RemoteInfo, own: bool = False) -> OpenFile:
        """A handle that reads ``node`` as ``info`` describes it (probed for this open);
        ``own`` for zohofs's own reads of an archive (``--expand``)."""
        assert node.file is not None
        version = ((info.etag, info.last_modified, info.size) if validated(info)
                   else ("open", next(self._opens)))
        pattern = ReadPattern(self._budget, info.size, max_ahead=self._max_ahead,
                              max_request=self._max_request)
        handle = OpenFile(node, node.file, info, pattern,
                          FileActivity(node.file.path, info.size), version, own=own)
        if self._disk is not None and validated(info):
            handle.on_disk = version_name(node.file.path,
                                          (info.etag, info.last_modified, info.size))
            self._disk.opened(handle.on_disk)
        self._open.add(handle)
        return handle

    def open_files(self) -> set[str]:
        """The paths of the files open now (an expanded member's archive included)."""
        return {h.file.path for h in self._open}

    def release(self, handle: OpenFile) -> None:
        if handle not in self._open:
            return
        self._open.discard(handle)
        handle.pattern.stop()
        self._let_go(handle)
        node = handle.node
        if node.stream and not any(h.node is node for h in self._open):
            node.stream.close()  # nobody reads on: give the connection back
            node.stream = None

    async def read(self, handle: OpenFile, offset: int, size: int) -> list[memoryview]:
        """Exactly ``size`` bytes at ``offset``, fewer only at end of file, as views of the
        cached chunks in order; what is fetched ahead follows the handle's pattern."""
        end = min(offset + size, handle.info.size)
        if offset >= end:
            return []
        wanted = chunk_range(offset, end)
        if not handle.info.ranges:
            with self._doubting(handle):
                pieces = [await self._streamed_chunk(handle, i) for i in wanted]
        else:
            pattern = handle.pattern
            was_sequential = pattern.sequential
            plans = pattern.advise(offset, end - offset,
                                   self._interest.fence(handle, self._open))
            if was_sequential and not pattern.sequential:
                self._let_go(handle)  # a jump: what was fetched ahead is not for now
            # What this read needs is claimed before anything is fetched ahead, and
            # fetched by this task, so it never queues behind prefetches for a connection.
            demand = self._claim(handle, wanted)
            missed = sum(len(run) for run in demand)
            self.stats.chunk_misses += missed
            self.stats.chunk_hits += len(wanted) - missed
            for start, length in plans:
                if not self._prefetch(handle, start, length):
                    break
                pattern.issued(start, length)
            for n, run in enumerate(demand):
                try:
                    await self._fetch_run(handle, run, ahead=False)
                except BaseException:
                    for rest in demand[n + 1:]:  # claimed, never to be fetched by us
                        self._drop(handle, [self._key(handle, i) for i in rest], Abandoned())
                    raise
            pieces = [await self._chunk(handle, i) for i in wanted]
        return slice_chunks(pieces, wanted.start, offset, end)

    def _key(self, handle: OpenFile, index: int) -> Hashable:
        # The version is part of the key: bytes of two versions of a file never mix.
        return (handle.node.ino, handle.version, index)

    def _claim(self, handle: OpenFile, indices: range) -> list[range]:
        """Announce fetches of the chunks of ``indices`` that are nowhere in the cache,
        as runs of consecutive chunks of at most one request each (no await: nobody else
        can claim them in between)."""
        runs: list[range] = []
        limit = max(1, self._max_request // CHUNK)
        start: int | None = None
        for i in indices:
            if self._key(handle, i) in self.cache:
                if start is not None:
                    runs.append(range(start, i))
                    start = None
            elif start is None:
                start = i
            elif i - start == limit:
                runs.append(range(start, i))
                start = i
        if start is not None:
            runs.append(range(start, indices.stop))
        for run in runs:
            self.cache.begin(self._key(handle, i) for i in run)
        return runs

    def _prefetch(self, handle: OpenFile, start: int, length: int) -> bool:
        """Fetch ``[start, start+length)`` ahead of the reader, in the background, held
        for it; False when the prefetch budget (or the lack of a nursery) forbids it."""
        if self._nursery is None:
            return False
        indices = chunk_range(start, start + length)
        missing = [i for i in indices if self._key(handle, i) not in self.cache]
        need = sum(self._chunk_length(handle, i) for i in missing)
        if need and not self._budget.take(need):
            return False
        for i in missing:
            handle.held[self._key(handle, i)] = self._chunk_length(handle, i)
        for run in self._claim(handle, indices):
            self._nursery.start_soon(self._fetch_run, handle, run, True)
        return True

    def _chunk_length(self, handle: OpenFile, index: int) -> int:
        return min(CHUNK, handle.info.size - index * CHUNK)

    def _let_go(self, handle: OpenFile) -> None:
        """Chunks fetched ahead for this reader are not awaited any more: evictable once
        they arrive, and no longer counted against the prefetch budget."""
        for key, length in handle.held.items():
            self.cache.release(key)
            self._budget.give(length)
        handle.held.clear()

    async def _chunk(self, handle: OpenFile, index: int) -> memoryview:
        key = self._key(handle, index)
        while True:
            data = self.cache.peek(key)
            if data is not None:
                break
            flight = self.cache.flight(key)
            if flight is None:  # evicted since it was claimed, or its prefetch gave up
                self.cache.begin([key])
                flight = self.cache.flight(key)
                assert flight is not None
                await self._fetch_run(handle, range(index, index + 1), ahead=False)
            else:
                await flight.done.wait()
            if flight.data is not None:
                data = flight.data
                break
            if not isinstance(flight.error, Abandoned):
                assert flight.error is not None
                raise again(flight.error)
        length = handle.held.pop(key, None)
        if length is not None:  # read at last: it may be evicted now
            self.cache.release(key)
            self._budget.give(length)
        return data

    async def _fetch_run(self, handle: OpenFile, run: range, ahead: bool) -> None:
        """Fetch the claimed chunks of ``run`` with one request and hand them to the cache.

        A failed prefetch tells its waiters nothing (they fetch for themselves and report
        what they meet); a failed demand fetch fails the chunks' waiters and the caller."""
        keys = [self._key(handle, i) for i in run]
        start = run.start * CHUNK
        length = min(run.stop * CHUNK, handle.info.size) - start
        pieces: list[memoryview] | None = None
        try:
            with trio.move_on_after(self.read_deadline if ahead else math.inf):
                pieces = await self._fetch_or_load(handle, run, start, length, ahead)
        except BaseException as exc:
            verdict = exc if isinstance(exc, ZohofsError) and not ahead else Abandoned()
            self._drop(handle, keys, verdict)
            if ahead and isinstance(exc, Exception):
                # Runs in the mount's top-level nursery: an escape would end the mount.
                log.log(logging.DEBUG if isinstance(exc, ZohofsError) else logging.ERROR,
                        "%s: prefetch of bytes %d-%d failed: %s", handle.file.path, start,
                        start + length - 1, exc, exc_info=not isinstance(exc, ZohofsError))
                return
            raise
        if pieces is None:  # a prefetch that outlived the read deadline
            self._drop(handle, keys, Abandoned())
            return
        for key, data in zip(keys, pieces, strict=True):
            self.cache.arrive(key, data, hold=key in handle.held)

    async def _fetch_or_load(self, handle: OpenFile, run: range, start: int,
                             length: int, ahead: bool) -> list[memoryview]:
        """The chunks of ``run``: from the disk cache when it holds them all, else from
        the server (and then kept on disk too)."""
        disk, version = self._disk, handle.on_disk
        if disk is None or version is None:
            return await self._fetch(handle, start, length)
        kept = await disk.load(version, run.start, [self._chunk_length(handle, i) for i in run])
        if kept is not None:
            return kept
        pieces = await self._fetch(handle, start, length)
        await disk.keep(version, run.start, pieces, ahead)
        return pieces

    def _drop(self, handle: OpenFile, keys: list[Hashable], verdict: BaseException) -> None:
        for key in keys:
            length = handle.held.pop(key, None)
            if length is not None:
                self._budget.give(length)
            self.cache.fail(key, verdict)

    async def _fetch(self, handle: OpenFile, start: int, length: int) -> list[memoryview]:
        file = handle.file
        check_expiry(file)
        try:
            with self._doubting(handle):
                return await self._remote.fetch(file.url, start, length, handle.info,
                                                self._tokens[file.account], piece=CHUNK,
                                                buffers=self._buffers)
        except AccessDenied:
            check_expiry(file)  # the link may have expired while the request was out
            raise

    @contextlib.contextmanager
    def _doubting(self, handle: OpenFile) -> Iterator[None]:
        """Mark the file stale when an answer contradicts its probe: open handles keep
        failing, the next open probes again (a new version, or a server that answers
        sensibly again) instead of trusting this probe."""
        try:
            yield
        except (RemoteChanged, BadAnswer):
            node = handle.node
            if node.info is handle.info and not node.stale:
                node.stale = True
                if self._kernel is not None:
                    self._kernel.stale(node.ino)
            raise

    async def _streamed_chunk(self, handle: OpenFile, index: int) -> memoryview:
        """A chunk of a file whose server ignores Range: read the whole-file answer up to
        it, keeping every chunk passed on the way. Correct bytes, at the price of starting
        over from byte 0 when a reader goes back past what the cache still holds."""
        node = handle.node
        node.stream_lock = node.stream_lock or trio.Lock()
        async with node.stream_lock:
            for attempt in range(2):
                cached = self.cache.peek(self._key(handle, index))
                if cached is not None:
                    return cached
                stream = node.stream
                if (stream is None or stream.info is not handle.info
                        or stream.position > index * CHUNK):
                    if stream is not None:
                        stream.close()
                    check_expiry(handle.file)
                    stream = node.stream = await self._remote.open_whole(
                        handle.file.url, handle.info, self._tokens[handle.file.account])
                try:
                    while True:
                        i = stream.position // CHUNK
                        data = await stream.read(min(CHUNK, handle.info.size - stream.position))
                        self.cache.put(self._key(handle, i), data)
                        if i == index:
                            return data
                except BaseException as exc:
                    stream.close()
                    node.stream = None
                    # A stream that broke is opened again once; anything else is final.
                    if attempt or not isinstance(exc, TransportError):
                        raise
        raise AssertionError("unreachable")
