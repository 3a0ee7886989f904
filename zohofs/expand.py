"""``--expand``: the folder ``X/`` next to each ``X.zip``, filled from the archive's
central directory, and its members opened and read through the archive's own handle.

Where a member lies is zipindex.py's to say, how its bytes come out zipread.py's; this
module ties them to the tree and to the block reader.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass

import cachetools
import trio

from zohofs import zipindex
from zohofs.blocks import BlockReader, OpenFile
from zohofs.deadline import deadline
from zohofs.errors import BadArchive, NoSuchEntry, UnreadableMember, ZohofsError, again
from zohofs.probes import Prober
from zohofs.stats import FileActivity
from zohofs.tree import Failure, Node, Tree, view_name
from zohofs.zipindex import HeaderMismatch, Member
from zohofs.zipread import Checkpoints, MemberReader, member_reader

log = logging.getLogger(__name__)

# Members whose inflation checkpoints are kept (each up to ~40 KiB per 4 MiB inflated).
MEMBER_READERS_KEPT = 4
# Members put in the tree between two turns of the event loop (~10 ms).
FILL_STEP = 2000


async def _now_and_then(n: int) -> None:
    """A turn for the event loop every :data:`FILL_STEP` steps of a long loop."""
    if n % FILL_STEP == FILL_STEP - 1:
        await trio.lowlevel.checkpoint()


class ArchiveBytes:
    """An archive's bytes as one open member reads them: through the cache, with the
    archive's handle (its version pinned, its own request sizes)."""

    def __init__(self, blocks: BlockReader, handle: OpenFile) -> None:
        self._blocks = blocks
        self.handle = handle

    async def read(self, offset: int, size: int) -> list[memoryview]:
        return await self._blocks.read(self.handle, offset, size)


@dataclass(eq=False)
class OpenMember:
    """An open member of an archive: its reader, over a handle of the archive itself."""

    node: Node
    reader: MemberReader
    source: ArchiveBytes  # the archive's bytes, through a handle of its own
    activity: FileActivity
    key: Hashable  # of its reader: (archive inode, archive version, member path)


class Expander:
    def __init__(self, tree: Tree, prober: Prober, blocks: BlockReader,
                 checkpoints: Checkpoints) -> None:
        self._tree = tree
        self._prober = prober
        self._blocks = blocks
        self._checkpoints = checkpoints
        # Member readers by (archive inode, version, member path): their inflation
        # checkpoints outlive one open.
        self._readers: cachetools.LRUCache[Hashable, MemberReader] = (
            cachetools.LRUCache(MEMBER_READERS_KEPT))
        # Members found damaged, by the same key: this outlives their readers, so that a
        # reader made again (its inflated chunks still cached) fails as the first did.
        self._damaged: dict[Hashable, BadArchive] = {}

    async def expanded(self, node: Node) -> None:
        """Fill ``X/`` (``node``, or the folder in it that ``node`` is) with the members
        of ``X.zip``, once per version of the archive; nothing for other nodes."""
        view = node.view
        if view is None:
            return
        root = self._tree.node(view.root)
        archive = self._tree.node(view.archive)
        async with view.lock:
            info = await self._prober.probe(archive)
            version = (info.etag, info.last_modified, info.size)
            if view.version == version:
                return
            if view.failure is not None and view.failure.recent():
                raise again(view.failure.error)
            try:
                found = await self._read_index(archive)
            except ZohofsError as exc:
                view.failure = Failure(exc)
                raise
            await self._fill(root, found)
            view.version, view.failure = version, None

    async def _read_index(self, archive: Node) -> list[Member]:
        """The members of ``archive``, from its central directory, within the read
        deadline; the names it had to change are logged."""
        assert archive.file is not None
        path = archive.file.path
        handle = self._blocks.open(archive, await self._prober.for_open(archive))

        async def read(offset: int, length: int) -> bytes:
            return b"".join(await self._blocks.read(handle, offset, length))

        try:
            with deadline(self._blocks.read_deadline, path, "reading its table of contents"):
                found, notes = await zipindex.read_index(read, handle.info.size)
        except BadArchive as exc:
            raise BadArchive(f"{path}: {exc}") from None
        finally:
            self._blocks.release(handle)
        for note in notes:
            log.warning("%s: %s", path, note)
        log.debug("%s: %d members", path, len(found))
        return found

    async def _fill(self, root: Node, members: list[Member]) -> None:
        """Make ``root`` show exactly ``members``; nodes of paths seen before keep their
        inodes, names that left are forgotten by the kernel. An archive of 500 000
        members takes seconds: the event loop gets its turn every :data:`FILL_STEP`
        (lookups in this folder wait for the view's lock meanwhile, nothing else does)."""
        tree = self._tree
        before: list[tuple[int, str, int, Member | None]] = []
        stack = [root]
        while stack:
            directory = stack.pop()
            for name, ino in directory.children.items():
                before.append((directory.ino, name, ino, tree.node(ino).member))
                stack.append(tree.node(ino))
                await _now_and_then(len(before))
            directory.children, directory.listing = {}, None
        for n, m in enumerate(members):
            await _now_and_then(n)
            parent = root
            *folders, name = m.path.split("/")
            for folder in folders:
                parent = tree.child(parent, folder, None)
                parent.member, parent.view = None, root.view  # maybe a file before
            leaf = tree.child(parent, name, None)
            leaf.member, leaf.view = m, root.view
        # Names that left, and members that changed (the kernel keeps their size and
        # times): the kernel forgets them and looks them up again.
        for n, (parent_ino, name, ino, member) in enumerate(before):
            await _now_and_then(n)
            if (tree.node(parent_ino).children.get(name) != ino
                    or tree.node(ino).member != member):
                tree.removed(parent_ino, name)

    async def open(self, node: Node) -> OpenMember:
        """A member opened for reading, over a handle of the archive's current version.

        A local header that disagrees with the index means the index is not the
        archive's any more (replaced on a server that sends no validators, where the
        view cannot tell) or the archive is damaged: the index is read again, once."""
        assert node.view is not None
        try:
            return await self._open(node)
        except HeaderMismatch as exc:
            log.warning("%s; reading the archive's index again", exc)
            node.view.version = None
        return await self._open(node)

    async def _open(self, node: Node) -> OpenMember:
        assert node.view is not None
        await self.expanded(node)  # the archive may have changed
        member = node.member
        if member is None or not self._tree.attached(node):
            raise NoSuchEntry(f"{node.name}: not in the archive any more")
        archive_node = self._tree.node(node.view.archive)
        archive = self._blocks.open(archive_node,
                                    await self._prober.for_open(archive_node))
        name = f"{view_name(archive.file.path)}/{member.path}"
        try:
            key = (archive.node.ino, archive.version, member.path)
            reader = self._readers.get(key)
            if reader is None:
                with deadline(self._blocks.read_deadline, name, "reading its local header"):
                    header = b"".join(await self._blocks.read(
                        archive, member.header_offset, zipindex.LOCAL_HEADER.size))
                reader = member_reader(name, member, zipindex.data_offset(header, member),
                                       archive.info.size, self._blocks.cache, key,
                                       self._checkpoints)
                if reader.failed is not None:
                    log.warning("%s", reader.failed)
                reader.failed = reader.failed or self._damaged.get(key)
                self._readers[key] = reader
                # What it has checked starts afresh: so do the pages the kernel kept.
                node.kernel_version = None
            archive.pattern.limit(reader.data_offset + member.compressed_size)
        except BaseException:
            self._blocks.release(archive)
            raise
        return OpenMember(node, reader, ArchiveBytes(self._blocks, archive),
                          FileActivity(name, member.size), key)

    def release(self, member: OpenMember) -> None:
        self._blocks.release(member.source.handle)

    async def read(self, member: OpenMember, offset: int, size: int) -> list[memoryview]:
        reader, inflated = member.reader, member.reader.inflated
        try:
            with deadline(self._blocks.read_deadline, reader.name, "reading %d bytes at %d",
                          size, offset):
                pieces = await reader.read(member.source, offset, size)
        except BadArchive as exc:
            # Pages the kernel kept of a member now known damaged are no data either.
            self._tree.stale(member.node)
            if not isinstance(exc, UnreadableMember):
                self._damaged[member.key] = reader.failed or exc
            raise
        self._blocks.stats.bytes_inflated += reader.inflated - inflated
        member.activity.read(offset, sum(len(p) for p in pieces))
        return pieces
