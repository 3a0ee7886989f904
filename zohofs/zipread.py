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

import zlib
from collections.abc import Hashable
from typing import Protocol

import trio

from zohofs.cache import ChunkCache
from zohofs.errors import BadArchive, UnreadableMember
from zohofs.planner import CHUNK, MiB, chunk_range, slice_chunks
from zohofs.zipindex import DEFLATED, STORED, Member

CHECKPOINT_EVERY = 4 * MiB  # a multiple of CHUNK
_CHUNKS_PER_CHECKPOINT = CHECKPOINT_EVERY // CHUNK
# Compressed bytes asked for at a time: sequential, so the archive's reads ramp up.
INPUT = 256 * 1024


class ArchiveSource(Protocol):
    """The archive's bytes, as the filesystem reads them for one open member."""

    async def read(self, offset: int, size: int) -> list[memoryview]: ...

    def peek(self, offset: int) -> memoryview | None:
        """Bytes from ``offset`` to the end of their cached chunk, if cached; no I/O."""


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
        raise self.failed or BadArchive(f"{self.name}: cannot be read")

    def _fail(self, reason: str) -> BadArchive:
        self.failed = BadArchive(f"{self.name}: {reason}")
        return self.failed


def member_reader(name: str, member: Member, data_offset: int, archive_size: int,
                  cache: ChunkCache, key: Hashable) -> MemberReader:
    """The reader for ``member``, whose data starts at ``data_offset`` of the archive."""
    if data_offset + member.compressed_size > archive_size:
        raise BadArchive(f"{name}: its data would end past the end of the archive")
    if member.method == STORED and not member.encrypted:
        if member.compressed_size != member.size:
            raise BadArchive(f"{name}: stored, but its sizes differ")
        return StoredReader(name, member, data_offset)
    if member.method == DEFLATED and not member.encrypted:
        return DeflatedReader(name, member, data_offset, cache, key)
    reader = MemberReader(name, member, data_offset)
    reader.failed = UnreadableMember(
        f"{name}: encrypted, zohofs cannot read it" if member.encrypted else
        f"{name}: compression method {member.method} is not one zohofs can inflate (only "
        "stored and deflated); read it from the zip with an archive tool")
    return reader


class StoredReader(MemberReader):
    """Stored bytes are the archive's: reads map straight onto it. The CRC-32 follows the
    bytes read from the start in order (also when the kernel's reads arrive slightly out of
    order: what is cached past the verified prefix is taken from the cache)."""

    def __init__(self, name: str, member: Member, data_offset: int) -> None:
        super().__init__(name, member, data_offset)
        self._verified = 0
        self._crc = 0

    async def read(self, source: ArchiveSource, offset: int, size: int) -> list[memoryview]:
        if self.failed is not None:
            raise self.failed
        end = min(offset + size, self.member.size)
        if offset >= end:
            return []
        pieces = await source.read(self.data_offset + offset, end - offset)
        if offset <= self._verified < end:
            at = offset
            for piece in pieces:
                skip = max(0, self._verified - at)
                if skip < len(piece):
                    self._crc = zlib.crc32(piece[skip:], self._crc)
                at += len(piece)
            self._verified = end
            self._follow_cache(source)
            if self._verified == self.member.size and self._crc != self.member.crc:
                raise self._fail(f"CRC-32 mismatch (the archive says {self.member.crc:08x}, "
                                 f"its bytes give {self._crc:08x}): the archive is damaged")
        return pieces

    def _follow_cache(self, source: ArchiveSource) -> None:
        while self._verified < self.member.size:
            data = source.peek(self.data_offset + self._verified)
            if data is None:
                return
            data = data[:self.member.size - self._verified]
            self._crc = zlib.crc32(data, self._crc)
            self._verified += len(data)


class _Cursor:
    """A decoder on its way through the member: the next chunk it makes, and where."""

    def __init__(self, index: int, position: int, decoder: zlib._Decompress,
                 crc: int) -> None:
        self.index = index  # of the next output chunk
        self.position = position  # of the next compressed byte the decoder has not seen
        self.decoder = decoder
        self.crc = crc  # of all output before ``index``
        self.pending = b""  # compressed bytes read, not yet consumed


class DeflatedReader(MemberReader):
    def __init__(self, name: str, member: Member, data_offset: int, cache: ChunkCache,
                 key: Hashable) -> None:
        super().__init__(name, member, data_offset)
        self._cache = cache
        self._key = key
        self._lock = trio.Lock()  # one decoder at work per member
        self._checkpoints: dict[int, tuple[int, zlib._Decompress, int]] = {
            0: (0, zlib.decompressobj(-zlib.MAX_WBITS), 0)}
        self._cursor: _Cursor | None = None

    async def read(self, source: ArchiveSource, offset: int, size: int) -> list[memoryview]:
        end = min(offset + size, self.member.size)
        if offset >= end:
            return []
        wanted = chunk_range(offset, end)
        pieces = [await self._chunk(source, i) for i in wanted]
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
                raise self.failed
            cursor = self._cursor
            nearest = index - index % _CHUNKS_PER_CHECKPOINT
            if cursor is None or not nearest <= cursor.index <= index:
                nearest = max(c for c in self._checkpoints if c <= index)
                position, decoder, crc = self._checkpoints[nearest]
                cursor = _Cursor(nearest, position, decoder.copy(), crc)
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
        if cursor.index % _CHUNKS_PER_CHECKPOINT == 0 and cursor.index not in self._checkpoints:
            self._checkpoints[cursor.index] = (cursor.position, cursor.decoder.copy(),
                                               cursor.crc)
        data = memoryview(out)
        self._cache.put((self._key, index), data)
        return data
