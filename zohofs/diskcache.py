"""Chunks kept on disk (``--cache-dir``): what was fetched once is not fetched again, by
later reads, later mounts, within a size the admin sets.

Layout: ``DIR/zohofs-cache-2/<version>.chunks`` and ``<version>.index`` for each version
of each file (chunkfiles.py), where ``version`` is a digest of the file's path and
validators (a new version never meets an old one's chunks). The index keeps each chunk's
length, an XXH3 hash of its bytes, and when it was last used (for the least-recently-used
order across restarts). A record is written before its bytes: a mount killed in between,
a short write on a full disk, a bit flipped on the disk all leave a chunk whose bytes do
not match its hash, which is a miss (dropped, said in the log, fetched again), never
data. The chunks of a backup Zoho replaced go at the next listing, once none of its files
is open.

One mount uses a directory at a time (a lock file); the least recently used chunks go
first when the directory would outgrow its size (their room is given back to the
filesystem: a hole punched, or on a filesystem that cannot, their version's files
removed), and nothing is written while the filesystem under it has less than 5% (at most
1 GiB) free. The directory is 0700 and its files 0600: they hold CRM data. The first
layout's directory (a file per chunk, SHA-256) is removed at open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from zohofs.buffers import Buffer
from zohofs.chunkfiles import (
    CHUNKS,
    INDEX,
    RECORD_SIZE,
    Files,
    OpenFiles,
    Piece,
    digest,
    files_of,
    name_digest,
    read_index,
    remove,
    remove_old_layouts,
    runs,
    take_layout,
)
from zohofs.errors import CacheInUse, ConfigError
from zohofs.planner import MiB

log = logging.getLogger(__name__)

LAYOUT = "zohofs-cache-2"
OLD_LAYOUTS = ("zohofs-cache-1",)
# Stop writing when the filesystem holding the cache has less free than this share of
# its size, or 1 GiB on a big one: other programs need the room more than a cache does.
FREE_SHARE = 0.05
FREE_MARGIN = 1 << 30
# Versions whose files are kept open at once.
OPEN_VERSIONS = 32
# Chunks remembered as having had their time renewed this mount (a record write a run).
USED_KEPT = 100_000


class DiskCache:
    def __init__(self, directory: Path, capacity: int, free_margin: int | None = None) -> None:
        self.root = directory / LAYOUT
        self.capacity = capacity
        self._margin = free_margin
        self._lock = threading.Lock()  # the bookkeeping below
        self._io = threading.Lock()  # writing, and giving room back: one at a time
        # Chunks kept, least recently used first: (version, index) -> (length, hash).
        self._lru: OrderedDict[tuple[str, int], tuple[int, int]] = OrderedDict()
        # The chunks each version has (in _lru): a version's go without a walk over all.
        self._indices: defaultdict[str, set[int]] = defaultdict(set)
        # The versions' files kept open, under the same lock: a version's files are never
        # opened as they are removed (writes to a removed file would be lost).
        self._files = OpenFiles(self.root, self._lock, OPEN_VERSIONS)
        self.size = 0
        self.hits = self.dropped = 0
        self._retired: set[str] = set()  # versions whose older siblings are gone
        self._lock_fd: int | None = None
        self._full_said = False
        self._writing = 0  # bytes the writer threads are writing now
        self._used: set[tuple[str, int]] = set()  # chunks whose time this mount renewed
        self._can_punch = True

    # -- the directory -----------------------------------------------------------------

    def open(self, quiet: bool = False) -> None:
        """Take the directory (refused while another mount has it), and learn what it
        holds (said in the log unless ``quiet``)."""
        self.root, self._lock_fd = take_layout(self.root.parent, LAYOUT)
        self._files = OpenFiles(self.root, self._lock, OPEN_VERSIONS)
        remove_old_layouts(self.root.parent, OLD_LAYOUTS)
        total = shutil.disk_usage(self.root).total
        if self._margin is None:
            self._margin = min(FREE_MARGIN, int(total * FREE_SHARE))
        if self.capacity > total and not quiet:
            log.warning("disk cache: cache_dir_size (%.0f MiB) is more than the filesystem "
                        "under %s holds (%.0f MiB): the cache stops where that is nearly "
                        "full instead", self.capacity / MiB, self.root.parent, total / MiB)
        found = []
        for entry in self.root.iterdir():
            version = entry.name.removesuffix(INDEX)
            if entry.name == "lock" or entry.name.endswith(CHUNKS):
                if entry.name.endswith(CHUNKS) and not entry.with_suffix(INDEX).exists():
                    entry.unlink(missing_ok=True)  # its index never made: nothing known
                continue
            records = read_index(entry, version) if entry.name.endswith(INDEX) else None
            if not records or not (self.root / f"{version}{CHUNKS}").exists():
                # Not ours, not whole, empty, or its chunks gone: nothing in it is known.
                log.info("disk cache: removing %s (not a cache file of this zohofs)", entry)
                remove(entry)
                (self.root / f"{version}{CHUNKS}").unlink(missing_ok=True)
                continue
            for index, (length, hashed, used) in records.items():
                found.append((used, version, index, length, hashed))
        for _, version, index, length, hashed in sorted(found):
            self._lru[(version, index)] = (length, hashed)
            self._indices[version].add(index)
            self.size += length + RECORD_SIZE
        self._evict(0)
        if not quiet:
            log.info("disk cache %s: %.1f MiB in %d chunks, at most %.1f MiB",
                     self.root.parent, self.size / MiB, len(self._lru), self.capacity / MiB)

    def close(self) -> None:
        """At the mount's end, when no worker thread is left."""
        self._files.close_all()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- reading (worker threads) ---------------------------------------------------------

    def holds(self, version: str, indices: range) -> bool:
        """Whether every chunk of ``indices`` is on disk, as far as the cache knows."""
        with self._lock:
            return all((version, i) in self._lru for i in indices)

    def load(self, version: str, first: int, lengths: Sequence[int],
             buffer: Callable[[int], Buffer] = bytearray) -> list[memoryview] | None:
        """The chunks ``first``, ``first+1``, … of ``version`` (of the given lengths), if
        every one is on disk and sound; else None. ``buffer(n)`` gives a buffer of at
        least ``n`` bytes to read a chunk into (a pool's, rather than a fresh one zeroed
        and faulted in page by page)."""
        keys = [(version, i) for i in range(first, first + len(lengths))]
        with self._lock:
            known = [self._lru.get(key) for key in keys]
            kept = [k for k, length in zip(known, lengths, strict=True)
                    if k is not None and k[0] == length]
            if len(kept) < len(keys):
                return None
            for key in keys:
                self._lru.move_to_end(key)
            renew = any(key not in self._used for key in keys)
        pieces = [memoryview(buffer(length))[:length] for length in lengths]
        try:
            with self._files.use(version, create=False) as files:
                if files is None:  # removed behind zohofs's back: known no more
                    self._drop(keys)
                    return None
                got = files.read(first, pieces)
                bad = [key for key, piece, (_, hashed) in zip(keys, pieces, kept, strict=True)
                       if digest(piece) != hashed]
                if got == sum(lengths) and not bad:
                    if renew:  # recency survives a restart (renewed once a mount)
                        self._renew(files, keys, kept)
                    with self._lock:  # loads run in several threads at once
                        self.hits += len(pieces)
                    return pieces
            log.warning("disk cache: dropping the damaged chunks %s of %s (fetched again)",
                        ", ".join(str(i) for _, i in bad) if bad else "(cut short)",
                        files_of(self.root, version)[1])
            with self._lock:
                self.dropped += len(bad or keys)
            with self._io:
                self._clear(self._drop(bad or keys))
        except OSError as exc:
            log.warning("disk cache: cannot read %s: %s", self.root, exc.strerror or exc)
        return None  # a miss: fetched from the server

    def _renew(self, files: Files, keys: list[tuple[str, int]],
               kept: list[tuple[int, int]]) -> None:
        """Write when these chunks were used, unless a writer or an eviction is at work
        (it might be giving them back: a record written after would bring one back)."""
        if not self._io.acquire(blocking=False):
            return
        try:
            with self._lock:
                if any(key not in self._lru for key in keys):
                    return
                if len(self._used) + len(keys) > USED_KEPT:
                    self._used.clear()
                self._used.update(keys)
            now = int(time.time())
            with contextlib.suppress(OSError):  # a read-only disk: still sound
                files.write_records(keys[0][1], [(length, hashed, now) for length, hashed in kept])
        finally:
            self._io.release()

    # -- writing (worker threads) ---------------------------------------------------------

    def store(self, version: str, first: int, pieces: Sequence[Piece]) -> None:
        """Keep these chunks on disk (in a worker thread: this writes and checksums)."""
        size = sum(RECORD_SIZE + len(p) for p in pieces)
        try:
            if not self._room_for(size):
                return
            try:
                with self._io:
                    self._store(version, first, pieces, size)
            finally:
                with self._lock:
                    self._writing -= size
        except OSError as exc:
            log.warning("disk cache: cannot write %s: %s", self.root, exc.strerror or exc)

    def _store(self, version: str, first: int, pieces: Sequence[Piece], size: int) -> None:
        keys = [(version, i) for i in range(first, first + len(pieces))]
        # Fetched from the server: what the disk has of them, if anything, was not sound
        # (or is the same bytes, kept twice at once); overwritten below.
        self._drop(keys)
        digests = [digest(p) for p in pieces]
        now = int(time.time())
        try:
            self._evict(size)  # counted from now on (taken back below if this fails)
            with self._files.use(version, create=True) as files:
                if files is None:
                    raise OSError(errno.ENOENT, "the cache directory is gone")
                # The records first: cut short after them, the bytes fail their hash.
                files.write_records(first, [(len(p), hashed, now)
                                            for p, hashed in zip(pieces, digests, strict=True)])
                files.write(first, pieces)
        except BaseException:
            with self._lock:
                self.size -= size
            with contextlib.suppress(OSError):
                self._clear({version: [i for _, i in keys]})
            raise
        with self._lock:
            for key, piece, hashed in zip(keys, pieces, digests, strict=True):
                self._lru[key] = (len(piece), hashed)
                self._indices[version].add(key[1])

    def retire_others(self, version: str) -> None:
        """Remove the chunks of the other versions of ``version``'s file: a file that
        changed on the server is never read as it was again (once a mount for a version:
        the caller runs it in a worker thread)."""
        if version not in self._retired:
            self._retired.add(version)
            self._remove_versions({version.split("-")[0]}, keep=version)

    def forget_files(self, paths: Iterable[str]) -> None:
        """Remove every version of these files (backups Zoho replaced); in a thread."""
        gone = self._remove_versions({name_digest(path) for path in paths})
        if gone:
            log.info("disk cache: removed the chunks of %d replaced backup files", gone)

    def _remove_versions(self, files: set[str], keep: str = "") -> int:
        """Remove the versions of the files whose digests are ``files`` (but ``keep``):
        how many there were. Never raises: it runs in the mount's top-level nursery."""
        try:
            versions = {entry.name.removesuffix(INDEX) for entry in self.root.iterdir()
                        if entry.name.endswith(INDEX) and entry.name.split("-")[0] in files}
        except OSError as exc:
            log.warning("disk cache: cannot read %s: %s", self.root, exc.strerror or exc)
            return 0
        versions.discard(keep)
        with self._io:
            for version in versions:
                self._remove_version(version)
        return len(versions)

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
                log.warning("disk cache: less than %.1f MiB free under %s: not writing to "
                            "it until there is more", (self._margin or 0) / MiB, self.root)
            return False
        self._full_said = False
        return True

    # -- giving room back (with self._io held, or at open) --------------------------------

    def _evict(self, room: int) -> None:
        """Least recently used chunks go until ``room`` more bytes fit; those are then
        counted, so that writers at once never outgrow the size together."""
        gone: dict[str, list[int]] = defaultdict(list)
        with self._lock:
            while self._lru and self.size + room > self.capacity:
                (version, index), (length, _) = self._lru.popitem(last=False)
                self.size -= length + RECORD_SIZE
                self._indices[version].discard(index)
                gone[version].append(index)
            self.size += room
        self._clear(gone)

    def _drop(self, keys: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
        """Take these chunks out of the bookkeeping (those in it): by version."""
        dropped: dict[str, list[int]] = defaultdict(list)
        with self._lock:
            for key in keys:
                kept = self._lru.pop(key, None)
                if kept is not None:
                    self.size -= kept[0] + RECORD_SIZE
                    self._indices[key[0]].discard(key[1])
                    dropped[key[0]].append(key[1])
        return dropped

    def _clear(self, chunks: Mapping[str, list[int]]) -> None:
        """Clear these chunks' records and give their room back to the filesystem; a
        version with no chunk left goes whole."""
        for version, indices in chunks.items():
            with self._lock:
                empty = not self._indices.get(version)
            if empty or not self._can_punch:
                self._remove_version(version)
                continue
            punched = True
            with self._files.use(version, create=False) as files:
                if files is None:
                    continue
                for start, stop in runs(sorted(indices)):
                    # The hole first: killed before the record is cleared, the chunk fails
                    # its hash; the other way round its bytes would stay, counted nowhere.
                    failed = files.punch(start, stop)
                    if failed:
                        punched = False
                        if failed in (errno.EOPNOTSUPP, errno.ENOSYS):
                            self._can_punch = False
                            log.warning("disk cache: the filesystem under %s cannot give "
                                        "back parts of a file: whole files go instead",
                                        self.root)
                        break
                    with contextlib.suppress(OSError):
                        files.clear_records(start, stop)
            if not punched:
                self._remove_version(version)

    def _remove_version(self, version: str) -> None:
        """Every chunk of ``version`` gone, and its files."""
        with self._lock:
            for index in self._indices.pop(version, ()):
                kept = self._lru.pop((version, index), None)
                if kept is not None:
                    self.size -= kept[0] + RECORD_SIZE
            self._files.forget(version)
            for path in files_of(self.root, version):  # under the lock: none opened meanwhile
                with contextlib.suppress(OSError):  # a read-only disk: nothing to give back
                    path.unlink(missing_ok=True)


def clear(directory: Path) -> int:
    """Empty a cache directory no mount is using; returns the bytes freed."""
    try:
        if not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory: no disk cache there")
        if not os.path.lexists(directory / LAYOUT):
            return 0
    except OSError as exc:
        raise ConfigError(f"cannot use the cache directory {directory}: "
                          f"{exc.strerror or exc}") from None
    cache = DiskCache(directory, capacity=1 << 62, free_margin=0)
    try:
        cache.open(quiet=True)
    except CacheInUse:
        raise ConfigError(f"the cache directory {directory} is in use by a zohofs mount: "
                          "unmount it first") from None
    try:
        freed = cache.size
        for entry in cache.root.iterdir():
            if entry.name != "lock":
                remove(entry)
        return freed
    finally:
        cache.close()
