"""A version's files in the disk cache, and how they are read and written.

``<version>.chunks`` holds chunk ``i`` at byte ``i * CHUNK``, with holes where nothing
is kept. ``<version>.index`` starts with a header naming the version, then a record per
chunk: its length (0: none), an XXH3-64 hash of its bytes, and when it was last used
(seconds). What to keep, and for how long, is diskcache.py's to say.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import xxhash

from zohofs.planner import CHUNK

CHUNKS, INDEX = ".chunks", ".index"
_MAGIC = b"zohofsC2"
_HEADER = struct.Struct("<8s33s")  # magic, version
_RECORD = struct.Struct("<IQI")  # length (0: none), XXH3-64, last used (seconds)
RECORD_SIZE = _RECORD.size
# fallocate(2): give the blocks of a range back, keep the file's size.
_PUNCH_HOLE = 0x02 | 0x01

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def digest(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def files_of(root: Path, version: str) -> tuple[Path, Path]:
    """The index and chunk file of ``version``."""
    return root / f"{version}{INDEX}", root / f"{version}{CHUNKS}"


class Files:
    """A version's two files, open; closed once retired and nobody uses them (the
    cache's lock guards ``users`` and ``retired``)."""

    def __init__(self, chunks: int, index: int) -> None:
        self.chunks = chunks
        self.index = index
        self.users = 0
        self.retired = False

    @classmethod
    def open(cls, root: Path, version: str, create: bool) -> Files | None:
        """The files of ``version``, made if ``create``; None when they are not there."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        index_path, chunks_path = files_of(root, version)
        try:
            index = os.open(index_path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            if create and os.fstat(index).st_size == 0:
                os.pwrite(index, _HEADER.pack(_MAGIC, version.encode()), 0)
            chunks = os.open(chunks_path, flags, 0o600)
        except FileNotFoundError:  # removed by hand: nothing of it can be read
            os.close(index)
            return None
        except BaseException:
            os.close(index)
            raise
        return cls(chunks, index)

    def close(self) -> None:
        os.close(self.chunks)
        os.close(self.index)

    def read(self, first: int, pieces: Sequence[memoryview]) -> int:
        """Chunks ``first``, ``first+1``, … into ``pieces``: the bytes read."""
        return os.preadv(self.chunks, pieces, first * CHUNK)

    def write(self, first: int, pieces: Sequence[bytes]) -> None:
        if os.pwritev(self.chunks, pieces, first * CHUNK) != sum(map(len, pieces)):
            raise OSError(errno.ENOSPC, "short write")

    def write_records(self, first: int, records: Sequence[tuple[int, int, int]]) -> None:
        """The records (length, hash, last used) of chunks ``first``, ``first+1``, …"""
        os.pwrite(self.index, b"".join(_RECORD.pack(*r) for r in records),
                  _HEADER.size + first * _RECORD.size)

    def clear_records(self, start: int, stop: int) -> None:
        os.pwrite(self.index, bytes(_RECORD.size * (stop - start)),
                  _HEADER.size + start * _RECORD.size)

    def punch(self, start: int, stop: int) -> int:
        """Give the blocks of chunks ``[start, stop)`` back to the filesystem: 0, or the
        error number of why not."""
        if _fallocate is None:
            return errno.ENOSYS
        if _fallocate(self.chunks, _PUNCH_HOLE, start * CHUNK, (stop - start) * CHUNK) == 0:
            return 0
        return ctypes.get_errno()


def read_index(path: Path, version: str) -> dict[int, tuple[int, int, int]] | None:
    """The records of an index file, by chunk (those with bytes); None for a file that
    is not one of this layout's, for this version."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, name = _HEADER.unpack_from(data)
    if magic != _MAGIC or name.rstrip(b"\0") != version.encode():
        return None
    records = {}
    body = memoryview(data)[_HEADER.size:]
    for index in range(len(body) // _RECORD.size):
        length, hashed, used = _RECORD.unpack_from(body, index * _RECORD.size)
        if 0 < length <= CHUNK:
            records[index] = (length, hashed, used)
    return records


def runs(indices: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted indices as ``[start, stop)`` runs of consecutive ones."""
    start = prev = indices[0]
    for i in indices[1:]:
        if i != prev + 1:
            yield start, prev + 1
            start = i
        prev = i
    yield start, prev + 1
