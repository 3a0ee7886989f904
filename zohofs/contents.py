"""An expanded archive's members arranged as folders, kept compact.

The tree makes a node only for the entries someone looks up or lists, and frees it when
the kernel forgets it; between the two, what an archive holds lives here: a fixed-size
record and a name per member (about 80 bytes each, where a Member object with its numbers
and path costs 300, and a node 500 more). Built in a worker thread: sorting the names of
500 000 members is work the event loop must not do.
"""

from __future__ import annotations

import bisect
import heapq
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

from zohofs.zipindex import Fields, Member

# Names sorted in one call (see Contents._by_name).
SORT_STEP = 20_000
# compressed size, size, local header offset, mtime, CRC-32, method, mode, encrypted
_RECORD = struct.Struct("<QQQdIHH?")


@dataclass(eq=False, slots=True)
class Folder:
    """A folder of the archive: its entries sorted by name, as ids (member ``i`` as
    ``i``, folder ``j`` as ``~j``)."""

    path: str  # in the archive, without a trailing slash; "" for the top
    name: str
    parent: int  # its folder's number; -1 for the top
    entries: array[int] = field(default_factory=lambda: array("q"))
    subfolders: int = 0
    mtime: float = 0.0  # of the newest member under it


class Contents:
    """What one version of an archive holds, by folder."""

    def __init__(self, members: Iterable[Fields]) -> None:
        self._records = bytearray()
        self._names = bytearray()  # the members' own names (no folder), UTF-8, end to end
        self._starts = array("Q", [0])  # where each member's name starts in _names
        self._folders: list[Folder] = [Folder("", "", -1)]
        self._by_path: dict[str, int] = {"": 0}
        self._parent = array("q")  # of each member: its folder's number
        children: list[list[int]] = [[]]
        for i, (path, method, compressed_size, size, crc, header_offset, mtime, encrypted,
                mode) in enumerate(members):
            folder_path, _, name = path.rpartition("/")
            j = self._folder(folder_path, children)
            children[j].append(i)
            self._parent.append(j)
            self._records += _RECORD.pack(compressed_size, size, header_offset, mtime, crc,
                                          method, mode, encrypted)
            self._names += name.encode()
            self._starts.append(len(self._names))
            while j >= 0 and self._folders[j].mtime < mtime:  # the newest, upwards
                self._folders[j].mtime = mtime
                j = self._folders[j].parent
        for j, folder in enumerate(self._folders):
            folder.entries = array("q", self._by_name(children[j]))
        self.members = len(self._starts) - 1

    def _by_name(self, entries: list[int]) -> list[int]:
        """``entries`` sorted by name, a step at a time: one sort of half a million names
        is one call that holds Python's lock, and with it the event loop, for 0.15 s."""
        if len(entries) <= SORT_STEP:
            return sorted(entries, key=self.name)
        steps = [sorted(entries[i:i + SORT_STEP], key=self.name)
                 for i in range(0, len(entries), SORT_STEP)]
        return list(heapq.merge(*steps, key=self.name))

    def _folder(self, path: str, children: list[list[int]]) -> int:
        """The number of the folder at ``path``, made (with its parents) if new."""
        j = self._by_path.get(path)
        if j is not None:
            return j
        parent_path, _, name = path.rpartition("/")
        parent = self._folder(parent_path, children)
        j = self._by_path[path] = len(self._folders)
        self._folders.append(Folder(path, name, parent))
        children.append([])
        children[parent].append(~j)
        self._folders[parent].subfolders += 1
        return j

    def name(self, entry: int) -> str:
        if entry < 0:
            return self._folders[~entry].name
        return self._names[self._starts[entry]:self._starts[entry + 1]].decode()

    @property
    def top(self) -> Folder:
        return self._folders[0]

    def folder(self, path: str) -> Folder | None:
        j = self._by_path.get(path)
        return None if j is None else self._folders[j]

    def find(self, folder: Folder, name: str) -> int | None:
        """The entry ``name`` of ``folder``, by a binary search of its sorted names."""
        entries = folder.entries
        i = bisect.bisect_left(entries, name, key=self.name)
        return entries[i] if i < len(entries) and self.name(entries[i]) == name else None

    def member(self, entry: int) -> Member | None:
        """The member an entry is (made afresh: members are not kept as objects); None
        for a folder."""
        if entry < 0:
            return None
        (compressed_size, size, header_offset, mtime, crc, method, mode,
         encrypted) = _RECORD.unpack_from(self._records, entry * _RECORD.size)
        folder = self._folders[self._parent[entry]].path
        name = self.name(entry)
        return Member(f"{folder}/{name}" if folder else name, method, compressed_size, size,
                      crc, header_offset, mtime, encrypted, mode)

    def subfolder(self, entry: int) -> Folder:
        return self._folders[~entry]
