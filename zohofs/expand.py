"""``--expand``: the folder ``X/`` next to each ``X.zip``, showing what the archive's
central directory lists (its entries made nodes as they are looked up or listed), and
its members opened and read through the archive's own handle.

Where a member lies is zipindex.py's to say, how its bytes come out zipread.py's; this
module ties them to the tree and to the block reader.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import cachetools
import trio

from zohofs import zipindex
from zohofs.blocks import BlockReader, OpenFile
from zohofs.contents import Contents, Folder
from zohofs.deadline import deadline
from zohofs.errors import BadArchive, NoSuchEntry, UnreadableMember, ZohofsError, again
from zohofs.probes import Prober
from zohofs.stats import FileActivity
from zohofs.tree import Failure, Node, Tree, view_name
from zohofs.zipindex import HeaderMismatch
from zohofs.zipread import Checkpoints, MemberReader, member_reader

log = logging.getLogger(__name__)

# Members whose inflation checkpoints are kept (each up to ~40 KiB per 4 MiB inflated).
MEMBER_READERS_KEPT = 4
# How much of an archive's central directory is read at a time.
INDEX_STEP = 1 << 20
# Nodes checked against an archive's new contents between two turns of the event loop.
REFRESH_STEP = 2000
# Members freed at a time in a worker thread (a step is one call, which holds Python's lock).
FREE_STEP = 10_000


async def _now_and_then(n: int) -> None:
    """A turn for the event loop every :data:`REFRESH_STEP` steps of a long loop."""
    if n % REFRESH_STEP == REFRESH_STEP - 1:
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


def _arranged(found: list[zipindex.Fields]) -> Contents:
    """The members as contents, in a worker thread; the parse's tuples freed there too,
    a step at a time (freeing half a million at once is one call that holds Python's lock,
    and the event loop, for 0.02 to 0.1 s)."""
    try:
        return Contents(found)
    finally:
        while found:
            del found[-FREE_STEP:]


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
        """Make ``X/`` (``node``, or the folder in it that ``node`` is) show the members
        of ``X.zip``: its index read once per version of the archive (and again after
        the kernel forgot the whole folder); nothing for other nodes."""
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
            contents = await trio.to_thread.run_sync(_arranged, found)
            # Shown at once (a listing under way stops at its next turn, see entries());
            # the nodes alive are then brought in step with it.
            view.contents, view.subfolders = contents, contents.top.subfolders
            await self._refresh(root, contents)
            view.version, view.failure = version, None

    async def _read_index(self, archive: Node) -> list[zipindex.Fields]:
        """The members of ``archive``, from its central directory, within the read
        deadline; the names it had to change are logged."""
        assert archive.file is not None
        path = archive.file.path
        handle = self._blocks.open(archive, await self._prober.for_open(archive), own=True)

        async def read(offset: int, length: int) -> bytes:
            # A MiB at a time: a directory of tens of MiB read in one go would hold that
            # many chunk buffers at once, over the cache's size, and leave holes in the
            # heap where they were (20 MiB kept after a 500 000-member archive).
            out = bytearray()
            for at in range(offset, offset + length, INDEX_STEP):
                for piece in await self._blocks.read(
                        handle, at, min(INDEX_STEP, offset + length - at)):
                    out += piece
            return bytes(out)

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

    async def _refresh(self, root: Node, contents: Contents) -> None:
        """Make the nodes alive under ``root`` show ``contents``: they keep their inodes;
        those whose name left, or became a folder or a file, leave the tree (they are
        freed once the kernel forgets them), and the kernel is told to look up again
        those that left or changed (it keeps their size and times)."""
        tree = self._tree
        stack, n = [root], 0
        while stack:
            directory = stack.pop()
            path = tree.archive_path(directory)
            folder = contents.folder(path) if path is not None else None
            for name, ino in list(directory.children.items()):
                n += 1
                await _now_and_then(n)
                if directory.children.get(name) != ino:
                    continue  # forgotten (and freed) meanwhile
                node = tree.node(ino)
                entry = contents.find(folder, name) if folder is not None else None
                if entry is None or (entry < 0) != node.is_dir:
                    del directory.children[name]
                    tree.removed(directory.ino, name)
                    continue
                member = contents.member(entry)
                if member != node.member:
                    node.member = member
                    tree.removed(directory.ino, name)
                if node.is_dir:
                    stack.append(node)

    def folder(self, node: Node) -> tuple[Contents, Folder] | None:
        """The folder of the archive that ``node`` (``X/`` or a folder in it) shows, as
        its archive's contents hold it now; None if they are not read (or it left)."""
        contents = node.view.contents if node.view is not None else None
        if contents is None:
            return None
        path = self._tree.archive_path(node)
        folder = contents.folder(path) if path is not None else None
        return None if folder is None else (contents, folder)

    def child(self, parent: Node, name: str) -> Node | None:
        """The entry ``name`` of a folder of ``X/``, made a node if it was not one."""
        ino = parent.children.get(name)
        if ino is not None:
            return self._tree.node(ino)
        found = self.folder(parent)
        if found is None:
            return None
        contents, folder = found
        entry = contents.find(folder, name)
        return None if entry is None else self._made(parent, contents, entry)

    def entries(self, parent: Node, start: int) -> Iterator[tuple[Node, int]]:
        """The entries of a folder of ``X/`` from position ``start`` in name order, made
        nodes as they are taken, with their positions."""
        found = self.folder(parent)
        if found is None:
            return
        contents, folder = found
        for i in range(start, len(folder.entries)):
            if parent.view is None or parent.view.contents is not contents:
                return  # a new version since: the kernel asks again from here
            yield self._made(parent, contents, folder.entries[i]), i

    def _made(self, parent: Node, contents: Contents, entry: int) -> Node:
        name = contents.name(entry)
        if name in parent.children:
            return self._tree.node(parent.children[name])
        node = self._tree.child(parent, name, None)
        node.member, node.view = contents.member(entry), parent.view
        return node

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
        archive = self._blocks.open(archive_node, await self._prober.for_open(archive_node),
                                    own=True)
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
