"""The filesystem without FUSE: inode tree, attributes, open files and reads.

Everything here is callable from tests with no kernel involved; ``operations.py`` only
translates to and from pyfuse3's types.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import (
    Awaitable,
    Callable,
    Container,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio

from zohofs.auth import TokenSource
from zohofs.cache import BlockCache
from zohofs.errors import (
    AccessDenied,
    BadAnswer,
    LinkExpired,
    NoSuchEntry,
    ReadOnly,
    ReadTimeout,
    RemoteChanged,
    TransportError,
    ZohofsError,
)
from zohofs.logs import redact_url
from zohofs.readahead import Readahead
from zohofs.remote import RangeReader, RemoteInfo, WholeFileStream
from zohofs.zoho import BackupFile

log = logging.getLogger(__name__)

ROOT_INODE = 1
# Zoho's sample expiry dates are exactly 7 days after the backup completed.
LINK_LIFETIME = timedelta(days=7)
# How long the kernel may keep names and attributes. Short for entries that failed, so
# that the next access asks (and probes) again.
GOOD_TIMEOUT = 60.0
FAILED_TIMEOUT = 0.0
# Default for how long one read (or the probe behind a stat or open) may take in all,
# retries included, before it fails with EIO: readers waiting on FUSE cannot be killed.
READ_DEADLINE = 60.0
# A failed probe is not repeated sooner than this: the kernel serialises lookups of one
# name, so without it N readers of a failing file would probe it N times in a row.
FAILED_PROBE_TTL = 1.0


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    blksize: int
    timeout: float

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(eq=False)
class Node:
    ino: int
    name: str
    parent: int
    file: BackupFile | None = None  # None for directories
    children: dict[str, int] = field(default_factory=dict)
    info: RemoteInfo | None = None
    # ``info`` is the last good probe. Once it is in doubt (the file changed, a read
    # found the server inconsistent) the next stat or open probes again, but until then
    # the attributes keep showing it: a size of 0 handed to the kernel (readdirplus
    # updates open files' sizes too) would cut every open reader short.
    stale: bool = False
    error: ZohofsError | None = None
    failed_at: float = -1.0  # when ``error`` was last raised by a probe
    probe_lock: trio.Lock = field(default_factory=trio.Lock)
    # The version whose pages the kernel may hold (page-cache mode): a new version's first
    # open must make the kernel drop them.
    kernel_version: Hashable | None = None
    # Only for servers that ignore Range: the whole-file answer being read, and its lock.
    stream: WholeFileStream | None = None
    stream_lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def is_dir(self) -> bool:
        return self.file is None


@dataclass(eq=False)
class OpenFile:
    node: Node
    file: BackupFile  # as it was at open: a later listing may bring a new link
    info: RemoteInfo
    readahead: Readahead
    # What the cache keys of this handle's blocks say about the version: the validators,
    # or for a server that sends none, this open alone (nothing proves two opens saw the
    # same bytes, so they share no blocks).
    version: Hashable = None


def validated(info: RemoteInfo) -> bool:
    return info.etag is not None or info.last_modified is not None


def stable_inode(path: str, taken: Container[int]) -> int:
    """An inode number derived from the path, so it is the same on every mount.

    Backup tools compare inode numbers between runs; the mount time must not change them.
    """
    digest = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big")
    ino = (digest & (2**63 - 1)) or 2
    while ino <= ROOT_INODE or ino in taken:  # a 63-bit collision: still deterministic
        ino = (ino + 1) & (2**63 - 1)
    return ino


class ZohoFS:
    def __init__(self, reader: RangeReader, cache: BlockCache,
                 tokens: Mapping[str, TokenSource], *, block_size: int,
                 readahead_blocks: int, uid: int | None = None, gid: int | None = None,
                 read_deadline: float = READ_DEADLINE) -> None:
        self._reader = reader
        self._cache = cache
        self._tokens = tokens
        # Called with a name a lookup did not find; True if it refreshed the listing.
        self.on_miss: Callable[[str], Awaitable[bool]] | None = None
        # Called with (parent inode, name) of an entry that left the tree.
        self.on_removed: Callable[[int, str], None] | None = None
        # Called with the inode of a file that became stale: the size and content the
        # kernel holds may be wrong (changed on the server, or a probe the server belied).
        self.on_stale: Callable[[int], None] | None = None
        self.block_size = block_size
        self.read_deadline = read_deadline
        # Prefetched blocks must fit in the cache next to the ones being read.
        self._max_window = max(0, min(readahead_blocks, cache.capacity // block_size // 2))
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE)}
        # Every node ever created, by path: one that comes back keeps its inode number.
        self._by_path: dict[str, Node] = {}
        self._open: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None

    # -- building the tree -------------------------------------------------------------

    def add_files(self, files: Iterable[BackupFile]) -> list[Node]:
        """Put files into the tree (updating the link of those already there)."""
        added = []
        for f in files:
            parent = self._nodes[ROOT_INODE]
            for part in (f.zgid, f.job_id):
                parent = self._child(parent, part, None)
            known = f.name in parent.children
            node = self._child(parent, f.name, f)
            node.file = f  # maybe a fresh link (or expiry) for a file we had
            if not known:
                added.append(node)
        return added

    async def set_files(self, files: Iterable[BackupFile]) -> None:
        """Make the tree show exactly ``files``; probe the new ones.

        Entries that left the listing leave the tree, but their inodes stay valid, so open
        files keep reading while their link lasts.
        """
        files = list(files)
        wanted = {f.path for f in files}
        for node in self.files:
            if node.file is not None and node.file.path not in wanted:
                self._detach(node)
        added = self.add_files(files)
        async with trio.open_nursery() as nursery:
            for node in added:
                nursery.start_soon(self._probe_quietly, node)

    def _detach(self, node: Node) -> None:
        parent = self._nodes[node.parent]
        if parent.children.get(node.name) == node.ino:
            del parent.children[node.name]
            if self.on_removed is not None:
                self.on_removed(parent.ino, node.name)
            if not parent.children and parent.ino != ROOT_INODE:
                self._detach(parent)

    def _child(self, parent: Node, name: str, file: BackupFile | None) -> Node:
        ino = parent.children.get(name)
        if ino is not None:
            return self._nodes[ino]
        path = file.path if file else self._path(parent, name)
        node = self._by_path.get(path)
        if node is None:
            node = Node(stable_inode(path, self._nodes), name, parent.ino, file)
            self._nodes[node.ino] = node
            self._by_path[path] = node
        parent.children[name] = node.ino
        return node

    def _path(self, parent: Node, name: str) -> str:
        parts = [name]
        while parent.ino != ROOT_INODE:
            parts.append(parent.name)
            parent = self._nodes[parent.parent]
        return "/".join(reversed(parts)) + "/"

    @property
    def files(self) -> list[Node]:
        """The files in the tree now (not those that left it)."""
        return [n for n in self._nodes.values() if not n.is_dir and self._attached(n)]

    def _attached(self, node: Node) -> bool:
        while node.ino != ROOT_INODE:
            parent = self._nodes[node.parent]
            if parent.children.get(node.name) != node.ino:
                return False
            node = parent
        return True

    async def probe_all(self) -> None:
        """Probe every file's size at once; failures are kept and retried on access."""
        async with trio.open_nursery() as nursery:
            for node in self.files:
                nursery.start_soon(self._probe_quietly, node)

    async def _probe_quietly(self, node: Node) -> None:
        try:
            await self._probe(node)
        except ZohofsError as exc:
            log.log(exc.log_level, "%s: %s", node.file.path if node.file else node.name, exc)

    async def _probe(self, node: Node) -> RemoteInfo:
        assert node.file is not None
        async with node.probe_lock:  # one probe per file, however many callers ask
            if node.info is not None and not node.stale:
                return node.info
            if node.error is not None and (
                    trio.current_time() - node.failed_at < FAILED_PROBE_TTL):
                # Callers that queued behind a failing probe, or come right after it, share
                # its failure instead of probing a failing server one after another.
                raise node.error
            try:
                check_expiry(node.file)
                with self._deadline(node.file.path, "probing its size"):
                    info = await self._reader.probe(node.file.url,
                                                    self._tokens[node.file.account])
            except ZohofsError as exc:
                node.error, node.failed_at = exc, trio.current_time()
                raise
            first = node.info is None
            node.info, node.stale, node.error = info, False, None
            if first and not validated(info):
                log.warning("%s: the server sends neither ETag nor Last-Modified: a change "
                            "of the file on the server cannot be detected; each open reads "
                            "it afresh", node.file.path)
            log.debug("%s: %d bytes (%s)", node.file.path, node.info.size,
                      redact_url(node.file.url))
            return node.info

    def start(self, nursery: trio.Nursery) -> None:
        """Give the filesystem a place to run background prefetches."""
        self._nursery = nursery

    # -- metadata ----------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NoSuchEntry(f"no inode {ino}") from None

    def _mtime(self, node: Node) -> float:
        if node.file is not None:
            if node.info and node.info.last_modified is not None:
                return node.info.last_modified
            if node.file.expires is not None:
                return (node.file.expires - LINK_LIFETIME).timestamp()
            return 0.0
        return max((self._mtime(self._nodes[c]) for c in node.children.values()), default=0.0)

    def attr(self, node: Node) -> Attr:
        """Attributes as known now (no I/O): a file not yet probed shows size 0, briefly."""
        known = node.is_dir or (node.info is not None and not node.stale)
        if node.is_dir:
            mode, nlink, size = stat.S_IFDIR | 0o555, 2 + sum(
                self._nodes[c].is_dir for c in node.children.values()), 0
        else:
            mode, nlink, size = stat.S_IFREG | 0o444, 1, node.info.size if node.info else 0
        return Attr(node.ino, mode, nlink, size, int(self._mtime(node) * 1e9), self._uid,
                    self._gid, self.block_size, GOOD_TIMEOUT if known else FAILED_TIMEOUT)

    async def getattr(self, ino: int) -> Attr:
        node = self._node(ino)
        if not node.is_dir and (node.info is None or node.stale):
            await self._probe(node)
        return self.attr(node)

    async def lookup(self, parent: int, name: str) -> Attr:
        node = self._node(parent)
        if name == ".":
            return await self.getattr(parent)
        if name == "..":
            return await self.getattr(node.parent)
        ino = node.children.get(name)
        if ino is None and self.on_miss is not None and await self.on_miss(name):
            ino = node.children.get(name)  # a new backup may have just appeared
        if ino is None:
            raise NoSuchEntry(f"{name!r} not found")
        return await self.getattr(ino)

    def readdir(self, ino: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries after offset ``start``, in inode order; an entry's offset is its inode.

        Listings change under an open directory (a new backup, an old one leaving): keyed
        by inode, that never makes a reader skip or repeat an entry."""
        node = self.directory(ino)
        entries = sorted((child, name) for name, child in node.children.items() if child > start)
        return [(name, self.attr(self._nodes[child]), child) for child, name in entries]

    def directory(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise NoSuchEntry("not a directory")
        return node

    def statfs(self) -> tuple[int, int, int]:
        """(block size, total blocks, file count)."""
        total = sum(n.info.size for n in self.files if n.info)
        return self.block_size, -(-total // self.block_size), len(self._nodes)

    # -- data --------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """A new file handle, and whether the kernel may keep the pages it cached of
        this file: only when they are of the same version as what this handle reads."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("zohofs is read-only")
        node = self._node(ino)
        if node.is_dir:
            raise NoSuchEntry("is a directory")
        if node.info is not None and not validated(node.info):
            node.stale = True  # nothing pins the version: learn the size afresh
        info = await self._probe(node)
        assert node.file is not None
        check_expiry(node.file)
        fh = self._next_fh
        self._next_fh += 1
        version = (info.etag, info.last_modified) if validated(info) else ("open", fh)
        keep_cache = validated(info) and node.kernel_version == version
        node.kernel_version = version
        self._open[fh] = OpenFile(node, node.file, info,
                                  Readahead(self._max_window, self.block_size), version)
        return fh, keep_cache

    def release(self, fh: int) -> None:
        handle = self._open.pop(fh, None)
        node = handle.node if handle else None
        if node and node.stream and not any(h.node is node for h in self._open.values()):
            node.stream.close()  # nobody reads on: give the connection back
            node.stream = None

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        """Exactly ``size`` bytes at ``offset``, fewer only at end of file; within the read
        deadline, or ReadTimeout."""
        handle = self._open.get(fh)
        if handle is None:
            raise NoSuchEntry(f"no open file {fh}")
        with self._deadline(handle.file.path, "reading %d bytes at %d", size, offset):
            return await self._read(handle, offset, size)

    @contextlib.contextmanager
    def _deadline(self, path: str, doing: str, *args: object) -> Iterator[None]:
        """Fail with ReadTimeout (EIO) when the body takes longer than the read deadline.

        The message is only formatted on failure: this wraps every read."""
        with trio.move_on_after(self.read_deadline) as scope:
            yield
        if scope.cancelled_caught:
            raise ReadTimeout(f"{path}: {doing % args}: gave up after the "
                              f"{self.read_deadline:g} s read deadline (the server is too "
                              "slow or not answering; see --read-timeout)")

    async def _read(self, handle: OpenFile, offset: int, size: int) -> bytes | memoryview:
        info = handle.info
        end = min(offset + size, info.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        window = handle.readahead.advise(offset, end - offset)
        last_block = (info.size - 1) // bs
        for index in range(first + 1, min(last + window, last_block) + 1):
            self._prefetch(handle, index)
        if first == last:
            block = await self._block(handle, first)
            return block[offset - first * bs:end - first * bs]
        parts = [await self._block(handle, i) for i in range(first, last + 1)]
        return b"".join(parts)[offset - first * bs:end - first * bs]

    def _key(self, handle: OpenFile, index: int) -> Hashable:
        # The version is part of the key: bytes of two versions of a file never mix.
        return (handle.node.ino, handle.version, index)

    async def _block(self, handle: OpenFile, index: int) -> memoryview:
        try:
            if not handle.info.ranges:
                return await self._streamed_block(handle, index)
            return await self._cache.get(self._key(handle, index),
                                         lambda: self._fetch(handle, index))
        except (RemoteChanged, BadAnswer):
            # Open handles keep failing; the next open probes again (a new version, or
            # a server that answers sensibly again) instead of trusting this probe.
            node = handle.node
            if node.info is handle.info and not node.stale:
                node.stale = True
                if self.on_stale is not None:
                    self.on_stale(node.ino)
            raise

    async def _fetch(self, handle: OpenFile, index: int) -> memoryview:
        start = index * self.block_size
        length = min(self.block_size, handle.info.size - start)
        file = handle.file
        check_expiry(file)
        try:
            return await self._reader.fetch(file.url, start, length, handle.info,
                                            self._tokens[file.account])
        except AccessDenied:
            check_expiry(file)  # the link may have expired while the request was out
            raise

    async def _streamed_block(self, handle: OpenFile, index: int) -> memoryview:
        """A block of a file whose server ignores Range: read the whole-file answer up to
        it, keeping every block passed on the way. Correct bytes, at the price of starting
        over from byte 0 when a reader goes back past what the cache still holds."""
        node, bs = handle.node, self.block_size
        async with node.stream_lock:
            for attempt in range(2):
                cached = self._cache.peek(self._key(handle, index))
                if cached is not None:
                    return cached
                stream = node.stream
                if stream is None or stream.info is not handle.info or stream.position > index * bs:
                    if stream is not None:
                        stream.close()
                    check_expiry(handle.file)
                    stream = node.stream = await self._reader.open_whole(
                        handle.file.url, handle.info, self._tokens[handle.file.account])
                try:
                    while True:
                        i = stream.position // bs
                        data = await stream.read(min(bs, handle.info.size - stream.position))
                        self._cache.put(self._key(handle, i), data)
                        if i == index:
                            return data
                except BaseException as exc:
                    stream.close()
                    node.stream = None
                    # A stream that broke is opened again once; anything else is final.
                    if attempt or not isinstance(exc, TransportError):
                        raise
        raise AssertionError("unreachable")

    def _prefetch(self, handle: OpenFile, index: int) -> None:
        if (self._nursery is None or not handle.info.ranges
                or self._key(handle, index) in self._cache):
            return
        self._nursery.start_soon(self._prefetch_block, handle, index)

    async def _prefetch_block(self, handle: OpenFile, index: int) -> None:
        try:
            with trio.move_on_after(self.read_deadline):
                await self._block(handle, index)
        except ZohofsError as exc:
            # The reader that needs this block will fetch it again and report the error.
            log.debug("prefetch of block %d failed: %s", index, exc)
        except Exception:
            # Runs in the mount's top-level nursery: an escape here would end the mount.
            log.exception("unexpected error in prefetch of block %d", index)


def check_expiry(file: BackupFile) -> None:
    """Fail with EACCES once the link is past the expiry date the listing gave."""
    if file.expires is not None and datetime.now(UTC) >= file.expires:
        raise LinkExpired(f"{file.path}: the download link expired on "
                          f"{file.expires.isoformat()}; Zoho offers a backup's links for 7 "
                          "days only")
