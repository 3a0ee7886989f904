"""Real mounts: what each way of reading costs in GETs and bytes fetched."""

from __future__ import annotations

import io
import os
import random
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from tests.conftest import MiB, MountFactory
from tests.helpers import data_gets, fetched, fetched_once, spans
from tests.test_mount import JOB
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import Emulator


def add(emulator: Emulator, backup: Backup, name: str, data: bytes) -> Path:
    emulator.add_file(backup.zgid, backup.job_id, name, data)
    return Path(JOB) / name


@pytest.mark.parametrize("how", ["buffered", "pread"])
def test_random_reads_fetch_about_what_they_read(
        mount: MountFactory, emulator: Emulator, backup: Backup, how: str) -> None:
    data = random.Random(5).randbytes(64 * MiB)
    rel = add(emulator, backup, "Data_002.zip", data)
    m = mount("--block-size", "8M")
    rng = random.Random(6)
    offsets = [rng.randrange(len(data) - 131072) for _ in range(100)]
    with open(m.path / rel, "rb", buffering=-1 if how == "buffered" else 0) as f:
        for offset in offsets:
            if how == "buffered":
                f.seek(offset)
                got = f.read(131072)
            else:
                got = os.pread(f.fileno(), 131072, offset)
            assert got == data[offset:offset + 131072], offset
    ranges = data_gets(emulator, "Data_002.zip")
    # Python's buffered reader reads st_blksize (1 MiB) after each seek: that, not 8 MiB
    # blocks and a readahead window, is what it costs.
    assert len(ranges) <= 110, ranges
    assert fetched(ranges) <= 100 * (1.2 * MiB if how == "buffered" else 0.4 * MiB)


def test_many_sequential_readers_fetch_each_byte_once(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    # Sixteen copies at once through a cache of 32 MiB: the prefetch budget is 16 MiB, so
    # each reader's share is a single MiB, and nothing fetched ahead may be evicted unread.
    files = {f"Attachments_{i:03}.zip": random.Random(i).randbytes(8 * MiB + i * 4321)
             for i in range(10, 26)}
    for name, data in files.items():
        add(emulator, backup, name, data)
    m = mount("--cache-size", "32")
    barrier = threading.Barrier(len(files))
    copies: dict[str, bytes] = {}

    def copy(name: str) -> None:
        barrier.wait()
        result = subprocess.run(["cat", str(m.path / JOB / name)], capture_output=True,
                                check=True)
        copies[name] = result.stdout

    threads = [threading.Thread(target=copy, args=(n,)) for n in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert copies == files
    for name, data in files.items():
        assert fetched_once(data_gets(emulator, name), len(data)), name


def test_unzip_lists_and_extracts_one_member_for_little(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    rng = random.Random(8)
    csv = b"".join(b"%d,Lead %d,%s\n" % (i, i, rng.randbytes(20).hex().encode())
                   for i in range(40000))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("Attachments/big_1.bin", rng.randbytes(40 * MiB))
        z.writestr("Data/Leads_001.csv", csv, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("Attachments/big_2.bin", rng.randbytes(20 * MiB))
        compressed = z.getinfo("Data/Leads_001.csv").compress_size
    rel = add(emulator, backup, "Data_003.zip", buffer.getvalue())
    m = mount()
    listing = subprocess.run(["unzip", "-l", str(m.path / rel)], capture_output=True,
                             text=True, check=True)
    assert "Data/Leads_001.csv" in listing.stdout
    assert len(data_gets(emulator, "Data_003.zip")) <= 3
    before = len(data_gets(emulator, "Data_003.zip"))
    member = subprocess.run(["unzip", "-p", str(m.path / rel), "Data/Leads_001.csv"],
                            capture_output=True, check=True)
    assert member.stdout == csv
    ranges = data_gets(emulator, "Data_003.zip")[before:]
    assert fetched(ranges) <= compressed + 2 * MiB, (compressed, ranges)


def stored_zip(seed: int, sizes: list[int]) -> tuple[bytes, dict[str, zipfile.ZipInfo]]:
    """A zip of stored members ``Attachments/0.bin``… of these sizes, and where each is."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i, size in enumerate(sizes):
            z.writestr(f"Attachments/{i}.bin", rng.randbytes(size))
        infos = {info.filename: info for info in z.infolist()}
    return buffer.getvalue(), infos


def test_an_archive_tool_extracting_one_member_fetches_little_past_it(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    # A stored member of 16 MiB amid others: a reader's window grows to 32 MiB with the
    # default blocks, and ran on past the member (28 MB fetched past it before).
    archive, infos = stored_zip(9, [16 * MiB] * 4)
    rel = add(emulator, backup, "Data_003.zip", archive)
    m = mount("--block-size", "8M")
    subprocess.run(["unzip", "-l", str(m.path / rel)], stdout=subprocess.DEVNULL, check=True)
    before = len(data_gets(emulator, "Data_003.zip"))
    member = subprocess.run(["unzip", "-p", str(m.path / rel), "Attachments/1.bin"],
                            capture_output=True, check=True)
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        assert member.stdout == z.read("Attachments/1.bin")
    ranges = data_gets(emulator, "Data_003.zip")[before:]
    assert fetched(ranges) <= infos["Attachments/1.bin"].compress_size + 4 * MiB, spans(ranges)


def test_readers_that_share_a_file_out_fetch_each_byte_once(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    # Eight dd readers of an eighth each, through a cache too small to keep what each
    # read: each reader's window ran on into the next one's eighth (1.13x fetched before).
    data = random.Random(10).randbytes(128 * MiB)
    rel = add(emulator, backup, "Attachments_009.zip", data)
    m = mount("--block-size", "8M", "--cache-size", "32")
    os.stat(m.path / rel)
    readers = [subprocess.Popen(["dd", f"if={m.path / rel}", "bs=1M", f"skip={i * 16}",
                                 "count=16", "status=none"], stdout=subprocess.PIPE)
               for i in range(8)]
    for i, reader in enumerate(readers):
        out, _ = reader.communicate(timeout=120)
        assert out == data[i * 16 * MiB:(i + 1) * 16 * MiB], i
    assert fetched(data_gets(emulator, "Attachments_009.zip")) <= 1.05 * len(data)


def test_a_copy_of_part_of_a_zip_is_fetched_ahead_of_as_any(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    # A parallel or resumed copy reads from the middle of a zip whose central directory
    # the cache holds: it extracts no member, and its window must not stop at each of
    # the small members it crosses (a GET per chunk then).
    archive, infos = stored_zip(11, [100_000 + i for i in range(400)])
    start = infos["Attachments/100.bin"].header_offset + 1000  # past its header: no extraction
    rel = add(emulator, backup, "Data_003.zip", archive)
    m = mount("--block-size", "8M")
    subprocess.run(["unzip", "-l", str(m.path / rel)], stdout=subprocess.DEVNULL, check=True)
    before = len(data_gets(emulator, "Data_003.zip"))
    with open(m.path / rel, "rb", buffering=0) as f:
        f.seek(start)
        got = b"".join(iter(lambda: f.read(MiB), b""))
    assert got == archive[start:]
    gets = data_gets(emulator, "Data_003.zip")[before:]
    # Measured: 32 GETs when the window stopped near each member's end, 13 with it whole.
    assert len(gets) <= 20, len(gets)
