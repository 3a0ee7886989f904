"""Crafted archives against an --expand mount: a member's bytes are the zip's bytes for
that member or an errno, whatever the order of reads, the cache size or the cache mode;
a member known damaged gives EIO on every later read."""

from __future__ import annotations

import errno
import io
import os
import random
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MiB, MountFactory
from tests.helpers import Mount, peak_rss_mib
from zohofs.cache import ChunkCache
from zohofs.emulator.backup import Backup, corrupt_member
from zohofs.emulator.server import Emulator
from zohofs.errors import BadArchive
from zohofs.zipindex import Member, data_offset
from zohofs.zipread import (
    CHECKPOINT_COST,
    Checkpoints,
    StoredReader,
    crc32_combine,
    member_reader,
)

JOB = "757345985/4876876000001594004"


def zip_of(*members: tuple[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return out.getvalue()


def serve(emulator: Emulator, backup: Backup, name: str, data: bytes,
          validators: bool = True) -> str:
    return emulator.add_file(backup.zgid, backup.job_id, name, data, validators=validators)


def read_errno(path: Path, offset: int = 0, size: int = -1) -> bytes | int:
    """The bytes at ``offset`` (to the end with size -1), or the errno of the failure."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if size < 0:
                size = os.fstat(fd).st_size - offset
            data = b""
            while len(data) < size:
                piece = os.pread(fd, size - len(data), offset + len(data))
                if not piece:
                    break
                data += piece
            return data
        finally:
            os.close(fd)
    except OSError as exc:
        return exc.errno or -1


@pytest.mark.parametrize("page_cache", [False, True])
def test_a_zip_replaced_by_one_of_the_same_size_without_validators_never_mixes(
        mount: MountFactory, emulator: Emulator, backup: Backup, page_cache: bool) -> None:
    before = zip_of(("a.txt", b"A" * 5000), ("b.txt", b"B" * 5000))
    after = zip_of(("b.txt", b"B" * 5000), ("a.txt", b"C" * 5000))  # swapped, a changed
    assert len(before) == len(after)
    link = serve(emulator, backup, "Data_009.zip", before, validators=False)
    m = mount("--expand", *(["--page-cache"] if page_cache else []), links=[link])
    m.expect_log("the server sends neither ETag nor Last-Modified")
    m.expect_log("its local header says")
    member = m.path / JOB / "Data_009" / "a.txt"
    assert member.read_bytes() == b"A" * 5000
    emulator.replace(link, after)
    for offset, size in ((0, 100), (4096, 904), (0, -1)):
        got = read_errno(member, offset, size)
        # The new zip's a.txt (its index read again), never its b.txt or a mix.
        assert got == (b"C" * 5000)[offset:offset + size if size >= 0 else None], got
    assert (m.path / JOB / "Data_009" / "b.txt").read_bytes() == b"B" * 5000


def damaged_zip(name: str, size: int, method: int) -> bytes:
    data = random.Random(3).randbytes(size // 2) * 2  # compresses a little
    return corrupt_member(zip_of((name, data), method=method), name)


@pytest.mark.parametrize("page_cache", [False, True])
def test_a_deflated_member_known_damaged_fails_every_later_read(
        mount: MountFactory, emulator: Emulator, backup: Backup, page_cache: bool) -> None:
    link = serve(emulator, backup, "Data_009.zip",
                 damaged_zip("Data/Leads_001.csv", 2 * MiB, zipfile.ZIP_DEFLATED))
    m = mount("--expand", *(["--page-cache"] if page_cache else []), links=[link])
    m.expect_log(r"Leads_001\.csv: (CRC-32 mismatch|cannot inflate)")
    member = m.path / JOB / "Data_009" / "Data" / "Leads_001.csv"
    assert read_errno(member) == errno.EIO
    for offset, size in ((MiB, 4096), (MiB - 4096, 128 * 1024), (0, 4096), (0, -1)):
        assert read_errno(member, offset, size) == errno.EIO, (offset, size)


@pytest.mark.parametrize("cache", ["16", "256"])
def test_a_stored_member_read_second_half_first_is_still_checked(
        mount: MountFactory, emulator: Emulator, backup: Backup, cache: str) -> None:
    size = 40 * MiB
    link = serve(emulator, backup, "Attachments_009.zip",
                 damaged_zip("Attachments/big.bin", size, zipfile.ZIP_STORED))
    m = mount("--expand", "--cache-size", cache, links=[link])
    m.expect_log(r"big\.bin: CRC-32 mismatch")
    member = m.path / JOB / "Attachments_009" / "Attachments" / "big.bin"
    second = read_errno(member, size // 2, size // 2)
    first = read_errno(member, 0, size // 2)
    # The damaged byte is the first of the second half: once both halves have passed,
    # the member is known damaged, whichever read found out.
    assert errno.EIO in (first, second), (type(first), type(second))
    for offset in (0, size // 2, size - 4096):
        assert read_errno(member, offset, 4096) == errno.EIO


def test_a_central_directory_that_makes_a_member_longer_than_its_header_is_eio(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    small, big = b"s" * MiB, random.Random(4).randbytes(10 * MiB)
    archive = bytearray(zip_of(("small.bin", small), ("big.bin", big)))
    with zipfile.ZipFile(io.BytesIO(bytes(archive))) as zf:
        cd_offset = zf.start_dir
    # The first central entry (small.bin) claims 10 MiB, compressed and not.
    struct.pack_into("<II", archive, cd_offset + 20, 10 * MiB, 10 * MiB)
    link = serve(emulator, backup, "Attachments_009.zip", bytes(archive))
    m: Mount = mount("--expand", links=[link])
    m.expect_log("its local header says compressed size 1048576, the central directory "
                 "10485760")
    member = m.path / JOB / "Attachments_009" / "small.bin"
    assert member.stat().st_size == 10 * MiB  # what the directory says
    for offset in (0, 5 * MiB):
        assert read_errno(member, offset, 4096) == errno.EIO
    assert (m.path / JOB / "Attachments_009" / "big.bin").read_bytes() == big


# -- the CRC-32 of a stored member, whatever the order of reads ------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), damaged=st.booleans(),
       reads=st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 900),
                                st.integers(1, 700)), min_size=1, max_size=40))
def test_a_stored_members_crc_is_checked_once_every_byte_passed_in_any_order(
        data: bytes, damaged: bool, reads: list[tuple[int, int, int]]) -> None:
    served = bytearray(data)
    if damaged:
        served[len(data) // 2] ^= 1
    reader = StoredReader("m", Member("m", 0, len(data), len(data), zlib.crc32(data), 0,
                                      0.0, False), 0)

    class Source:
        def __init__(self, piece: int) -> None:
            self.piece = piece  # the archive's chunks cut the bytes anywhere

        async def read(self, offset: int, size: int) -> list[memoryview]:
            view = memoryview(bytes(served))
            return [view[at:min(at + self.piece, offset + size)]
                    for at in range(offset, offset + size, self.piece)]

    seen: set[int] = set()

    async def read_all() -> bool:
        for offset, size, piece in [*reads, *((at, 900, 500) for at in range(0, 3000, 900))]:
            offset %= len(data)
            try:
                got = await reader.read(Source(piece), offset, size)
            except BadArchive:
                return True
            assert b"".join(got) == bytes(served[offset:offset + size])
            seen.update(range(offset, min(offset + size, len(data))))
        return False

    failed = trio.run(read_all)
    assert failed == damaged  # every byte passed in the end: the damage is always found
    if failed:
        assert len(seen) < len(data)  # and never before the last unseen byte arrived


def test_crc32_combine_is_zlibs() -> None:
    first, second = random.Random(1).randbytes(1000), random.Random(2).randbytes(70_000)
    assert crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second)) == (
        zlib.crc32(first + second))
    assert crc32_combine(zlib.crc32(first), 0, 0) == zlib.crc32(first)


# -- memory ------------------------------------------------------------------------------

def deflated_zeros(name: str, size: int) -> bytes:
    """A zip bomb: ``size`` bytes of zeros deflated to about a thousandth of that."""
    block, compressor, crc = bytes(MiB), zlib.compressobj(1, zlib.DEFLATED, -15), 0
    body = io.BytesIO()
    for _ in range(size // MiB):
        body.write(compressor.compress(block))
        crc = zlib.crc32(block, crc)
    body.write(compressor.flush())
    compressed, raw = body.getvalue(), name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(compressed),
                        size, len(raw), 0) + raw
    entry = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc,
                        len(compressed), size, len(raw), 0, 0, 0, 0, 0, 0) + raw
    start = len(local) + len(compressed)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(entry), start, 0)
    return local + compressed + entry + end


def test_inflating_a_1_gib_zip_bomb_stays_within_the_cache_and_100_mib(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    size = 1 << 30
    link = serve(emulator, backup, "Data_009.zip", deflated_zeros("Data/Notes_001.csv", size))
    m = mount("--expand", "--cache-size", "32", links=[link])
    member = m.path / JOB / "Data_009" / "Data" / "Notes_001.csv"
    total = 0
    with open(member, "rb", buffering=0) as f:
        while chunk := f.read(4 * MiB):
            assert not any(chunk)
            total += len(chunk)
    assert total == size
    for offset in (size - 4096, size // 3, 12345):  # back again: checkpoints, or a restart
        assert read_errno(member, offset, 4096) == bytes(4096)
    assert peak_rss_mib(m.proc.pid) < 32 + 100, peak_rss_mib(m.proc.pid)


def member_of(info: zipfile.ZipInfo) -> Member:
    return Member(info.filename, info.compress_type, info.compress_size, info.file_size,
                  info.CRC, info.header_offset, 0.0, False)


def test_inflation_checkpoints_of_many_members_share_one_budget() -> None:
    text = b"".join(b"%08d,Acme,contract\n" % n for n in range(400_000))  # ~8 MB
    archive = zip_of(*((f"Data/part{n}.csv", text) for n in range(6)),
                     method=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        infos = zf.infolist()
    budget = Checkpoints(6 * CHECKPOINT_COST)
    cache = ChunkCache(4 * MiB)

    class Source:
        async def read(self, offset: int, size: int) -> list[memoryview]:
            return [memoryview(archive)[offset:offset + size]]

    async def read_all() -> None:
        readers = [member_reader(i.filename, member_of(i), data_offset(
            archive[i.header_offset:i.header_offset + 30], member_of(i)), len(archive),
            cache, ("k", i.filename), budget) for i in infos]
        for reader in readers:  # to the end: a checkpoint every 4 MiB of each
            await reader.read(Source(), len(text) - 10, 10)
            assert 0 < budget.size <= 6 * CHECKPOINT_COST
        rng = random.Random(5)
        for _ in range(40):  # seeks after evictions still give the right bytes
            reader, at = rng.choice(readers), rng.randrange(len(text) - 100)
            assert b"".join(await reader.read(Source(), at, 100)) == text[at:at + 100]

    trio.run(read_all)


def test_a_member_known_damaged_stays_so_after_its_reader_left_the_cache(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    """Readers are kept for a few members only; the verdict on a damaged one is kept
    for good (its inflated chunks may well still be cached)."""
    text = b"".join(b"%08d,Acme,contract\n" % n for n in range(50_000))
    archive = zip_of(("Data/Bad_001.csv", text),
                     *((f"Data/Good_{n:03}.csv", text[:1000]) for n in range(6)),
                     method=zipfile.ZIP_DEFLATED)
    link = serve(emulator, backup, "Data_009.zip",
                 corrupt_member(archive, "Data/Bad_001.csv"))
    m = mount("--expand", links=[link])
    m.expect_log(r"Bad_001\.csv: (CRC-32 mismatch|cannot inflate)")
    folder = m.path / JOB / "Data_009" / "Data"
    assert read_errno(folder / "Bad_001.csv") == errno.EIO
    for n in range(6):  # more members than readers are kept
        assert read_errno(folder / f"Good_{n:03}.csv") == text[:1000]
    assert read_errno(folder / "Bad_001.csv", 0, 4096) == errno.EIO
