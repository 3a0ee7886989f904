"""A zip archive's table of contents, from its central directory alone.

:func:`read_index` does the reading through a callable it is given; the rest is parsing:
:func:`locate` finds the directory from the archive's tail (:func:`locate_zip64` from a
Zip64 end record), :func:`members` parses the directory. Zip64 end records and
extra fields, the extended-timestamp field and Info-ZIP's Unicode path field are read;
everything an archive says is checked before it is used (a hostile archive gives
:class:`BadArchive`, never an exception of another kind). Names are made safe to show as
paths: nothing leaves the archive's directory, nothing collides.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
import re
import struct
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import NamedTuple

import trio

from zohofs.errors import BadArchive

# The end record (22 bytes) may be followed by a comment of up to 64 KiB.
END_SEARCH = 22 + 0xFFFF
_END = struct.Struct("<IHHHHIIH")
_END_SIG = 0x06054B50
_LOCATOR = struct.Struct("<IIQI")
_LOCATOR_SIG = 0x07064B50
_END64 = struct.Struct("<IQHHIIQQQQ")
_END64_SIG = 0x06064B50
_ENTRY = struct.Struct("<IHHHHHHIIIHHHHHII")
_ENTRY_SIG = 0x02014B50
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50

STORED, DEFLATED = 0, 8
_ENCRYPTED = 0x1
_UTF8 = 0x800
_UNIX = 3  # "version made by" high byte
# Beyond these an archive's index is refused: it alone would be the mount's memory (Zoho's
# 1 GB parts have directories of a few MiB).
MAX_MEMBERS = 500_000
MAX_DIRECTORY = 64 << 20
MAX_MEMBER_SIZE = 1 << 50  # a claim beyond this (a PiB) is a lie, and no st_size


@dataclasses.dataclass(frozen=True)
class Directory:
    """Where the central directory is, and how many entries it says it has."""

    offset: int
    size: int
    entries: int


class Member(NamedTuple):
    """A file in the archive (what :data:`Fields` holds, by name)."""

    path: str  # safe: relative, no "..", unique in its archive
    method: int
    compressed_size: int
    size: int
    crc: int
    header_offset: int  # of its local header
    mtime: float  # seconds since the epoch
    encrypted: bool
    mode: int = 0o444  # permission bits shown: the zip's read and execute bits


# A member as plain values, in Member's order: what a parse makes, by the half million.
# Python's collector stops following a plain tuple of plain values once it survived a
# collection, where it follows objects (even a named tuple) for as long as they live: with
# Member objects, each full collection during a parse held every request for up to 0.12 s.
Fields = tuple[str, int, int, int, int, int, float, bool, int]


def locate(tail: bytes, tail_offset: int, archive_size: int) -> Directory | int:
    """The central directory, from the last bytes of the archive (``tail`` starts at
    ``tail_offset``); or, for Zip64, the offset of the Zip64 end record still to read
    (then call :func:`locate_zip64` with bytes read from there)."""
    if tail_offset + len(tail) != archive_size:
        raise BadArchive("the archive's tail was cut short")
    # A comment may hold the signature too: the real record is the one whose comment ends
    # the file; failing that (bytes appended after the comment, which zip tools accept),
    # the last record with room for itself.
    signature = _END_SIG.to_bytes(4, "little")
    found = [at for at in _occurrences(tail, signature) if at + 22 <= len(tail)]
    exact = [at for at in found if at + 22 + _END.unpack_from(tail, at)[7] == len(tail)]
    if not found:
        raise BadArchive("no end of central directory record: not a zip archive, or cut "
                         "short")
    at = (exact or found)[-1]
    fields = _END.unpack_from(tail, at)
    _, disk, cd_disk, _, entries, size, offset, _ = fields
    if disk != 0 or cd_disk != 0:
        raise BadArchive("a multi-disk archive (each part of a Zoho backup is a whole zip)")
    if entries == 0xFFFF or 0xFFFFFFFF in (size, offset):
        locator = at - _LOCATOR.size
        if locator < 0 or _LOCATOR.unpack_from(tail, locator)[0] != _LOCATOR_SIG:
            raise BadArchive("Zip64 sizes without a Zip64 end locator")
        end64: int = _LOCATOR.unpack_from(tail, locator)[2]
        if not 0 <= end64 <= archive_size - _END64.size:
            raise BadArchive("the Zip64 end record is outside the archive")
        return end64
    return _checked(Directory(offset, size, entries), tail_offset + at)


def _occurrences(data: bytes, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def locate_zip64(record: bytes, record_offset: int) -> Directory:
    """The central directory, from the Zip64 end record's bytes (at ``record_offset``)."""
    if len(record) < _END64.size or _END64.unpack_from(record)[0] != _END64_SIG:
        raise BadArchive("no Zip64 end of central directory record where its locator points")
    _, _, _, _, disk, cd_disk, _, entries, size, offset = _END64.unpack_from(record)
    if disk != 0 or cd_disk != 0:
        raise BadArchive("a multi-disk archive (each part of a Zoho backup is a whole zip)")
    return _checked(Directory(offset, size, entries), record_offset)


def _checked(directory: Directory, end: int) -> Directory:
    if directory.offset + directory.size > end:
        raise BadArchive(f"the end record describes an impossible central directory "
                         f"({directory.entries} entries, {directory.size} bytes at "
                         f"{directory.offset})")
    if directory.entries > MAX_MEMBERS or directory.size > MAX_DIRECTORY:
        raise BadArchive(f"a central directory of {directory.entries} entries and "
                         f"{directory.size} bytes is more than zohofs lists "
                         f"({MAX_MEMBERS} entries, {MAX_DIRECTORY >> 20} MiB)")
    if directory.size < directory.entries * _ENTRY.size:
        raise BadArchive("the central directory is too small for its entries")
    return directory


def members(data: bytes, directory: Directory, archive_size: int) -> tuple[list[Fields],
                                                                          list[str]]:
    """The members the central directory ``data`` lists, and a line for each name that
    had to be changed to be safe."""
    found: list[Fields] = []
    taken = _Names()
    dirs: set[str] = set()
    notes = _Notes()
    at = 0
    for _ in range(directory.entries):
        if at + _ENTRY.size > len(data):
            raise BadArchive("the central directory ends inside an entry")
        (sig, made_by, _, flags, method, dos_time, dos_date, crc, csize, usize, name_len,
         extra_len, comment_len, _, _, external, offset) = _ENTRY.unpack_from(data, at)
        if sig != _ENTRY_SIG:
            raise BadArchive(f"bad central directory entry at byte {directory.offset + at}")
        raw = data[at + _ENTRY.size:at + _ENTRY.size + name_len]
        extra = data[at + _ENTRY.size + name_len:at + _ENTRY.size + name_len + extra_len]
        at += _ENTRY.size + name_len + extra_len + comment_len
        if at > len(data):
            raise BadArchive("the central directory ends inside an entry")
        usize, csize, offset, mtime, unicode_name = _extra_fields(
            extra, usize, csize, offset, raw)
        if offset + LOCAL_HEADER.size > directory.offset or offset + csize > archive_size:
            raise BadArchive(f"an entry points outside the archive ({_show(raw)})")
        name = unicode_name or (raw.decode("utf-8", "replace") if flags & _UTF8
                                else raw.decode("cp437"))
        if mtime is None:
            mtime = _dos_time(dos_date, dos_time)
        path, is_dir = _safe_path(name)
        if path is None:
            notes.add("entries skipped (no usable name)", _show(raw))
            continue
        if usize > MAX_MEMBER_SIZE:
            notes.add("entries skipped (an impossible size)", f"{name!r} claims {usize} bytes")
            continue
        unique = taken.unique(path, dirs if not is_dir else set())
        if unique != path or path != name.rstrip("/"):
            notes.add("entries shown under another name (unsafe, or taken twice)",
                      f"{name!r} shown as {unique!r}")
        if is_dir:
            dirs.add(unique)
            continue
        taken.add(unique)
        found.append((unique, method, csize, usize, crc, offset, mtime,
                      bool(flags & _ENCRYPTED), _mode(made_by, external)))
    # A file and a directory of the same name: the directory (which holds files) wins.
    parents = {m[0].rpartition("/")[0] for m in found}  # safe paths: one "/" between parts
    all_dirs = {p for d in parents | dirs for p in _ancestors(d)}
    for i, m in enumerate(found):
        if m[0] in all_dirs:
            renamed = taken.unique(m[0], all_dirs)
            taken.add(renamed)
            notes.add("files shown under another name (a directory has theirs)",
                      f"{m[0]!r} shown as {renamed!r}")
            found[i] = (renamed, *m[1:])
    return found, notes.lines()


def _ancestors(path: str) -> list[str]:
    out = []
    while path:
        out.append(path)
        path = posixpath.dirname(path)
    return out


def _extra_fields(extra: bytes, usize: int, csize: int, offset: int, raw_name: bytes,
                  ) -> tuple[int, int, int, float | None, str | None]:
    mtime: float | None = None
    unicode_name: str | None = None
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4:at + 4 + length]
        at += 4 + length
        if len(body) < length:
            break  # a cut-short field: ignore what is left, as zip tools do
        if kind == 0x0001:  # Zip64: the 8-byte values of the fields saturated above
            values = iter(struct.unpack_from(f"<{len(body) // 8}Q", body))
            try:
                if usize == 0xFFFFFFFF:
                    usize = next(values)
                if csize == 0xFFFFFFFF:
                    csize = next(values)
                if offset == 0xFFFFFFFF:
                    offset = next(values)
            except StopIteration:
                raise BadArchive(f"a Zip64 field too short ({_show(raw_name)})") from None
        elif kind == 0x5455 and length >= 5 and body[0] & 1:  # extended timestamp
            mtime = float(struct.unpack_from("<i", body, 1)[0])
        elif (kind == 0x7075 and length >= 5 and body[0] == 1  # Info-ZIP Unicode path
              and struct.unpack_from("<I", body, 1)[0] == zlib.crc32(raw_name)):
            unicode_name = body[5:].decode("utf-8", "replace")
    return usize, csize, offset, mtime, unicode_name


def _mode(made_by: int, external: int) -> int:
    """The zip's Unix permission bits (when a Unix tool made it), read and execute only:
    the mount is read-only. Anything else, or a mode that no one could read, is 0444."""
    if made_by >> 8 == _UNIX:
        mode = (external >> 16) & 0o555
        if mode & 0o444:
            return mode
    return 0o444


@functools.lru_cache(maxsize=4096)  # an archive's members share their times often
def _dos_time(date: int, time: int) -> float:
    try:
        return datetime(1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F, time >> 11,
                        (time >> 5) & 0x3F, min(59, (time & 0x1F) * 2)).timestamp()
    except ValueError:  # a zero or impossible date: the epoch of the format
        return datetime(1980, 1, 1).timestamp()


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
MAX_DEPTH = 64  # folders in a member's path; a deeper one is skipped


# A name with nothing to change: no control character, backslash, or empty, "." or ".."
# component (those begin the name or follow a "/"), and short enough.
_PLAIN = re.compile(r"[^/\\\x00-\x1f\x7f]+(?:/[^/\\\x00-\x1f\x7f]+)*/?")


def _safe_path(name: str) -> tuple[str | None, bool]:
    """A relative path of safe components (None if nothing is left), and whether the entry
    is a directory."""
    is_dir = name.endswith(("/", "\\"))
    if (name.isascii() and len(name) <= 240 and not name.startswith(".")
            and "/." not in name and name.count("/") < MAX_DEPTH and _PLAIN.fullmatch(name)):
        return name.rstrip("/"), is_dir  # nearly every name, as _cleaned_path makes it
    return _cleaned_path(name), is_dir


def _cleaned_path(name: str) -> str | None:
    parts = []
    for part in re.split(r"[/\\]+", name):
        part = _UNSAFE.sub("_", part)
        if part in ("", "."):
            continue
        # ".." kept visible but going nowhere; a name at most 255 bytes (" (2)" may follow).
        parts.append("__" if part == ".." else part.encode()[:240].decode("utf-8", "ignore"))
    return None if len(parts) > MAX_DEPTH else "/".join(parts) or None


class _Names:
    """The names taken so far, and for each name asked for twice, the next suffix to try:
    a name taken 50 000 times costs 50 000 steps, not 50 000 squared."""

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._next: dict[str, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._taken

    def add(self, name: str) -> None:
        self._taken.add(name)

    def unique(self, path: str, also: set[str]) -> str:
        if path not in self._taken and path not in also:
            return path
        stem, dot, ext = path.rpartition(".")
        if not dot or "/" in ext:
            stem, dot, ext = path, "", ""
        n = self._next.get(path, 2)
        while True:
            candidate = f"{stem} ({n}){dot}{ext}"
            n += 1
            if candidate not in self._taken and candidate not in also:
                self._next[path] = n
                return candidate


class _Notes:
    """What had to be changed, one line per kind with a count and a few examples: an
    archive of 50 000 clashing names gives three lines, not 50 000."""

    EXAMPLES = 3

    def __init__(self) -> None:
        self._kinds: dict[str, list[str]] = {}
        self._counts: dict[str, int] = {}

    def add(self, kind: str, example: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        examples = self._kinds.setdefault(kind, [])
        if len(examples) < self.EXAMPLES:
            examples.append(example)

    def lines(self) -> list[str]:
        return [f"{self._counts[kind]} {kind}: {'; '.join(examples)}"
                + ("; …" if self._counts[kind] > len(examples) else "")
                for kind, examples in self._kinds.items()]


def _show(raw: bytes) -> str:
    return repr(raw[:80].decode("utf-8", "replace"))


class HeaderMismatch(BadArchive):
    """A member's local header disagrees with the central directory: the archive is
    damaged, or it changed on the server since its directory was read."""


_DATA_DESCRIPTOR = 0x8


def data_offset(header: bytes, member: Member) -> int:
    """Where a member's bytes start, from its local header (at ``member.header_offset``),
    once the header is shown to describe the same member as the central directory: the
    same compression, and (unless they follow the data, in a data descriptor) the same
    CRC-32 and sizes. Reading past a member the directory makes longer than its header
    would hand over the next member's bytes."""
    if len(header) < LOCAL_HEADER.size or LOCAL_HEADER.unpack_from(header)[0] != _LOCAL_SIG:
        raise HeaderMismatch(f"{member.path}: no local header where the central directory "
                             "points")
    fields: tuple[int, ...] = LOCAL_HEADER.unpack_from(header)
    _, _, flags, method, _, _, crc, csize, usize, name_length, extra_length = fields
    said = [("method", method, member.method)]
    if not flags & _DATA_DESCRIPTOR:
        said.append(("CRC-32", crc, member.crc))
        # 0xFFFFFFFF: the size is in a Zip64 field, as the directory's own is.
        if csize != 0xFFFFFFFF:
            said.append(("compressed size", csize, member.compressed_size))
        if usize != 0xFFFFFFFF:
            said.append(("size", usize, member.size))
    for what, local, central in said:
        if local != central:
            raise HeaderMismatch(f"{member.path}: its local header says {what} {local}, the "
                                 f"central directory {central}")
    return member.header_offset + LOCAL_HEADER.size + name_length + extra_length


async def read_index(read: Callable[[int, int], Awaitable[bytes]], size: int,
                     ) -> tuple[list[Fields], list[str]]:
    """The members of an archive of ``size`` bytes whose bytes ``read(offset, length)``
    gives: the tail, the Zip64 end record if there is one (usually in the tail already),
    then the central directory (partly in the tail already for small archives)."""
    start = max(0, size - END_SEARCH)
    tail = await read(start, size - start)
    start = size - len(tail)  # a reader may give only the end of it (the cache's)
    found = locate(tail, start, size)
    if isinstance(found, int):
        record = (tail[found - start:found - start + _END64.size] if found >= start
                  else await read(found, _END64.size))
        found = locate_zip64(record, found)
    if found.offset >= start:
        data = tail[found.offset - start:found.offset - start + found.size]
    else:
        data = await read(found.offset, found.size)
    # Parsing and naming 500 000 entries takes a second or two: in a worker thread, so
    # that the mount goes on answering everyone else meanwhile.
    return await trio.to_thread.run_sync(members, data, found, size)
