"""The filesystem without FUSE: inode tree, attributes, open files and reads.

Everything here is callable from tests with no kernel involved; ``operations.py`` only
translates to and from pyfuse3's types.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
import stat
import time
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

import cachetools
import trio

from zohofs import zipindex
from zohofs.access import Access
from zohofs.auth import TokenSource
from zohofs.buffers import BufferPool
from zohofs.cache import Abandoned, ChunkCache
from zohofs.errors import (
    AccessDenied,
    BadAnswer,
    BadArchive,
    LinkExpired,
    NoSuchEntry,
    ReadOnly,
    ReadTimeout,
    RemoteChanged,
    TransportError,
    ZohofsError,
)
from zohofs.logs import redact_url
from zohofs.planner import CHUNK, PrefetchBudget, ReadPattern, chunk_range, slice_chunks
from zohofs.remote import RangeReader, RemoteInfo, WholeFileStream
from zohofs.stats import FileActivity
from zohofs.zipindex import Member
from zohofs.zipread import MemberReader, member_reader
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
# Buffers of evicted chunks kept for the next ones (16 MiB): a copy recycles them as fast
# as it reads.
BUFFERS_KEPT = 128
# st_blksize: Python's open(), stdio and rsync read this much after every seek, cp and cat
# that much at a time (at least 128 KiB). 1 MiB keeps a random buffered read to about a
# MiB fetched, while copies still send FUSE its largest reads (1 MiB).
BLKSIZE = 1024 * 1024
# Members whose inflation checkpoints are kept (each up to ~40 KiB per 4 MiB inflated).
MEMBER_READERS_KEPT = 4


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


@dataclass(frozen=True, slots=True)
class Failure:
    """What a probe or an index read last failed with, and when. Callers that queued
    behind it, or come right after it, share it instead of asking a failing server one
    after another."""

    error: ZohofsError
    at: float = field(default_factory=trio.current_time)

    def recent(self) -> bool:
        return trio.current_time() - self.at < FAILED_PROBE_TTL


@dataclass(eq=False)
class ArchiveView:
    """The directory ``X/`` that shows the members of ``X.zip`` (``--expand``), filled
    when someone first looks inside, again when the archive changed."""

    archive: int  # the inode of X.zip
    root: int  # the inode of X/
    version: Hashable = None  # of the archive whose members the directory shows now
    lock: trio.Lock = field(default_factory=trio.Lock)
    failure: Failure | None = None  # of the last index read


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    name: str
    parent: int
    file: BackupFile | None = None  # None for directories and members
    member: Member | None = None  # a file inside an archive (--expand)
    view: ArchiveView | None = None  # on X/ and on each folder and member in it
    children: dict[str, int] = field(default_factory=dict)
    # The children sorted by inode, for readdir; None since they last changed.
    listing: list[tuple[int, str]] | None = None
    info: RemoteInfo | None = None
    # ``info`` is the last good probe. Once it is in doubt (the file changed, a read
    # found the server inconsistent) the next stat or open probes again, but until then
    # the attributes keep showing it: a size of 0 handed to the kernel (readdirplus
    # updates open files' sizes too) would cut every open reader short.
    stale: bool = False
    failure: Failure | None = None  # of the last probe
    # Locks are made on first use: an expanded archive can add 100 000 nodes that never
    # need one (a lock is ~340 bytes).
    probe_lock: trio.Lock | None = None
    # The version whose pages the kernel may hold (page-cache mode): a new version's first
    # open must make the kernel drop them.
    kernel_version: Hashable | None = None
    # Only for servers that ignore Range: the whole-file answer being read, and its lock.
    stream: WholeFileStream | None = None
    stream_lock: trio.Lock | None = None

    @property
    def is_dir(self) -> bool:
        return self.file is None and self.member is None


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


@dataclass(eq=False)
class OpenMember:
    """An open member of an archive: its reader, over a handle of the archive itself."""

    node: Node
    reader: MemberReader
    source: _ArchiveBytes  # the archive's bytes, through a handle of its own
    archive_fh: int
    activity: FileActivity


def view_name(file_name: str) -> str | None:
    """The folder that shows a zip's members (``--expand``): the zip's name without
    ``.zip``; None for anything else."""
    return file_name[:-4] if file_name.endswith(".zip") else None


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
    def __init__(self, reader: RangeReader, tokens: Mapping[str, TokenSource], *,
                 cache_size: int, max_request: int, max_ahead: int,
                 access: Access | None = None, read_deadline: float = READ_DEADLINE,
                 expand: bool = False) -> None:
        self._reader = reader
        self._expand = expand
        # Up to half the cache may hold chunks fetched ahead of readers (never evicted
        # before they are read); what was read fills the rest, and all of it when nothing
        # is being fetched ahead.
        self._budget = PrefetchBudget(cache_size // 2)
        self._buffers = BufferPool(CHUNK, limit=BUFFERS_KEPT)
        # Chunks on their way count too: the cache's memory stays within its size.
        self._cache = ChunkCache(cache_size, reserved=lambda: self._budget.used,
                                 on_evict=self._buffers.give)
        self._tokens = tokens
        # Called with a name a lookup did not find; True if it refreshed the listing.
        self.on_miss: Callable[[str], Awaitable[bool]] | None = None
        # Called with (parent inode, name) of an entry that left the tree.
        self.on_removed: Callable[[int, str], None] | None = None
        # Called with the inode of a file that became stale: the size and content the
        # kernel holds may be wrong (changed on the server, or a probe the server belied).
        self.on_stale: Callable[[int], None] | None = None
        self.read_deadline = read_deadline
        self.stats = reader.stats
        self._max_request = max_request
        self._max_ahead = max_ahead
        self._access = access or Access.from_settings()
        # Every node ever made: one whose path comes back keeps its inode number.
        self._nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE)}
        self._open: dict[int, OpenFile] = {}
        self._members: dict[int, OpenMember] = {}
        # Member readers by (archive inode, version, member path): their inflation
        # checkpoints outlive one open.
        self._member_readers: cachetools.LRUCache[Hashable, MemberReader] = (
            cachetools.LRUCache(MEMBER_READERS_KEPT))
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
                folder = view_name(f.name)
                if self._expand and folder is not None:
                    view = self._child(parent, folder, None)
                    view.view = view.view or ArchiveView(node.ino, view.ino)
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
        folder = view_name(node.name) if node.file is not None else None
        if folder is not None:
            view = self._nodes.get(parent.children.get(folder, 0))
            if view is not None and view.view is not None:
                self._detach(view)  # the archive left: so does the view into it
        if parent.children.get(node.name) == node.ino:
            del parent.children[node.name]
            parent.listing = None
            if self.on_removed is not None:
                self.on_removed(parent.ino, node.name)
            if not parent.children and parent.ino != ROOT_INODE:
                self._detach(parent)

    def _child(self, parent: Node, name: str, file: BackupFile | None) -> Node:
        ino = parent.children.get(name)
        if ino is not None:
            return self._nodes[ino]
        path = file.path if file else self._path(parent, name)
        # The inode a node of this path has, or will have: the path's own number, past
        # those that other paths hold. No table of paths: a member costs less.
        ino = stable_inode(path, _HeldByOthers(self, path))
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = Node(ino, name, parent.ino, file)
        parent.children[name] = node.ino
        parent.listing = None
        return node

    def _path(self, parent: Node, name: str) -> str:
        parts = [name]
        while parent.ino != ROOT_INODE:
            parts.append(parent.name)
            parent = self._nodes[parent.parent]
        return "/".join(reversed(parts)) + "/"

    def path_of(self, ino: int) -> str | None:
        """The path ``_child`` gave the node at ``ino`` (a file's own, a folder's or
        member's with a trailing slash), None for a free inode."""
        node = self._nodes.get(ino)
        if node is None:
            return None
        return node.file.path if node.file else self._path(self._nodes[node.parent], node.name)

    @property
    def files(self) -> list[Node]:
        """The files in the tree now (not those that left it)."""
        return [n for n in self._nodes.values() if n.file is not None and self._attached(n)]

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
        node.probe_lock = node.probe_lock or trio.Lock()
        async with node.probe_lock:  # one probe per file, however many callers ask
            if node.info is not None and not node.stale:
                return node.info
            if node.failure is not None and node.failure.recent():
                raise node.failure.error
            try:
                check_expiry(node.file)
                with self._deadline(node.file.path, "probing its size"):
                    info = await self._reader.probe(node.file.url,
                                                    self._tokens[node.file.account])
            except ZohofsError as exc:
                node.failure = Failure(exc)
                raise
            first = node.info is None
            node.info, node.stale, node.failure = info, False, None
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
        if node.member is not None:
            return node.member.mtime
        if node.view is not None and node.ino == node.view.root:
            # X/ shows X.zip's time, also before anyone looked in.
            return self._mtime(self._nodes[node.view.archive])
        if node.file is not None:
            if node.info and node.info.last_modified is not None:
                return node.info.last_modified
            if node.file.expires is not None:
                return (node.file.expires - LINK_LIFETIME).timestamp()
            return 0.0
        return max((self._mtime(self._nodes[c]) for c in node.children.values()), default=0.0)

    def attr(self, node: Node) -> Attr:
        """Attributes as known now (no I/O): a file not yet probed shows size 0, briefly."""
        # Folders and members are known from the tree and the archive's index; a file
        # only once probed. What is known the kernel may keep: an `ls -l` of a folder of
        # members then costs one round trip per entry, not one per stat.
        known = node.file is None or (node.info is not None and not node.stale)
        access = self._access
        if node.is_dir:
            mode, nlink, size = stat.S_IFDIR | access.dir_mode, 2 + sum(
                self._nodes[c].is_dir for c in node.children.values()), 0
        elif node.member is not None:
            mode, nlink, size = (stat.S_IFREG | access.member_mode(node.member.mode), 1,
                                 node.member.size)
        else:
            mode, nlink, size = (stat.S_IFREG | access.file_mode, 1,
                                 node.info.size if node.info else 0)
        return Attr(node.ino, mode, nlink, size, int(self._mtime(node) * 1e9), access.uid,
                    access.gid, BLKSIZE, GOOD_TIMEOUT if known else FAILED_TIMEOUT)

    async def getattr(self, ino: int) -> Attr:
        node = self._node(ino)
        if node.file is not None and (node.info is None or node.stale):
            await self._probe(node)
        return self.attr(node)

    async def lookup(self, parent: int, name: str) -> Attr:
        node = self._node(parent)
        if name == ".":
            return await self.getattr(parent)
        if name == "..":
            return await self.getattr(node.parent)
        await self._expanded(node)
        ino = node.children.get(name)
        if ino is None and self.on_miss is not None and await self.on_miss(name):
            ino = node.children.get(name)  # a new backup may have just appeared
        if ino is None:
            raise NoSuchEntry(f"{name!r} not found")
        return await self.getattr(ino)

    def readdir(self, ino: int, start: int) -> Iterator[tuple[str, Attr, int]]:
        """Entries after offset ``start``, in inode order; an entry's offset is its inode.

        Listings change under an open directory (a new backup, an old one leaving): keyed
        by inode, that never makes a reader skip or repeat an entry. The kernel asks for a
        page of entries at a time: the sorted listing is kept, and attributes are made
        only for the entries taken (an expanded archive can hold 100 000)."""
        node = self.directory(ino)
        if node.listing is None:
            node.listing = sorted((child, name) for name, child in node.children.items())
        listing = node.listing
        for i in range(bisect.bisect_right(listing, (start, "\U0010ffff")), len(listing)):
            child, name = listing[i]
            yield name, self.attr(self._nodes[child]), child

    def directory(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise NoSuchEntry("not a directory")
        return node

    async def opendir(self, ino: int) -> None:
        await self._expanded(self.directory(ino))

    def status(self) -> dict[str, object]:
        """What the mount is doing, for `zohofs status` (the root's user.zohofs.status)."""
        now = time.time()
        stats = self.stats
        files = self.files
        expiries = [n.file.expires for n in files if n.file and n.file.expires]
        behind_members = {m.archive_fh for m in self._members.values()}
        return {
            "mounted_since": datetime.fromtimestamp(stats.started, UTC).isoformat(),
            "files": len(files),
            # An open member, not the archive handle it reads through.
            "open_files": [h.activity.summary(now) for fh, h in self._open.items()
                           if fh not in behind_members]
            + [m.activity.summary(now) for m in self._members.values()],
            "bytes_inflated": stats.bytes_inflated,
            "gets": stats.gets, "bytes_fetched": stats.bytes_fetched,
            "retries": stats.retries,
            "chunk_hits": stats.chunk_hits, "chunk_misses": stats.chunk_misses,
            "cache_bytes": self._cache.size,
            "errors": dict(stats.errors),
            "token_refreshes": sum(t.refreshes for t in self._tokens.values()),
            "links_expire": min(expiries).isoformat() if expiries else None,
        }

    def xattrs(self, ino: int) -> dict[str, bytes]:
        """Extended attributes: the mount's status on the root, a file's source (never
        the query: tokens hide there), size, validator and expiry on each file."""
        node = self._node(ino)
        if ino == ROOT_INODE:
            return {"user.zohofs.status": json.dumps(self.status()).encode()}
        if node.file is None:
            return {}
        found = {"user.zohofs.url": redact_url(node.file.url)}
        if node.info is not None:
            found["user.zohofs.size"] = str(node.info.size)
            if node.info.etag:
                found["user.zohofs.etag"] = node.info.etag
        if node.file.expires is not None:
            found["user.zohofs.expires"] = node.file.expires.isoformat()
        return {k: v.encode() for k, v in found.items()}

    def statfs(self) -> tuple[int, int, int]:
        """(block size, total blocks, file count)."""
        total = sum(n.info.size for n in self.files if n.info)
        return BLKSIZE, -(-total // BLKSIZE), len(self._nodes)

    # -- data --------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """A new file handle, and whether the kernel may keep the pages it cached of
        this file: only when they are of the same version as what this handle reads."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("zohofs is read-only")
        node = self._node(ino)
        if node.member is not None:
            fh, version = await self._open_member(node)
        elif node.is_dir:
            raise NoSuchEntry("is a directory")
        else:
            fh, handle = await self._open_file(node)
            version = handle.version
        keep_cache = version is not None and node.kernel_version == version
        node.kernel_version = version
        return fh, keep_cache

    async def _open_file(self, node: Node) -> tuple[int, OpenFile]:
        if node.info is not None and not validated(node.info):
            node.stale = True  # nothing pins the version: learn the size afresh
        info = await self._probe(node)
        assert node.file is not None
        check_expiry(node.file)
        fh = self._new_fh()
        version = (info.etag, info.last_modified) if validated(info) else ("open", fh)
        pattern = ReadPattern(self._budget, info.size, max_ahead=self._max_ahead,
                              max_request=self._max_request)
        self._open[fh] = handle = OpenFile(node, node.file, info, pattern,
                                           FileActivity(node.file.path, info.size), version)
        return fh, handle

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- inside archives (--expand) ------------------------------------------------------

    async def _expanded(self, node: Node) -> None:
        """Fill ``X/`` (``node``, or the folder in it that ``node`` is) with the members
        of ``X.zip``, once per version of the archive."""
        view = node.view
        if view is None:
            return
        node = self._nodes[view.root]
        archive = self._nodes[view.archive]
        async with view.lock:
            info = await self._probe(archive)
            version = (info.etag, info.last_modified, info.size)
            if view.version == version:
                return
            if view.failure is not None and view.failure.recent():
                raise view.failure.error
            try:
                found = await self._read_index(archive)
            except ZohofsError as exc:
                view.failure = Failure(exc)
                raise
            self._fill(node, found)
            view.version, view.failure = version, None

    async def _read_index(self, archive: Node) -> list[Member]:
        """The members of ``archive``, from its central directory, within the read
        deadline; the names it had to change are logged."""
        assert archive.file is not None
        path = archive.file.path
        fh, handle = await self._open_file(archive)

        async def read(offset: int, length: int) -> bytes:
            return b"".join(await self._read(handle, offset, length))

        try:
            with self._deadline(path, "reading its table of contents"):
                found, notes = await zipindex.read_index(read, handle.info.size)
        except BadArchive as exc:
            raise BadArchive(f"{path}: {exc}") from None
        finally:
            self.release(fh)
        for note in notes:
            log.warning("%s: %s", path, note)
        log.debug("%s: %d members", path, len(found))
        return found

    def _fill(self, root: Node, members: list[Member]) -> None:
        """Make ``root`` show exactly ``members``; nodes of paths seen before keep their
        inodes, names that left are forgotten by the kernel."""
        before: list[tuple[int, str, int, Member | None]] = []
        stack = [root]
        while stack:
            directory = stack.pop()
            for name, ino in directory.children.items():
                before.append((directory.ino, name, ino, self._nodes[ino].member))
                stack.append(self._nodes[ino])
            directory.children, directory.listing = {}, None
        for m in members:
            parent = root
            *folders, name = m.path.split("/")
            for folder in folders:
                parent = self._child(parent, folder, None)
                parent.member, parent.view = None, root.view  # maybe a file before
            leaf = self._child(parent, name, None)
            leaf.member, leaf.view = m, root.view
        # Names that left, and members that changed (the kernel keeps their size and
        # times): the kernel forgets them and looks them up again.
        for parent_ino, name, ino, member in before:
            if self.on_removed is not None and (
                    self._nodes[parent_ino].children.get(name) != ino
                    or self._nodes[ino].member != member):
                self.on_removed(parent_ino, name)

    async def _open_member(self, node: Node) -> tuple[int, Hashable]:
        assert node.view is not None
        await self._expanded(node)  # the archive may have changed
        member = node.member
        if member is None or not self._attached(node):
            raise NoSuchEntry(f"{node.name}: not in the archive any more")
        archive_fh, archive = await self._open_file(self._nodes[node.view.archive])
        name = f"{view_name(archive.file.path)}/{member.path}"
        try:
            key = (archive.node.ino, archive.version, member.path)
            reader = self._member_readers.get(key)
            if reader is None:
                with self._deadline(name, "reading its local header"):
                    header = b"".join(await self._read(
                        archive, member.header_offset, zipindex.LOCAL_HEADER.size))
                reader = member_reader(name, member, zipindex.data_offset(header, member),
                                       archive.info.size, self._cache, key)
                if reader.failed is not None:
                    log.warning("%s", reader.failed)
                self._member_readers[key] = reader
            archive.pattern.limit(reader.data_offset + member.compressed_size)
        except BaseException:
            self.release(archive_fh)
            raise
        fh = self._new_fh()
        self._members[fh] = OpenMember(node, reader, _ArchiveBytes(self, archive),
                                       archive_fh, FileActivity(name, member.size))
        return fh, archive.version

    def release(self, fh: int) -> None:
        member = self._members.pop(fh, None)
        if member is not None:
            self.release(member.archive_fh)
            return
        handle = self._open.pop(fh, None)
        if handle is not None:
            handle.pattern.stop()
            self._let_go(handle)
        node = handle.node if handle else None
        if node and node.stream and not any(h.node is node for h in self._open.values()):
            node.stream.close()  # nobody reads on: give the connection back
            node.stream = None

    async def read(self, fh: int, offset: int, size: int) -> list[memoryview]:
        """Exactly ``size`` bytes at ``offset``, fewer only at end of file, as views of the
        cached chunks in order (joining them is the caller's copy to make); within the read
        deadline, or ReadTimeout."""
        member = self._members.get(fh)
        if member is not None:
            reader, inflated = member.reader, member.reader.inflated
            with self._deadline(reader.name, "reading %d bytes at %d", size, offset):
                pieces = await reader.read(member.source, offset, size)
            self.stats.bytes_inflated += reader.inflated - inflated
            member.activity.read(offset, sum(len(p) for p in pieces))
            return pieces
        handle = self._open.get(fh)
        if handle is None:
            raise NoSuchEntry(f"no open file {fh}")
        with self._deadline(handle.file.path, "reading %d bytes at %d", size, offset):
            pieces = await self._read(handle, offset, size)
        handle.activity.read(offset, sum(len(p) for p in pieces))
        return pieces

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

    async def _read(self, handle: OpenFile, offset: int, size: int) -> list[memoryview]:
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
            plans = pattern.advise(offset, end - offset)
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
            if self._key(handle, i) in self._cache:
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
            self._cache.begin(self._key(handle, i) for i in run)
        return runs

    def _prefetch(self, handle: OpenFile, start: int, length: int) -> bool:
        """Fetch ``[start, start+length)`` ahead of the reader, in the background, held
        for it; False when the prefetch budget (or the lack of a nursery) forbids it."""
        if self._nursery is None:
            return False
        indices = chunk_range(start, start + length)
        missing = [i for i in indices if self._key(handle, i) not in self._cache]
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
            self._cache.release(key)
            self._budget.give(length)
        handle.held.clear()

    async def _chunk(self, handle: OpenFile, index: int) -> memoryview:
        key = self._key(handle, index)
        while True:
            data = self._cache.peek(key)
            if data is not None:
                break
            flight = self._cache.flight(key)
            if flight is None:  # evicted since it was claimed, or its prefetch gave up
                self._cache.begin([key])
                flight = self._cache.flight(key)
                assert flight is not None
                await self._fetch_run(handle, range(index, index + 1), ahead=False)
            else:
                await flight.done.wait()
            if flight.data is not None:
                data = flight.data
                break
            if not isinstance(flight.error, Abandoned):
                assert flight.error is not None
                raise flight.error
        length = handle.held.pop(key, None)
        if length is not None:  # read at last: it may be evicted now
            self._cache.release(key)
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
                pieces = await self._fetch(handle, start, length)
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
            self._cache.arrive(key, data, hold=key in handle.held)

    def _drop(self, handle: OpenFile, keys: list[Hashable], verdict: BaseException) -> None:
        for key in keys:
            length = handle.held.pop(key, None)
            if length is not None:
                self._budget.give(length)
            self._cache.fail(key, verdict)

    async def _fetch(self, handle: OpenFile, start: int, length: int) -> list[memoryview]:
        file = handle.file
        check_expiry(file)
        try:
            with self._doubting(handle):
                return await self._reader.fetch(file.url, start, length, handle.info,
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
                if self.on_stale is not None:
                    self.on_stale(node.ino)
            raise

    async def _streamed_chunk(self, handle: OpenFile, index: int) -> memoryview:
        """A chunk of a file whose server ignores Range: read the whole-file answer up to
        it, keeping every chunk passed on the way. Correct bytes, at the price of starting
        over from byte 0 when a reader goes back past what the cache still holds."""
        node = handle.node
        node.stream_lock = node.stream_lock or trio.Lock()
        async with node.stream_lock:
            for attempt in range(2):
                cached = self._cache.peek(self._key(handle, index))
                if cached is not None:
                    return cached
                stream = node.stream
                if (stream is None or stream.info is not handle.info
                        or stream.position > index * CHUNK):
                    if stream is not None:
                        stream.close()
                    check_expiry(handle.file)
                    stream = node.stream = await self._reader.open_whole(
                        handle.file.url, handle.info, self._tokens[handle.file.account])
                try:
                    while True:
                        i = stream.position // CHUNK
                        data = await stream.read(min(CHUNK, handle.info.size - stream.position))
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


class _HeldByOthers:
    """The inodes that nodes of other paths hold, for :func:`stable_inode`."""

    def __init__(self, fs: ZohoFS, path: str) -> None:
        self._fs = fs
        self._path = path

    def __contains__(self, ino: object) -> bool:
        return isinstance(ino, int) and self._fs.path_of(ino) not in (None, self._path)


class _ArchiveBytes:
    """An archive's bytes as one open member reads them: through the cache, with the
    archive's handle (its version pinned, its own request sizes)."""

    def __init__(self, fs: ZohoFS, handle: OpenFile) -> None:
        self._fs = fs
        self._handle = handle

    async def read(self, offset: int, size: int) -> list[memoryview]:
        return await self._fs._read(self._handle, offset, size)

    def peek(self, offset: int) -> memoryview | None:
        data = self._fs._cache.peek(self._fs._key(self._handle, offset // CHUNK))
        return None if data is None else data[offset % CHUNK:]


def check_expiry(file: BackupFile) -> None:
    """Fail with EACCES once the link is past the expiry date the listing gave."""
    if file.expires is not None and datetime.now(UTC) >= file.expires:
        # In local time: the date a reader of this machine's log expects.
        when = file.expires.astimezone().isoformat(timespec="seconds")
        raise LinkExpired(f"{file.path}: the download link expired on {when}; Zoho offers "
                          "a backup's links for 7 days only")
