"""The inode tree: ``/<zgid>/<job-id>/<file>``, and with ``--expand`` the folders that
show what each zip holds. Nodes, stable inode numbers, adding and removing entries.

No I/O here: what a node knows of its server (probes) and of its bytes (reads) is
filled in by the modules above it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Protocol

import trio

from zohofs.answers import RemoteInfo
from zohofs.contents import Contents
from zohofs.errors import NoSuchEntry, ZohofsError
from zohofs.remote import WholeFileStream
from zohofs.zipindex import Member
from zohofs.zoho import BackupFile

ROOT_INODE = 1
# Zoho's sample expiry dates are exactly 7 days after the backup completed.
BACKUP_LINK_LIFETIME = timedelta(days=7)
# The folder of links that name each org by its account's name.
BY_NAME = "by-name"
LAST_RESERVED_INODE = 2  # readdir gives `.` and `..` offsets 1 and 2
# A failed probe is not repeated sooner than this: the kernel serialises lookups of one
# name, so without it N readers of a failing file would probe it N times in a row.
FAILED_PROBE_TTL = 1.0


class KernelCache(Protocol):
    """What the kernel holds of the tree and must be told to forget (operations.py
    implements it; without a kernel, nothing to tell)."""

    def removed(self, parent: int, name: str) -> None:
        """The entry ``name`` of ``parent`` left the tree, or changed."""

    def stale(self, ino: int) -> None:
        """The size and pages the kernel holds of ``ino`` may be wrong."""


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
    # What that version holds; dropped (and read again when next asked for) once the
    # kernel has forgotten every node in the folder.
    contents: Contents | None = None
    subfolders: int = 0  # of X/ as last read: its link count, also once contents went


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    name: str
    parent: int
    file: BackupFile | None = None  # None for directories and members
    member: Member | None = None  # a file inside an archive (--expand)
    link: str | None = None  # a symbolic link's target, relative to its folder
    view: ArchiveView | None = None  # on X/ and on each folder and member in it
    # In X/ and its folders, only the nodes alive now: the rest are in the view's
    # contents, made nodes when looked up or listed.
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
    # How many times the kernel was given this node (lookups, listed entries) and has not
    # forgotten it: a node in X/ is freed at 0.
    lookups: int = 0

    @property
    def is_dir(self) -> bool:
        return self.file is None and self.member is None and self.link is None


def view_name(file_name: str) -> str | None:
    """The folder that shows a zip's members (``--expand``): the zip's name without
    ``.zip``; None for anything else."""
    return file_name[:-4] if file_name.endswith(".zip") else None


def stable_inode(path: str, taken: Container[int]) -> int:
    """An inode number derived from the path, so it is the same on every mount.

    Backup tools compare inode numbers between runs; the mount time must not change them.
    """
    digest = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big")
    ino = digest & (2**63 - 1)
    # Never 1 (the root) or 2: readdir gives `.` and `..` those offsets.
    while ino <= LAST_RESERVED_INODE or ino in taken:  # a collision: still deterministic
        ino = (ino + 1) & (2**63 - 1)
    return ino


class Tree:
    """Every node ever made, by inode: one whose path comes back keeps its number."""

    def __init__(self, *, expand: bool = False, kernel: KernelCache | None = None) -> None:
        self._expand = expand
        self._kernel = kernel
        self._nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE)}
        self._most = 1  # nodes held at once since _nodes was made

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NoSuchEntry(f"no inode {ino}") from None

    def add_files(self, files: Iterable[BackupFile]) -> list[Node]:
        """Put files into the tree (updating the link of those already there); the nodes
        that are new."""
        added = []
        for f in files:
            parent = self._nodes[ROOT_INODE]
            for part in (f.zgid, f.job_id):
                parent = self.child(parent, part, None)
            known = f.name in parent.children
            node = self.child(parent, f.name, f)
            node.file = f  # maybe a fresh link (or expiry) for a file we had
            if not known:
                added.append(node)
                folder = view_name(f.name)
                if self._expand and folder is not None:
                    view = self.child(parent, folder, None)
                    view.view = view.view or ArchiveView(node.ino, view.ino)
        self._relink()
        return added

    def set_files(self, files: Iterable[BackupFile]) -> list[Node]:
        """Make the tree show exactly ``files``; the nodes that are new.

        Entries that left the listing leave the tree, but their inodes stay valid, so open
        files keep reading while their link lasts.
        """
        files = list(files)
        wanted = {f.path for f in files}
        for node in self.files:
            if node.file is not None and node.file.path not in wanted:
                self.detach(node)
        return self.add_files(files)

    def detach(self, node: Node) -> None:
        parent = self._nodes[node.parent]
        folder = view_name(node.name) if node.file is not None else None
        if folder is not None:
            view = self._nodes.get(parent.children.get(folder, 0))
            if view is not None and view.view is not None:
                self.detach(view)  # the archive left: so does the view into it
        if parent.children.get(node.name) == node.ino:
            del parent.children[node.name]
            parent.listing = None
            self.removed(parent.ino, node.name)
            if not parent.children and parent.ino != ROOT_INODE:
                self.detach(parent)

    def _relink(self) -> None:
        """The names people read, as symbolic links next to the ids: each org by its
        account's name in ``by-name/`` (unless it is the only account's "default"), and in
        each org ``latest`` and one link per backup named by its date (when the backup
        completed: its links' expiry less 7 days, in Zoho's zone). Links, so that a file
        manager follows them and rsync and restic store them as links, copying nothing
        twice; the names of orgs one level down, so that a glob over ``/zoho/*/latest/``
        meets each org once."""
        wanted: dict[int, dict[str, str]] = {}
        accounts: dict[str, set[str]] = {}
        backups: dict[str, dict[str, date | None]] = {}
        for node in self.files:
            f = node.file
            assert f is not None
            accounts.setdefault(f.zgid, set()).add(f.account)
            jobs = backups.setdefault(f.zgid, {})
            known = jobs.setdefault(f.job_id, None)
            if f.expires is not None:
                made = (f.expires - BACKUP_LINK_LIFETIME).date()
                jobs[f.job_id] = made if known is None else min(known, made)
        root = self._nodes[ROOT_INODE]
        orgs_of: dict[str, list[str]] = {}
        for zgid, names in accounts.items():
            if len(names) == 1:
                orgs_of.setdefault(next(iter(names)), []).append(zgid)
        # A name that covers two orgs names neither.
        by_name = {name: f"../{zgids[0]}" for name, zgids in orgs_of.items()
                   if len(zgids) == 1 and name not in ("", "default", zgids[0])}
        if by_name:
            wanted[self.child(root, BY_NAME, None).ino] = by_name
        for zgid in accounts:
            org = self._nodes[root.children[zgid]]
            jobs = backups[zgid]
            links = wanted.setdefault(org.ino, {})
            links["latest"] = max(jobs, key=lambda j: (jobs[j] or date.min, j))
            for job in sorted(jobs, key=lambda j: (jobs[j] or date.min, j)):
                day = jobs[job]
                if day is not None:
                    label, n = day.isoformat(), 2
                    while label in links:
                        label, n = f"{day.isoformat()} ({n})", n + 1
                    links[label] = job
        for folder in [self._nodes[ino] for ino in (ROOT_INODE, *root.children.values())]:
            if not folder.is_dir:
                continue
            links = wanted.get(folder.ino, {})
            for name, ino in list(folder.children.items()):
                node = self._nodes[ino]
                if node.link is not None and links.get(name) != node.link:
                    self.detach(node)
            for name, target in links.items():
                if name in folder.children and self._nodes[folder.children[name]].link is None:
                    continue  # a real entry has the name: it wins
                self.child(folder, name, None).link = target

    def forget(self, ino: int, count: int) -> bool:
        """The kernel forgot ``count`` of its lookups of ``ino``: a node of an expanded
        archive that nobody holds any more is freed, and so, in turn, are its folders;
        once none is left, so are the archive's contents (then True)."""
        node = self._nodes.get(ino)
        if node is None:
            return False
        node.lookups -= count
        view = node.view
        while (view is not None and node.ino != view.root and node.lookups <= 0
               and not node.children):
            del self._nodes[node.ino]
            self._shrink()
            parent = self._nodes.get(node.parent)
            if parent is None:  # left the folder first, which was freed before it
                return False
            if parent.children.get(node.name) == node.ino:
                del parent.children[node.name]
                if not parent.children:
                    parent.children = {}  # a dict keeps the room it once needed
            if parent.ino == view.root and not parent.children:
                dropped = view.contents is not None
                view.contents, view.version = None, None
                return dropped
            node = parent
        return False

    def _shrink(self) -> None:
        """A dict keeps the room of the most entries it ever held: once the nodes are down
        to a quarter of that, they move to one of their size."""
        if len(self._nodes) < self._most // 4:
            self._nodes = dict(self._nodes)
            self._most = len(self._nodes)

    def archive_path(self, node: Node) -> str | None:
        """Where a folder or member of ``X/`` is in the archive ("" for ``X/`` itself);
        None for a node that left it."""
        assert node.view is not None
        root, parts = node.view.root, []
        while node.ino != root:
            parts.append(node.name)
            parent = self._nodes.get(node.parent)
            if parent is None or parent.children.get(node.name) != node.ino:
                return None
            node = parent
        return "/".join(reversed(parts))

    def resolve(self, link: Node) -> Node | None:
        """The node a link points to (its targets are relative: ``x`` or ``../x``)."""
        assert link.link is not None
        at = self._nodes[link.parent]
        for part in link.link.split("/"):
            ino = at.parent if part == ".." else at.children.get(part)
            if ino is None:
                return None
            at = self._nodes[ino]
        return at

    def removed(self, parent: int, name: str) -> None:
        """Tell the kernel that ``name`` in ``parent`` left or changed."""
        if self._kernel is not None:
            self._kernel.removed(parent, name)

    def stale(self, node: Node) -> None:
        """Make the kernel drop what it holds of ``node``'s pages, now and at its next
        open."""
        node.kernel_version = None
        if self._kernel is not None:
            self._kernel.stale(node.ino)

    def child(self, parent: Node, name: str, file: BackupFile | None) -> Node:
        """The node ``name`` of ``parent``, made (at its stable inode) if missing."""
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
            self._most = max(self._most, len(self._nodes))
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
        """The path ``child`` gave the node at ``ino`` (a file's own, a folder's or
        member's with a trailing slash), None for a free inode."""
        node = self._nodes.get(ino)
        if node is None:
            return None
        return node.file.path if node.file else self._path(self._nodes[node.parent], node.name)

    @property
    def files(self) -> list[Node]:
        """The files in the tree now (not those that left it)."""
        return [n for n in self._nodes.values() if n.file is not None and self.attached(n)]

    def attached(self, node: Node) -> bool:
        while node.ino != ROOT_INODE:
            parent = self._nodes[node.parent]
            if parent.children.get(node.name) != node.ino:
                return False
            node = parent
        return True


class _HeldByOthers:
    """The inodes that nodes of other paths hold, for :func:`stable_inode`."""

    def __init__(self, tree: Tree, path: str) -> None:
        self._tree = tree
        self._path = path

    def __contains__(self, ino: object) -> bool:
        return isinstance(ino, int) and self._tree.path_of(ino) not in (None, self._path)
