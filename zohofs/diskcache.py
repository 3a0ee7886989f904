"""Chunks kept on disk (``--cache-dir``): what was fetched once is not fetched again, by
later reads, later mounts, within a size the admin sets.

Layout: ``DIR/zohofs-cache-1/<version>/<index>``: one file per chunk of one version of
one file, where ``version`` is a digest of the file's path and validators (a new version
never meets an old one's chunks). Each chunk file starts with a header that names its
version and index and holds a SHA-256 of its bytes: a damaged, cut short or foreign file
is a miss (dropped, and said in the log), never data. Files are written under a
temporary name and renamed, so that a mount killed mid-write leaves no half chunk.
Reading and writing run in worker threads (blocks.py), behind the reads.

One mount uses a directory at a time (a lock file); the least recently used chunks go
first when the directory would outgrow its size, and nothing is written while the
filesystem under it has less than 5% (at most 1 GiB) free. The directory is 0700 and
its files 0600: they hold CRM data.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from zohofs.errors import ConfigError

log = logging.getLogger(__name__)

LAYOUT = "zohofs-cache-1"
_MAGIC = b"zohofsC1"
_HEADER = struct.Struct("<8s33sQQ32s")  # magic, version, index, length, SHA-256
# Stop writing when the filesystem holding the cache has less free than this share of
# its size, or 1 GiB on a big one: other programs need the room more than a cache does.
FREE_SHARE = 0.05
FREE_MARGIN = 1 << 30
# Chunks remembered as having had their time renewed this mount (a metadata write each).
TOUCHED_KEPT = 100_000


def version_name(path: str, validators: Sequence[object]) -> str:
    """The directory name of one version of one file: a digest of its path, then one of
    its validators (the versions of one file share the first half)."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{digest(path)}-{digest(chr(0).join(str(v) for v in validators))}"


class DiskCache:
    def __init__(self, directory: Path, capacity: int, free_margin: int | None = None) -> None:
        self.root = directory / LAYOUT
        self.capacity = capacity
        self._margin = free_margin
        self._lock = threading.Lock()
        # Chunk files, least recently used first, with their sizes.
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.size = 0
        self.hits = self.dropped = 0
        self._retired: set[str] = set()  # versions whose older siblings are gone
        self._lock_fd: int | None = None
        self._full_said = False
        self._writing = 0  # bytes the writer threads are writing now
        self._touched: set[str] = set()  # chunks whose time this mount has renewed

    # -- the directory -----------------------------------------------------------------

    def open(self) -> None:
        """Take the directory (refused while another mount has it), and learn what it
        holds."""
        try:
            if not self.root.parent.exists():  # made private; one of the admin's is theirs
                self.root.parent.mkdir(mode=0o700, parents=True)
            self.root.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)  # CRM data: the mounting user's and nobody else's
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot use the cache directory {self.root.parent}: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"the cache directory {self.root.parent} is in use by another "
                              "zohofs mount: give each mount a directory of its own") from None
        self._lock_fd = fd
        if self._margin is None:
            self._margin = min(FREE_MARGIN, int(shutil.disk_usage(self.root).total * FREE_SHARE))
        found = []
        for entry in self.root.iterdir():
            if not entry.is_dir():
                continue
            for chunk in entry.iterdir():
                if chunk.name.endswith(".tmp"):  # a write a killed mount did not finish
                    chunk.unlink(missing_ok=True)
                    continue
                st = chunk.stat()
                found.append((st.st_mtime, f"{entry.name}/{chunk.name}", st.st_size))
        for _, name, size in sorted(found):
            self._lru[name] = size
            self.size += size
        self._evict(0)
        log.info("disk cache %s: %.1f MB in %d chunks, at most %.1f MB", self.root.parent,
                 self.size / 1e6, len(self._lru), self.capacity / 1e6)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    # -- reading (worker threads) ---------------------------------------------------------

    def load(self, version: str, first: int, lengths: Sequence[int],
             buffer: Callable[[int], bytearray] = bytearray) -> list[memoryview] | None:
        """The chunks ``first``, ``first+1``, … of ``version`` (of the given lengths), if
        every one is on disk and sound; else None. ``buffer(n)`` gives a buffer of at
        least ``n`` bytes to read a chunk into (a pool's, rather than a fresh one zeroed
        and faulted in page by page)."""
        pieces = []
        for index, length in enumerate(lengths, first):
            data = self._load_one(version, index, length, buffer)
            if data is None:
                return None
            pieces.append(data)
        self.hits += len(pieces)
        return pieces

    def holds(self, version: str, indices: range) -> bool:
        """Whether every chunk of ``indices`` is on disk, as far as the cache knows."""
        with self._lock:
            return all(f"{version}/{i}" in self._lru for i in indices)

    def _load_one(self, version: str, index: int, length: int,
                  buffer: Callable[[int], bytearray]) -> memoryview | None:
        name = f"{version}/{index}"
        with self._lock:
            if name not in self._lru:
                return None
            self._lru.move_to_end(name)
        path = self.root / name
        # One read of the header, the bytes and one more (there must be none).
        header, data, extra = bytearray(_HEADER.size), memoryview(buffer(length))[:length], \
            bytearray(1)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                got = os.readv(fd, [header, data, extra])
                if name not in self._touched:  # recency survives a restart (once a mount)
                    if len(self._touched) >= TOUCHED_KEPT:
                        self._touched.clear()
                    self._touched.add(name)
                    with contextlib.suppress(OSError):  # a read-only disk: still sound
                        os.utime(fd)
            finally:
                os.close(fd)
        except OSError:
            self._forget(name)
            return None
        if (got == _HEADER.size + length
                and _HEADER.unpack(header) == (_MAGIC, version.encode(), index, length,
                                               hashlib.sha256(data).digest())):
            return data
        log.warning("disk cache: dropping the damaged chunk %s (fetched again)", path)
        self.dropped += 1
        self._forget(name)
        return None

    # -- writing (a thread of its own) ----------------------------------------------------

    def store(self, version: str, first: int, pieces: Sequence[bytes]) -> None:
        """Keep these chunks on disk (in a worker thread: this writes and hashes)."""
        size = sum(_HEADER.size + len(p) for p in pieces)
        try:
            if not self._room_for(size):
                return
            try:
                for index, data in enumerate(pieces, first):
                    self._store(self.root / version, version, index, data)
            finally:
                with self._lock:
                    self._writing -= size
        except OSError as exc:
            log.warning("disk cache: cannot write %s: %s", self.root, exc.strerror or exc)

    def retire_others(self, version: str) -> bool:
        """Remove the chunks of the other versions of ``version``'s file: a file that
        changed on the server is never read as it was again. True the first time for a
        version (the caller runs it in a worker thread then)."""
        if version in self._retired:
            return False
        self._retired.add(version)
        self._retire_others(version)
        return True

    def _room_for(self, size: int) -> bool:
        """Whether ``size`` more bytes, besides those other writers are writing, leave the
        filesystem its free margin: if so they are counted as being written too (said
        once in the log when they do not)."""
        free = shutil.disk_usage(self.root).free
        with self._lock:
            room = free - self._writing - size >= (self._margin or 0)
            if room:
                self._writing += size
        if not room:
            if not self._full_said:
                self._full_said = True
                log.warning("disk cache: less than %.1f MB free under %s: not writing to "
                            "it until there is more", (self._margin or 0) / 1e6, self.root)
            return False
        self._full_said = False
        return True

    def _store(self, folder: Path, version: str, index: int, data: bytes) -> None:
        name = f"{version}/{index}"
        size = _HEADER.size + len(data)
        # Fetched from the server: what the disk has of it, if anything, was not sound.
        self._forget(name)
        self._evict(size)  # counted from now on
        temporary = folder / f"{index}.{threading.get_ident()}.tmp"
        try:
            self._write(temporary, _HEADER.pack(_MAGIC, version.encode(), index, len(data),
                                                hashlib.sha256(data).digest()), data)
            os.replace(temporary, folder / str(index))
        except BaseException:
            temporary.unlink(missing_ok=True)
            with self._lock:
                self.size -= size
            raise
        with self._lock:
            # Another writer may have kept the same chunk meanwhile: counted once.
            self.size -= self._lru.pop(name, 0)
            self._lru[name] = size

    @staticmethod
    def _write(path: Path, header: bytes, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:  # the version's first chunk, or its folder just emptied
            # by an eviction and removed
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            if os.writev(fd, [header, data]) != len(header) + len(data):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            os.close(fd)

    def _evict(self, room: int) -> None:
        """Least recently used chunks go until ``room`` more bytes fit; those are then
        counted, so that writers at once never outgrow the size together."""
        while True:
            with self._lock:
                if not self._lru or self.size + room <= self.capacity:
                    self.size += room
                    return
                name, size = self._lru.popitem(last=False)
                self.size -= size
            (self.root / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the version's last chunk: its folder too
                (self.root / name).parent.rmdir()

    def _forget(self, name: str) -> None:
        """Drop a chunk the cache knows of (every file on disk is known: open() scans)."""
        with self._lock:
            size = self._lru.pop(name, None)
            if size is None:
                return  # nothing on disk: no unlink on the write path of every new chunk
            self.size -= size
        (self.root / name).unlink(missing_ok=True)

    def _retire_others(self, version: str) -> None:
        prefix = version.split("-")[0] + "-"
        for entry in self.root.iterdir():
            if entry.name.startswith(prefix) and entry.name != version:
                with self._lock:
                    for name in [n for n in self._lru if n.startswith(entry.name + "/")]:
                        self.size -= self._lru.pop(name)
                shutil.rmtree(entry, ignore_errors=True)


def clear(directory: Path) -> int:
    """Empty a cache directory no mount is using; returns the bytes freed."""
    root = directory / LAYOUT
    if not root.is_dir():
        return 0
    cache = DiskCache(directory, capacity=1 << 62, free_margin=0)
    cache.open()  # refused while a mount uses it
    try:
        freed = cache.size
        for entry in root.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
        return freed
    finally:
        cache.close()
