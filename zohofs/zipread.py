"""Reading one member of a zip: stored bytes as ranges of the archive, deflated ones
inflated as a stream with checkpoints; the CRC-32 checked whenever a member is read to
its end.

No FUSE and no HTTP here: the bytes of the archive come from an :class:`ArchiveSource`
(the filesystem's cached, ranged reads), inflated chunks go to and come from the
filesystem's chunk cache.

Seeking in deflated data: a deflate stream can only be decoded from its start, so every
:data:`CHECKPOINT_EVERY` bytes of output a copy of the decoder's state is kept (zlib's own
``Decompress.copy()``: its window and bit position, about 40 KiB). A read anywhere then
inflates at most that much before reaching its bytes, and a backward seek never starts
over from the member's first byte.
"""

from __future__ import annotations

import bisect
import functools
import zlib
from collections.abc import Hashable
from typing import Protocol

import cachetools
import trio

from zohofs.cache import ChunkCache
from zohofs.errors import BadArchive, UnreadableMember, again
from zohofs.planner import CHUNK, MiB, chunk_range, slice_chunks
from zohofs.zipindex import DEFLATED, STORED, Member

CHECKPOINT_EVERY = 4 * MiB  # a multiple of CHUNK
_CHUNKS_PER_CHECKPOINT = CHECKPOINT_EVERY // CHUNK
# Compressed bytes asked for at a time: sequential, so the archive's reads ramp up.
INPUT = 256 * 1024


class ArchiveSource(Protocol):
    """The archive's bytes, as the filesystem reads them for one open member."""

    async def read(self, offset: int, size: int) -> list[memoryview]: ...


class MemberReader:
    """What every open handle of one member (of one archive version) shares; ``name``
    is the member's path in the mount, for messages."""

    def __init__(self, name: str, member: Member, data_offset: int) -> None:
        self.name = name
        self.member = member
        self.data_offset = data_offset
        self.failed: BadArchive | None = None
        self.inflated = 0  # bytes of output inflated, for `zohofs status`

    async def read(self, source: ArchiveSource, offset: int, size: int) -> list[memoryview]:
        """Exactly ``size`` bytes of the member at ``offset`` (fewer only at its end)."""
        raise again(self.failed) if self.failed else BadArchive(f"{self.name}: cannot be read")

    def _fail(self, reason: str) -> BadArchive:
        self.failed = BadArchive(f"{self.name}: {reason}")
        return self.failed


def member_reader(name: str, member: Member, data_offset: int, archive_size: int,
                  cache: ChunkCache, key: Hashable, checkpoints: Checkpoints) -> MemberReader:
    """The reader for ``member``, whose data starts at ``data_offset`` of the archive."""
    if data_offset + member.compressed_size > archive_size:
        raise BadArchive(f"{name}: its data would end past the end of the archive")
    if member.method == STORED and not member.encrypted:
        if member.compressed_size != member.size:
            raise BadArchive(f"{name}: stored, but its sizes differ")
        return StoredReader(name, member, data_offset)
    if member.method == DEFLATED and not member.encrypted:
        return DeflatedReader(name, member, data_offset, cache, key, checkpoints)
    reader = MemberReader(name, member, data_offset)
    reader.failed = UnreadableMember(
        f"{name}: encrypted, zohofs cannot read it" if member.encrypted else
        f"{name}: compression method {member.method} is not one zohofs can inflate (only "
        "stored and deflated); read it from the zip with an archive tool")
    return reader


class StoredReader(MemberReader):
    """Stored bytes are the archive's: reads map straight onto it. The CRC-32 is checked
    once every byte has passed, in whatever order the reads came: each run of bytes read
    back to back keeps its CRC-32, runs that meet are joined (crc32_combine), and a run
    from the first byte to the last is the member's."""

    def __init__(self, name: str, member: Member, data_offset: int) -> None:
        super().__init__(name, member, data_offset)
        self._starts: list[int] = []  # of the runs, sorted; they neither overlap nor touch
        self._runs: dict[int, tuple[int, int]] = {}  # start -> (end, CRC-32 of the run)
        self._checked = False

    async def read(self, source: ArchiveSource, offset: int, size: int) -> list[memoryview]:
        if self.failed is not None:
            raise again(self.failed)
        end = min(offset + size, self.member.size)
        if offset >= end:
            return []
        pieces = await source.read(self.data_offset + offset, end - offset)
        if not self._checked:
            self._follow(pieces, offset, end)
            whole = self._runs.get(0)
            if whole is not None and whole[0] == self.member.size:
                self._checked, self._starts, self._runs = True, [], {}
                if whole[1] != self.member.crc:
                    raise self._fail(f"CRC-32 mismatch (the archive says "
                                     f"{self.member.crc:08x}, its bytes give "
                                     f"{whole[1]:08x}): the archive is damaged")
        return pieces

    def _follow(self, pieces: list[memoryview], offset: int, end: int) -> None:
        """Add the bytes of ``[offset, end)`` that no run holds yet to the runs."""
        at = offset
        while at < end:
            i = bisect.bisect_right(self._starts, at) - 1
            if i >= 0 and self._runs[self._starts[i]][0] > at:  # inside a run: known
                at = self._runs[self._starts[i]][0]
                continue
            gap_end = min(end, self._starts[i + 1]) if i + 1 < len(self._starts) else end
            self._add(at, gap_end, _crc_of(pieces, offset, at, gap_end))
            at = gap_end

    def _add(self, start: int, end: int, crc: int) -> None:
        """A new run, joined with the runs it touches on either side."""
        before = bisect.bisect_left(self._starts, start) - 1
        if before >= 0 and self._runs[self._starts[before]][0] == start:
            first = self._starts[before]
            start, crc = first, crc32_combine(self._runs[first][1], crc, end - start)
        else:
            bisect.insort(self._starts, start)
        after = self._runs.pop(end, None)
        if after is not None:
            self._starts.remove(end)
            crc, end = crc32_combine(crc, after[1], after[0] - end), after[0]
        self._runs[start] = (end, crc)


def _crc_of(pieces: list[memoryview], offset: int, start: int, end: int) -> int:
    """The CRC-32 of bytes ``[start, end)`` of ``pieces``, which begin at ``offset``."""
    crc, at = 0, offset
    for piece in pieces:
        low, high = max(start, at), min(end, at + len(piece))
        if low < high:
            crc = zlib.crc32(piece[low - at:high - at], crc)
        at += len(piece)
    return crc


def _times(matrix: list[int], vector: int) -> int:
    out, bit = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[bit]
        vector >>= 1
        bit += 1
    return out


@functools.cache
def _zeros(power: int) -> list[int]:
    """The linear map (over GF(2)) that 2**power zero bytes make of a CRC-32 register:
    zlib's crc32_combine, one power of two at a time."""
    if power == 0:
        bit = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
        for _ in range(3):
            bit = [_times(bit, column) for column in bit]
        return bit
    half = _zeros(power - 1)
    return [_times(half, column) for column in half]


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """The CRC-32 of A followed by B, from A's and B's (B being ``second_length`` long)."""
    power = 0
    while second_length:
        if second_length & 1:
            first = _times(_zeros(power), first)
        second_length >>= 1
        power += 1
    return first ^ second


class _Cursor:
    """A decoder on its way through the member: the next chunk it makes, and where."""

    def __init__(self, index: int, position: int, decoder: zlib._Decompress,
                 crc: int) -> None:
        self.index = index  # of the next output chunk
        self.position = position  # of the next compressed byte the decoder has not seen
        self.decoder = decoder
        self.crc = crc  # of all output before ``index``
        self.pending = b""  # compressed bytes read, not yet consumed


# What one kept decoder costs besides the input it still holds (its unconsumed_tail,
# up to INPUT bytes): zlib's 32 KiB window and its state.
CHECKPOINT_COST = 48 * 1024


def _checkpoint_size(checkpoint: tuple[int, zlib._Decompress, int]) -> int:
    return CHECKPOINT_COST + len(checkpoint[1].unconsumed_tail)


class Checkpoints:
    """The inflation checkpoints of every member, least recently used dropped first
    within one budget of bytes (counted in the cache size: the block reader leaves room
    for ``size``). A dropped checkpoint costs a longer inflation, never wrong bytes."""

    def __init__(self, capacity: int) -> None:
        self._lru: cachetools.LRUCache[Hashable, tuple[int, zlib._Decompress, int]] = (
            cachetools.LRUCache(maxsize=max(capacity, CHECKPOINT_COST),
                                getsizeof=_checkpoint_size))

    @property
    def size(self) -> int:
        return int(self._lru.currsize)

    def get(self, key: Hashable) -> tuple[int, zlib._Decompress, int] | None:
        return self._lru.get(key)

    def put(self, key: Hashable, checkpoint: tuple[int, zlib._Decompress, int]) -> None:
        if _checkpoint_size(checkpoint) <= self._lru.maxsize:  # else not worth its room
            self._lru[key] = checkpoint


class DeflatedReader(MemberReader):
    def __init__(self, name: str, member: Member, data_offset: int, cache: ChunkCache,
                 key: Hashable, checkpoints: Checkpoints) -> None:
        super().__init__(name, member, data_offset)
        self._cache = cache
        self._key = key
        self._lock = trio.Lock()  # one decoder at work per member
        self._checkpoints = checkpoints  # by (key, chunk index); index 0 needs none
        self._cursor: _Cursor | None = None

    def _nearest_checkpoint(self, index: int) -> _Cursor:
        """A decoder at the latest kept checkpoint at or before chunk ``index``."""
        for at in range(index - index % _CHUNKS_PER_CHECKPOINT, 0, -_CHUNKS_PER_CHECKPOINT):
            kept = self._checkpoints.get((self._key, at))
            if kept is not None:
                position, decoder, crc = kept
                return _Cursor(at, position, decoder.copy(), crc)
        return _Cursor(0, 0, zlib.decompressobj(-zlib.MAX_WBITS), 0)

    async def read(self, source: ArchiveSource, offset: int, size: int) -> list[memoryview]:
        if self.failed is not None:  # known damaged: what was inflated before is no data
            raise again(self.failed)
        end = min(offset + size, self.member.size)
        if offset >= end:
            return []
        wanted = chunk_range(offset, end)
        pieces = [await self._chunk(source, i) for i in wanted]
        if self.failed is not None:  # found out while this read was waiting
            raise again(self.failed)
        return slice_chunks(pieces, wanted.start, offset, end)

    async def _chunk(self, source: ArchiveSource, index: int) -> memoryview:
        key = (self._key, index)
        data = self._cache.peek(key)
        if data is not None:
            return data
        async with self._lock:
            data = self._cache.peek(key)
            if data is not None:
                return data
            if self.failed is not None:
                raise again(self.failed)
            cursor = self._cursor
            nearest = index - index % _CHUNKS_PER_CHECKPOINT
            if cursor is None or not nearest <= cursor.index <= index:
                cursor = self._nearest_checkpoint(index)
            self._cursor = None  # until it is known to be sound again
            while True:
                data = await self._next(source, cursor)
                if cursor.index - 1 == index:
                    break
            self._cursor = cursor
            return data

    async def _next(self, source: ArchiveSource, cursor: _Cursor) -> memoryview:
        """Inflate the chunk at ``cursor`` and keep it in the cache."""
        index = cursor.index
        want = min(CHUNK, self.member.size - index * CHUNK)
        out = bytearray()
        while len(out) < want:
            if not cursor.pending:
                left = self.member.compressed_size - cursor.position
                if left <= 0:
                    raise self._fail("its compressed data ends before its last byte: the "
                                     "archive is damaged")
                pieces = await source.read(self.data_offset + cursor.position,
                                           min(INPUT, left))
                cursor.pending = b"".join(pieces)
                if not cursor.pending:  # cannot be: member_reader checked the sizes
                    raise self._fail("its data ends early")
            try:
                piece = await trio.to_thread.run_sync(
                    cursor.decoder.decompress, cursor.pending, want - len(out))
            except zlib.error as exc:
                raise self._fail(f"cannot inflate it ({exc}): the archive is damaged") from None
            consumed = len(cursor.pending) - len(cursor.decoder.unconsumed_tail)
            cursor.position += consumed
            cursor.pending = cursor.decoder.unconsumed_tail
            out += piece
            if cursor.decoder.eof and len(out) < want:
                raise self._fail("its deflate stream ends before its last byte: the archive "
                                 "is damaged")
        self.inflated += len(out)
        cursor.crc = zlib.crc32(out, cursor.crc)
        cursor.index += 1
        if cursor.index * CHUNK >= self.member.size and cursor.crc != self.member.crc:
            raise self._fail(f"CRC-32 mismatch (the archive says {self.member.crc:08x}, its "
                             f"bytes give {cursor.crc:08x}): the archive is damaged")
        if cursor.index % _CHUNKS_PER_CHECKPOINT == 0:
            key = (self._key, cursor.index)
            if self._checkpoints.get(key) is None:
                self._checkpoints.put(key, (cursor.position, cursor.decoder.copy(),
                                            cursor.crc))
        data = memoryview(out)
        self._cache.put((self._key, index), data)
        return data
