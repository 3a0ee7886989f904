"""The filesystem without FUSE: what the kernel asks (lookup, getattr, readdir, open,
read, release, statfs, xattrs), answered from the tree, the probes, the block reader and,
with ``--expand``, the archive views.

Everything here is callable from tests with no kernel involved; ``operations.py`` only
translates to and from pyfuse3's types. The collaborators each have a module:

    tree.py     nodes and stable inodes          probes.py   sizes and validators
    blocks.py   a file's bytes, cached           expand.py   folders of zip members
    status.py   what `zohofs status` shows
"""

from __future__ import annotations

import bisect
import json
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import trio

from zohofs import memory
from zohofs.access import Access
from zohofs.auth import TokenSource
from zohofs.blocks import BlockReader, OpenFile
from zohofs.deadline import READ_DEADLINE, deadline
from zohofs.diskcache import DiskCache
from zohofs.errors import IsADirectory, NoSuchEntry, NotADirectory, NotALink, ReadOnly
from zohofs.expand import Expander, OpenMember
from zohofs.probes import Prober
from zohofs.remote import RangeReader
from zohofs.status import STATUS_XATTR, file_xattrs, snapshot
from zohofs.tree import BACKUP_LINK_LIFETIME, ROOT_INODE, KernelCache, Node, Tree
from zohofs.zipread import Checkpoints
from zohofs.zoho import BackupFile

# How long the kernel may keep names and attributes. Short for entries that failed, so
# that the next access asks (and probes) again.
GOOD_TIMEOUT = 60.0
FAILED_TIMEOUT = 0.0
# st_blksize: Python's open(), stdio and rsync read this much after every seek, cp and cat
# that much at a time (at least 128 KiB). 1 MiB keeps a random buffered read to about a
# MiB fetched, while copies still send FUSE its largest reads (1 MiB).
BLKSIZE = 1024 * 1024


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


class ZohoFS:
    """``tree`` and ``prober`` are shared with the catalog that keeps the tree in step
    with Zoho's listing (runtime.py); made here when not given. ``on_miss`` is called with
    a name a lookup did not find, and says whether it refreshed the listing."""

    def __init__(self, reader: RangeReader, tokens: Mapping[str, TokenSource], *,
                 cache_size: int, max_request: int, max_ahead: int,
                 access: Access | None = None, read_deadline: float = READ_DEADLINE,
                 expand: bool = False, kernel: KernelCache | None = None,
                 tree: Tree | None = None, prober: Prober | None = None,
                 on_miss: Callable[[str], Awaitable[bool]] | None = None,
                 disk: DiskCache | None = None) -> None:
        self.tree = tree or Tree(expand=expand, kernel=kernel)
        self.prober = prober or Prober(reader, tokens, read_deadline)
        # Inflation checkpoints (--expand) take up to an eighth of the cache budget.
        checkpoints = Checkpoints(cache_size // 8)
        self.blocks = BlockReader(reader, tokens, cache_size=cache_size,
                                  max_request=max_request, max_ahead=max_ahead,
                                  read_deadline=read_deadline, kernel=kernel,
                                  also_cached=lambda: checkpoints.size, disk=disk)
        self._archives = Expander(self.tree, self.prober, self.blocks, checkpoints)
        self._memory = memory.Collector()
        self._disk = disk
        self._tokens = tokens
        self._access = access or Access.from_settings()
        self._on_miss = on_miss
        self.read_deadline = read_deadline
        self.stats = reader.stats
        self._open: dict[int, OpenFile | OpenMember] = {}
        self._none_open = trio.Event()
        self._next_fh = 1

    # -- the tree ------------------------------------------------------------------------

    def add_files(self, files: Iterable[BackupFile]) -> list[Node]:
        return self.tree.add_files(files)

    async def set_files(self, files: Iterable[BackupFile]) -> None:
        """Make the tree show exactly ``files``; probe the new ones."""
        await self.prober.probe_all(self.tree.set_files(files))

    async def probe_all(self) -> None:
        await self.prober.probe_all(self.files)

    @property
    def files(self) -> list[Node]:
        return self.tree.files

    def start(self, nursery: trio.Nursery) -> None:
        """Give the filesystem a place to run background prefetches."""
        self.blocks.start(nursery)

    # -- metadata ------------------------------------------------------------------------

    def _mtime(self, node: Node) -> float:
        if node.member is not None:
            return node.member.mtime
        if node.link is not None:  # the time of what it points to
            target = self.tree.resolve(node)
            return self._mtime(target) if target else 0.0
        if node.view is not None and node.ino == node.view.root:
            # X/ shows X.zip's time, also before anyone looked in.
            return self._mtime(self.tree.node(node.view.archive))
        if node.view is not None:  # a folder in X/: its newest member's
            found = self._archives.folder(node)
            return found[1].mtime if found is not None else 0.0
        if node.file is not None:
            if node.info and node.info.last_modified is not None:
                return node.info.last_modified
            if node.file.expires is not None:
                return (node.file.expires - BACKUP_LINK_LIFETIME).timestamp()
            return 0.0
        return max((self._mtime(self.tree.node(c)) for c in node.children.values()),
                   default=0.0)

    def attr(self, node: Node) -> Attr:
        """Attributes as known now (no I/O): a file not yet probed shows size 0, briefly."""
        # Folders and members are known from the tree and the archive's index; a file
        # only once probed. What is known the kernel may keep: an `ls -l` of a folder of
        # members then costs one round trip per entry, not one per stat.
        known = node.file is None or (node.info is not None and not node.stale)
        access = self._access
        if node.link is not None:
            mode, nlink, size = stat.S_IFLNK | 0o777, 1, len(os.fsencode(node.link))
        elif node.is_dir:
            mode, nlink, size = stat.S_IFDIR | access.dir_mode, 2 + self._subfolders(node), 0
        elif node.member is not None:
            mode, nlink, size = (stat.S_IFREG | access.member_mode(node.member.mode), 1,
                                 node.member.size)
        else:
            mode, nlink, size = (stat.S_IFREG | access.file_mode, 1,
                                 node.info.size if node.info else 0)
        return Attr(node.ino, mode, nlink, size, int(self._mtime(node) * 1e9), access.uid,
                    access.gid, BLKSIZE, GOOD_TIMEOUT if known else FAILED_TIMEOUT)

    def _subfolders(self, node: Node) -> int:
        if node.view is not None:
            found = self._archives.folder(node)
            if found is not None:
                return found[1].subfolders
            return node.view.subfolders if node.ino == node.view.root else 0
        return sum(self.tree.node(c).is_dir for c in node.children.values())

    async def getattr(self, ino: int) -> Attr:
        node = self.tree.node(ino)
        if node.file is not None and (node.info is None or node.stale):
            await self.prober.probe(node)
        return self.attr(node)

    async def lookup(self, parent: int, name: str) -> Attr:
        """The attributes of ``name`` in ``parent``, counted as a lookup the kernel will
        forget (:meth:`forget`)."""
        node = self.directory(parent)
        if name in (".", ".."):
            found: Node | None = node if name == "." else self.tree.node(node.parent)
        elif node.view is not None:
            await self._archives.expanded(node)
            found = self._archives.child(node, name)
        else:
            found = self._child(node, name)
            if found is None and self._on_miss is not None and await self._on_miss(name):
                found = self._child(node, name)  # a new backup may have just appeared
        if found is None:
            raise NoSuchEntry(f"{name!r} not found")
        attr = await self.getattr(found.ino)
        found.lookups += 1
        self._memory.held(len(self.tree))
        return attr

    def _child(self, node: Node, name: str) -> Node | None:
        ino = node.children.get(name)
        return None if ino is None else self.tree.node(ino)

    def listed(self, ino: int) -> None:
        """The kernel took the entry ``ino`` from a listing: a lookup it will forget."""
        self.tree.node(ino).lookups += 1
        self._memory.held(len(self.tree))

    def forget(self, forgotten: Iterable[tuple[int, int]]) -> None:
        """The kernel forgot these (inode, lookups): nodes of expanded archives that
        nobody holds any more are freed."""
        if any([self.tree.forget(ino, count) for ino, count in forgotten]):
            self._memory.give_back()  # an archive's nodes and contents are all gone

    def readdir(self, ino: int, start: int) -> Iterator[tuple[str, Attr, int]]:
        """Entries after offset ``start``, in inode order; an entry's offset is its inode
        (never below 3, so that ``.`` and ``..`` can come first: :meth:`dots`).

        Listings change under an open directory (a new backup, an old one leaving): keyed
        by inode, that never makes a reader skip or repeat an entry. The kernel asks for a
        page of entries at a time: the sorted listing is kept, and attributes (and, in an
        expanded archive, nodes) are made only for the entries taken."""
        node = self.directory(ino)
        if node.view is not None:
            # A folder of an archive: in name order, an entry's offset its position (+3).
            # A new version of the archive while a listing is under way may make it skip
            # or repeat entries; nothing else changes its contents.
            for entry, i in self._archives.entries(node, max(0, start - 2)):
                yield entry.name, self.attr(entry), i + 3
            return
        if node.listing is None:
            node.listing = sorted((child, name) for name, child in node.children.items())
        listing = node.listing
        for i in range(bisect.bisect_right(listing, (start, "\U0010ffff")), len(listing)):
            child, name = listing[i]
            yield name, self.attr(self.tree.node(child)), child

    def dots(self, ino: int) -> list[tuple[str, Attr, int]]:
        """``.`` and ``..`` of a directory, at offsets 1 and 2 (`ls -a` shows them)."""
        node = self.directory(ino)
        return [(".", self.attr(node), 1), ("..", self.attr(self.tree.node(node.parent)), 2)]

    def readlink(self, ino: int) -> str:
        node = self.tree.node(ino)
        if node.link is None:
            raise NotALink(f"{node.name} is not a symbolic link")
        return node.link

    def directory(self, ino: int) -> Node:
        node = self.tree.node(ino)
        if not node.is_dir:
            raise NotADirectory(f"{node.name} is a file")
        return node

    async def opendir(self, ino: int) -> None:
        await self._archives.expanded(self.directory(ino))

    def status(self) -> dict[str, object]:
        """What the mount is doing, for `zohofs status` (the root's user.zohofs.status)."""
        return snapshot(self.stats, self.files, (h.activity for h in self._open.values()),
                        self.blocks.cache.size,
                        sum(t.refreshes for t in self._tokens.values()), self._disk)

    def open_paths(self) -> list[str]:
        """The paths of the files open now, for the log."""
        return sorted(h.activity.path for h in self._open.values())

    def xattrs(self, ino: int) -> dict[str, bytes]:
        """Extended attributes: a file's source on it (listed, so `rsync -X` and `cp -a`
        copy them: they are stable)."""
        return file_xattrs(self.tree.node(ino))

    def xattr(self, ino: int, name: str) -> bytes | None:
        """One extended attribute; the root's ``user.zohofs.status`` is given when asked
        for but never listed: a snapshot that changes every second is nothing for
        `rsync -aX` to copy, and it would itemize the root on every run."""
        if ino == ROOT_INODE and name == STATUS_XATTR:
            return json.dumps(self.status()).encode()
        return self.xattrs(ino).get(name)

    def statfs(self) -> tuple[int, int, int]:
        """(block size, total blocks, file count). The adapter reports every block free:
        nothing can be written, but a read-only backup is not a full disk to monitors."""
        total = sum(n.info.size for n in self.files if n.info)
        return BLKSIZE, -(-total // BLKSIZE), len(self.tree)

    # -- data ----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """A new file handle, and whether the kernel may keep the pages it cached of
        this file: only when they are of the same version as what this handle reads."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("zohofs is read-only")
        node = self.tree.node(ino)
        handle: OpenFile | OpenMember
        if node.member is not None:
            handle = await self._archives.open(node)
            version = handle.source.handle.version
        elif node.is_dir:
            raise IsADirectory(f"{node.name or '/'} is a folder")
        else:
            handle = self.blocks.open(node, await self.prober.for_open(node))
            version = handle.version
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = handle
        keep_cache = version is not None and node.kernel_version == version
        node.kernel_version = version
        return fh, keep_cache

    async def wait_none_open(self) -> None:
        """Return once no file is open."""
        if self._open:
            self._none_open = trio.Event()
            await self._none_open.wait()

    def release(self, fh: int) -> None:
        handle = self._open.pop(fh, None)
        if not self._open:
            self._none_open.set()
        if isinstance(handle, OpenMember):
            self._archives.release(handle)
        elif handle is not None:
            self.blocks.release(handle)

    async def read(self, fh: int, offset: int, size: int) -> list[memoryview]:
        """Exactly ``size`` bytes at ``offset``, fewer only at end of file, as views of the
        cached chunks in order (joining them is the caller's copy to make); within the read
        deadline, or ReadTimeout."""
        handle = self._open.get(fh)
        if handle is None:
            raise NoSuchEntry(f"no open file {fh}")
        if isinstance(handle, OpenMember):
            return await self._archives.read(handle, offset, size)
        with deadline(self.read_deadline, handle.file.path, "reading %d bytes at %d", size,
                      offset):
            pieces = await self.blocks.read(handle, offset, size)
        handle.activity.read(offset, sum(len(p) for p in pieces))
        return pieces
