"""A version's files in the disk cache, how they are read and written, and which are
kept open.

``<version>.chunks`` holds chunk ``i`` at byte ``i * CHUNK``, with holes where nothing
is kept. ``<version>.index`` starts with a header naming the version, then a record per
chunk: its length (0: none), an XXH3-64 hash of its bytes, and when it was last used
(seconds). What to keep, and for how long, is diskcache.py's to say.

One file pair per version rather than a file per chunk: a run of up to 64 chunks is
written with two calls and read with one, where files of their own cost four calls and a
turn of Python's lock each (reading from disk ran at 0.4-0.5 GB/s that way). XXH3-64
rather than a cryptographic digest: it guards against the disk, not an attacker (who can
write the 0700 directory can write anything); 64 bits leave damage unnoticed once in
2^64; and it hashes 30 GB/s here, where CRC-32 does 3.4 and SHA-256 1.5, which a read
from disk paid per byte (CRC-32 took most of the re-read's time).

Whole chunks are written and read with ``O_DIRECT`` where the filesystem allows it,
straight from and into the page-aligned buffers of the pool (buffers.py). Through the
page cache, a cold copy with the disk cache ran at 0.6x the speed of one without on a
2-core machine (every page of the file allocated and copied into, and a gigabyte of other
programs' cached files pushed out per gigabyte kept), and a re-read from the device at
0.44-0.53 GB/s; directly, at 0.9-1.1x and at the device's pace. A file's short last
chunk, and buffers the device refuses as not aligned (EINVAL: a caller's ``bytes`` may
be), go through the page cache; so does all of it on a filesystem without direct I/O.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import xxhash

from zohofs.errors import CacheInUse, ConfigError
from zohofs.planner import CHUNK
from zohofs.privatedir import UnsafeDirectory, private_directory

log = logging.getLogger(__name__)

CHUNKS, INDEX = ".chunks", ".index"
_MAGIC = b"zohofsC2"
_HEADER = struct.Struct("<8s33s")  # magic, version
_RECORD = struct.Struct("<IQI")  # length (0: none), XXH3-64, last used (seconds)
RECORD_SIZE = _RECORD.size
Piece = bytes | memoryview  # a chunk's bytes as written
# What a filesystem answers when it cannot do direct I/O (EINVAL also for memory that is
# not aligned as its device wants).
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
# fallocate(2): give the blocks of a range back, keep the file's size.
_PUNCH_HOLE = 0x02 | 0x01

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def digest(data: Piece) -> int:
    return xxhash.xxh3_64_intdigest(data)


def version_name(path: str, validators: Sequence[object]) -> str:
    """The file name of one version of one file: a digest of its path, then one of its
    validators (the versions of one file share the first half)."""
    return f"{name_digest(path)}-{name_digest(chr(0).join(str(v) for v in validators))}"


def name_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_of(root: Path, version: str) -> tuple[Path, Path]:
    """The index and chunk file of ``version``."""
    return root / f"{version}{INDEX}", root / f"{version}{CHUNKS}"


class Files:
    """A version's two files, open; closed once retired and nobody uses them
    (:class:`OpenFiles`'s lock guards ``users`` and ``retired``)."""

    def __init__(self, chunks: int, index: int, direct: int | None) -> None:
        self.chunks = chunks
        self.index = index
        self.direct = direct  # the chunk file opened for O_DIRECT, when it can be
        self.refused: int | None = None  # why direct I/O failed with aligned buffers
        self.users = 0
        self.retired = False

    @classmethod
    def open(cls, root: Path, version: str, create: bool) -> Files | None:
        """The files of ``version``, made if ``create``; None when they are not there."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
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
        try:
            direct: int | None = os.open(chunks_path, (flags & ~os.O_CREAT) | os.O_DIRECT)
        except OSError as exc:
            if exc.errno not in _NO_DIRECT and exc.errno != errno.ENOENT:  # ENOENT: it went
                os.close(chunks)
                os.close(index)
                raise
            direct = None
        return cls(chunks, index, direct)

    def close(self) -> None:
        os.close(self.chunks)
        os.close(self.index)
        if self.direct is not None:
            os.close(self.direct)

    def read(self, first: int, pieces: Sequence[memoryview]) -> int:
        """Chunks ``first``, ``first+1``, … into ``pieces``: the bytes read."""
        whole = _whole(pieces)
        got = self._direct(os.preadv, first, pieces[:whole])
        if got is None:
            return os.preadv(self.chunks, pieces, first * CHUNK)
        if got < whole * CHUNK or whole == len(pieces):
            return got
        return got + os.preadv(self.chunks, pieces[whole:], (first + whole) * CHUNK)

    def write(self, first: int, pieces: Sequence[Piece]) -> None:
        whole = _whole(pieces)
        wrote = self._direct(os.pwritev, first, pieces[:whole])
        if wrote is not None:
            _check(wrote, pieces[:whole])
        rest = 0 if wrote is None else whole
        if rest < len(pieces):
            _check(os.pwritev(self.chunks, pieces[rest:], (first + rest) * CHUNK), pieces[rest:])

    def _direct(self, call: Callable[[int, Sequence[Any], int], int], first: int,
                pieces: Sequence[Piece]) -> int | None:
        """``call`` (preadv or pwritev) of these whole chunks with O_DIRECT: the bytes it
        moved, or None when it cannot (no pieces, no direct I/O here, or memory that is
        not aligned: a caller's bytes rather than the pool's buffers)."""
        if self.direct is None or self.refused is not None or not pieces:
            return None
        try:
            return call(self.direct, pieces, first * CHUNK)
        except OSError as exc:
            if exc.errno not in _NO_DIRECT:
                raise
            if exc.errno != errno.EINVAL and self.refused is None:
                # Not for this filesystem, whatever the buffers. The descriptor stays open
                # until close(): another thread may be using it this moment.
                self.refused = exc.errno
                log.info("disk cache: the filesystem refuses direct I/O (%s): through the "
                         "page cache", exc.strerror)
            return None

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


def _check(wrote: int, pieces: Sequence[Piece]) -> None:
    if wrote != sum(map(len, pieces)):
        raise OSError(errno.ENOSPC, "short write")


def _whole(pieces: Sequence[Piece]) -> int:
    """How many pieces lead as whole chunks (direct I/O moves whole blocks only; a
    file's last chunk is short)."""
    return next((n for n, piece in enumerate(pieces) if len(piece) != CHUNK), len(pieces))


class OpenFiles:
    """The versions' files kept open (the most recently used ``keep``), each closed once
    it leaves and its last user is done. ``lock`` is the caller's, held by the caller
    around :meth:`forget` too, so that nothing opens a version's files as they go."""

    def __init__(self, root: Path, lock: threading.Lock, keep: int) -> None:
        self._root = root
        self._lock = lock
        self._keep = keep
        self._open: collections.OrderedDict[str, Files] = collections.OrderedDict()

    @contextlib.contextmanager
    def use(self, version: str, create: bool) -> Iterator[Files | None]:
        """The version's files, open for this caller (None when they do not exist and
        ``create`` is false)."""
        with self._lock:
            files = self._open.get(version)
            if files is None:
                files = Files.open(self._root, version, create)
                if files is not None:
                    self._open[version] = files
                    self._close_unused(self._keep)
            if files is not None:
                self._open.move_to_end(version)
                files.users += 1
        if files is None:
            yield None
            return
        try:
            yield files
        finally:
            with self._lock:
                files.users -= 1
                if files.retired and not files.users:
                    files.close()

    def forget(self, version: str) -> None:
        """The version's files go (the caller holds the lock)."""
        files = self._open.pop(version, None)
        if files is not None:
            self._retire(files)

    def close_all(self) -> None:
        """At the end, when no worker thread is left."""
        with self._lock:
            self._close_unused(0)

    def _close_unused(self, keep: int) -> None:
        while len(self._open) > keep:
            self._retire(self._open.popitem(last=False)[1])

    @staticmethod
    def _retire(files: Files) -> None:
        files.retired = True
        if not files.users:
            files.close()


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


def remove(path: Path) -> None:
    """A file or a folder of the cache's directory, gone (a link, not what it names)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def take_layout(directory: Path, layout: str) -> tuple[Path, int]:
    """The cache's own folder in the admin's ``directory``, made private, and the lock fd
    that makes it this mount's; refused while another mount holds it."""
    try:
        # Files here are deleted and rewritten, by root often: in a directory somebody
        # else could change, a link put there would aim that at any file.
        root = private_directory(directory, "the cache directory") / layout
        _make_private(root)
        fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot use the cache directory {directory}: "
                          f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheInUse(f"the cache directory {directory} is in use by another zohofs "
                         "mount: give each mount a directory of its own") from None
    return root, fd


def _make_private(root: Path) -> None:
    """``root``, mode 0700 (CRM data), refused when it is something else already: a
    link, a file, somebody else's folder."""
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        st = os.lstat(root)
        if stat.S_ISLNK(st.st_mode):
            kind = "a link"
        elif not stat.S_ISDIR(st.st_mode):
            kind = "not a directory"
        elif st.st_uid != os.geteuid():
            kind = f"owned by uid {st.st_uid}"
        else:
            kind = ""
        if kind:
            raise UnsafeDirectory(f"{root} is {kind}, not the directory zohofs makes there: "
                                  "remove it, or choose another cache directory") from None
    os.chmod(root, 0o700)


def remove_old_layouts(directory: Path, layouts: Sequence[str]) -> None:
    """What an older zohofs kept there, unless a mount of one uses it still."""
    for name in layouts:
        old = directory / name
        if old.is_symlink():
            continue  # not one zohofs made
        try:
            fd = os.open(old / "lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(old, ignore_errors=True)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        log.info("disk cache: removed %s, kept by an older zohofs in another layout", old)
