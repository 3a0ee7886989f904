"""The zip index and member readers without a mount: every member as Python's zipfile
reads it, Zip64, names, hostile archives; inflation from checkpoints."""

from __future__ import annotations

import gc
import io
import random
import struct
import zipfile

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import many_members, zip64_by_hand
from zohofs import contents as contents_module
from zohofs import zipindex
from zohofs.cache import ChunkCache
from zohofs.contents import Contents
from zohofs.emulator.backup import corrupt_member, generate
from zohofs.errors import BadArchive
from zohofs.planner import CHUNK, MiB
from zohofs.zipindex import Member, data_offset, read_index
from zohofs.zipread import CHECKPOINT_EVERY, Checkpoints, DeflatedReader, member_reader


def index(archive: bytes) -> tuple[list[Member], list[str]]:
    async def read(offset: int, size: int) -> bytes:
        return archive[offset:offset + size]

    found, notes = trio.run(read_index, read, len(archive))
    return [Member(*f) for f in found], notes


class Source:
    """An archive in memory, read the way the filesystem serves it."""

    def __init__(self, archive: bytes) -> None:
        self.archive = archive
        self.read_bytes = 0

    async def read(self, offset: int, size: int) -> list[memoryview]:
        self.read_bytes += size
        return [memoryview(self.archive)[offset:offset + size]]


async def read_member(archive: bytes, m: Member, source: Source | None = None,
                      cache: ChunkCache | None = None) -> bytes:
    reader = member_reader(m.path, m,
                           data_offset(archive[m.header_offset:m.header_offset + 30], m),
                           len(archive), cache or ChunkCache(64 * MiB), ("t", m.path),
                           Checkpoints(8 * MiB))
    source = source or Source(archive)
    out = b""
    while len(out) < m.size:
        out += b"".join(bytes(p) for p in await reader.read(source, len(out), 1 << 20))
    return out


def test_every_member_of_a_generated_backup_reads_as_zipfile_reads_it() -> None:
    backup = generate(seed=5, size=4 * MiB, rows=3000, many=70_000)
    for name, archive in backup.files.items():
        found, notes = index(archive)
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            assert [m.path for m in found] == zf.namelist(), name
            assert notes == []
            for m in found[:50]:
                assert trio.run(read_member, archive, m) == zf.read(m.path)
                info = zf.getinfo(m.path)
                assert (m.size, m.crc) == (info.file_size, info.CRC)
    # The part with many members has Zip64 end records; non-ASCII names are decoded.
    assert len(index(backup.files["Attachments_002.zip"])[0]) == 70_000
    assert any(not m.path.isascii() for m in index(backup.files["Attachments_001.zip"])[0])


def test_cp437_names_and_extended_timestamps() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        info = zipfile.ZipInfo("Bj\u00f6rn.txt", (2026, 11, 21, 3, 15, 0))
        # The extended timestamp field: flags 1, then the modification time.
        info.extra = struct.pack("<HHBi", 0x5455, 5, 1, 1_800_000_000)
        zf.writestr(info, b"hello")
    archive = bytearray(out.getvalue())
    cd = archive.rfind(b"PK\x01\x02")
    flags = struct.unpack_from("<H", archive, cd + 8)[0]
    struct.pack_into("<H", archive, cd + 8, flags & ~0x800)  # no UTF-8 flag: cp437
    [m], _ = index(bytes(archive))
    with zipfile.ZipFile(io.BytesIO(bytes(archive))) as zf:
        assert m.path == zf.namelist()[0] == "Bj\u251c\u2562rn.txt"
    assert m.mtime == 1_800_000_000


@pytest.mark.parametrize(("comment", "after"), [
    (b"a comment", b""), (b"a comment", b"\0" * 100),  # as zipfile takes them
    (b"a comment holding PK\x05\x06 the signature", b""),  # where zipfile gives up
])
def test_comments_and_bytes_after_the_end_record(comment: bytes, after: bytes) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("a.txt", b"a")
        zf.comment = comment
    archive = out.getvalue() + after
    [m], _ = index(archive)
    assert m.path == "a.txt" and trio.run(read_member, archive, m) == b"a"


def test_a_member_claiming_an_impossible_size_is_skipped() -> None:
    archive = bytearray(zip64_by_hand(b"Attachments/big.bin", b"x" * 1000))
    extra = archive.index(struct.pack("<HHQ", 0x0001, 24, 1000))
    struct.pack_into("<Q", archive, extra + 4, (1 << 64) - 1)  # the uncompressed size
    found, notes = index(bytes(archive))
    assert found == [] and "claims" in notes[0]


def test_zip64_extra_fields() -> None:
    archive = zip64_by_hand(b"Attachments/big.bin", b"x" * 1000)
    [m], _ = index(archive)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert zf.read("Attachments/big.bin") == trio.run(read_member, archive, m)
    assert (m.size, m.compressed_size, m.header_offset) == (1000, 1000, 0)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_unsafe_and_colliding_names_are_made_safe() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name in ("../../etc/passwd", "/abs/path.txt", "a\\b.txt", "dup.txt", "dup.txt",
                     "x", "x/inner.txt", "tab\there.txt", "\u00e9" * 200 + ".csv",
                     "d/" * 100 + "deep.txt"):
            zf.writestr(name, name.encode())
    found, notes = index(out.getvalue())
    paths = [m.path for m in found]
    assert paths == ["__/__/etc/passwd", "abs/path.txt", "a/b.txt", "dup.txt",
                     "dup (2).txt", "x (2)", "x/inner.txt", "tab_here.txt", "\u00e9" * 120]
    # One line per kind of change, with a count and examples (not one line per entry).
    assert len(notes) == 3, notes
    assert notes[0].startswith("6 entries shown under another name") and "; …" in notes[0]
    assert notes[1].startswith("1 entries skipped (no usable name)")
    assert notes[2].startswith("1 files shown under another name (a directory has theirs)")
    assert all(len(part.encode()) <= 255 for p in paths for part in p.split("/"))
    assert all(".." not in p.split("/") and not p.startswith("/") for p in paths)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(st.sampled_from("ab./\\\t\u00e9"), max_size=80),
                 st.lists(st.text("ab.", min_size=1, max_size=300), max_size=70).map("/".join),
                 st.builds(lambda n, end: "a/" * n + end,  # about as deep as allowed
                           st.integers(60, 70), st.sampled_from(["", "b", "b/"]))))
def test_a_plain_name_is_taken_as_it_is_and_only_when_the_long_way_agrees(name: str) -> None:
    assert zipindex._safe_path(name)[0] == zipindex._cleaned_path(name)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400))
def test_hostile_archives_give_bad_archive_only(junk: bytes, cut: int) -> None:
    good = zip64_by_hand(b"a.txt", b"hello")
    for archive in (junk, good[:cut] + junk, junk + good[cut:], good[cut:]):
        try:
            found, _ = index(archive)
        except BadArchive:
            continue
        for m in found:
            assert 0 <= m.header_offset < len(archive)
            assert m.header_offset + m.compressed_size <= len(archive)


def test_a_backward_seek_inflates_from_the_nearest_checkpoint() -> None:
    rng = random.Random(3)
    text = b"".join(f"{rng.random()},{rng.choice(['renewal', 'quote'])}\r\n".encode()
                    for _ in range(800_000))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Data/Leads_001.csv", text)
    archive = out.getvalue()
    [m], _ = index(archive)
    cache = ChunkCache(256 * MiB)
    assert trio.run(read_member, archive, m, None, cache) == text

    async def seeks() -> None:
        source = Source(archive)
        reader = member_reader(m.path, m, data_offset(archive[m.header_offset:][:30], m),
                               len(archive), ChunkCache(4 * CHUNK), ("u", m.path),
                               Checkpoints(8 * MiB))
        assert isinstance(reader, DeflatedReader)
        await reader.read(source, len(text) - 10, 10)  # to the end once: checkpoints made
        for _ in range(30):
            offset = rng.randrange(len(text) - 5000)
            before = reader.inflated
            got = b"".join(bytes(p) for p in await reader.read(source, offset, 5000))
            assert got == text[offset:offset + 5000]
            assert reader.inflated - before <= CHECKPOINT_EVERY + 2 * CHUNK

    trio.run(seeks)


def test_a_flipped_byte_is_an_error_never_data() -> None:
    backup = generate(seed=6, size=2 * MiB, rows=2000)
    for name, member in (("Data_001.zip", "Data/Leads_001.csv"),
                         ("Attachments_001.zip", None)):
        archive = backup.files[name]
        found, _ = index(archive)
        m = next(m for m in found if m.path == (member or found[0].path))
        damaged = corrupt_member(archive, m.path)
        with pytest.raises(BadArchive, match="damaged"):
            trio.run(read_member, damaged, m)


_PATHS = st.lists(st.lists(st.sampled_from(["a", "b", "é", "a b", "z.txt", "0"]),
                           min_size=1, max_size=4).map("/".join), unique=True, max_size=40)


@given(_PATHS)
@settings(max_examples=200, deadline=None)
def test_contents_list_find_and_give_back_every_member(paths: list[str]) -> None:
    # As zipindex names them: no member's path is another's folder.
    folders = {p.rsplit("/", 1)[0] for p in paths if "/" in p}
    folders |= {f.rsplit("/", n)[0] for f in folders for n in range(1, f.count("/") + 1)}
    paths = [p for p in paths if p not in folders]
    members = [Member(p, 8, i, i * 3, i * 7, i * 11, 1.6e9 + i, False, 0o644)
               for i, p in enumerate(paths)]
    contents = Contents(members)
    for path in {"", *folders}:
        folder = contents.folder(path)
        assert folder is not None
        inside = {p[len(path) + 1 if path else 0:].split("/")[0]
                  for p in [*paths, *folders] if p.startswith(f"{path}/" if path else "")
                  and p != path}
        names = [contents.name(e) for e in folder.entries]
        assert names == sorted(inside)
        assert folder.subfolders == sum(e < 0 for e in folder.entries)
        for name in names:
            entry = contents.find(folder, name)
            assert entry is not None and contents.name(entry) == name
        assert contents.find(folder, "missing") is None
        under = [m.mtime for m in members if m.path.startswith(f"{path}/" if path else "")]
        assert folder.mtime == max(under, default=0.0)
    for m in members:
        parent = contents.folder(m.path.rpartition("/")[0])
        assert parent is not None
        entry = contents.find(parent, m.path.rpartition("/")[2])
        assert entry is not None and contents.member(entry) == m


def test_an_index_and_its_contents_leave_the_collector_nothing_per_member() -> None:
    # Each object Python's collector follows makes every full collection longer, and a
    # full collection holds every request of the mount: with an object per member, a
    # 500 000-member archive's index held them 0.12 s at a time.
    archive = many_members([f"d/{n:06d}.txt" for n in range(100_000)])
    gc.collect()
    followed = len(gc.get_objects())
    found, _ = trio.run(read_index, lambda offset, size: _bytes_at(archive, offset, size),
                        len(archive))
    contents = Contents(found)
    gc.collect()  # as the first young collection does: plain tuples are let go of
    assert contents.members == 100_000
    assert len(gc.get_objects()) - followed < 1000


async def _bytes_at(data: bytes, offset: int, size: int) -> bytes:
    return data[offset:offset + size]


def test_a_big_folder_is_sorted_a_step_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contents_module, "SORT_STEP", 7)
    rng = random.Random(4)
    names = list({rng.randbytes(6).hex() + rng.choice(["", ".txt", " é"]) for _ in range(1000)})
    # Some of them folders (their entries are ids of another kind), the rest members.
    paths = [f"d/{n}/x" if i % 5 == 0 else f"d/{n}" for i, n in enumerate(names)]
    contents = Contents([(p, 0, 1, 1, 0, i, 0.0, False, 0o444) for i, p in enumerate(paths)])
    folder = contents.folder("d")
    assert folder is not None
    assert [contents.name(e) for e in folder.entries] == sorted(names)
    assert sum(e < 0 for e in folder.entries) == folder.subfolders == 200
