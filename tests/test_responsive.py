"""The mount stays responsive whatever one file or one archive does: a stuck download
does not hold another file's reads, a silent probe does not hold the mount's start, and
indexing a huge or hostile archive does not freeze the rest of the mount."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

from tests.conftest import MountFactory
from tests.helpers import Mount, data_gets, wait_for
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import Emulator

JOB = "757345985/4876876000001594004"
# Generous bounds: each case took 25 s to 250 s before the mount was made responsive.
ANSWERS_WITHIN = 5.0


def read_some(path: Path, offset: int = 0, size: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def slowest_answer_while(busy: threading.Thread, path: Path, data: bytes) -> float:
    """The longest a small read of ``path`` took while ``busy`` ran (at least one read)."""
    slowest, offset = 0.0, 0
    while True:
        started = time.monotonic()
        assert read_some(path, offset) == data[offset:offset + 4096]
        slowest = max(slowest, time.monotonic() - started)
        offset = (offset + 4096 * 97) % (len(data) - 4096)
        if not busy.is_alive():
            return slowest


def test_a_dripping_file_does_not_hold_another_files_reads(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    stuck, other = "Attachments_001.zip", "Data_001.zip"
    m = mount("--timeout", "60", "--read-timeout", "120")
    m.expect_log("no complete answer|read deadline|retrying")
    emulator.add_fault("drip", path=stuck, seconds=1.0, count=None)
    copy = subprocess.Popen(["cat", str(m.path / JOB / stuck)], stdout=subprocess.DEVNULL)
    try:
        # The copy's first read and the prefetches behind it take every connection slot.
        wait_for(lambda: len(data_gets(emulator, stuck)) >= 4, 20, "the stuck requests")
        started = time.monotonic()
        assert (m.path / JOB / other).read_bytes() == backup.files[other]
        assert time.monotonic() - started < ANSWERS_WITHIN
    finally:
        emulator.faults.clear()
        emulator.stopping.set()  # the dripping answers end: the copy can be stopped
        copy.kill()
        copy.wait()


def test_a_silent_probe_does_not_hold_the_mounts_start(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    emulator.add_fault("silent", path="Attachments_002.zip", count=None)
    started = time.monotonic()
    m = mount("--read-timeout", "40")
    # Before, the start waited for the probe's deadline (here 40 s).
    assert time.monotonic() - started < 15
    m.expect_log("Attachments_002.zip")
    assert (m.path / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]


def list_while_reading(m: Mount, backup: Backup) -> tuple[list[str], float]:
    """List Attachments_009/Attachments/ while reading Data_001.zip over and over: the
    names listed, and the slowest of those reads."""
    other = backup.files["Data_001.zip"]
    read_some(m.path / JOB / "Data_001.zip")  # its first chunk cached: reads are quick
    listed: list[str] = []
    lister = threading.Thread(target=lambda: listed.extend(
        os.listdir(m.path / JOB / "Attachments_009" / "Attachments")))
    lister.start()
    slowest = slowest_answer_while(lister, m.path / JOB / "Data_001.zip", other)
    lister.join()
    return listed, slowest


def many_members(names: list[str]) -> bytes:
    """A stored zip of tiny members, written by hand (zipfile takes minutes for 200 000)."""
    local, central = io.BytesIO(), io.BytesIO()
    for name in names:
        raw, data = name.encode(), name.encode()
        crc, offset = zlib.crc32(data), local.tell()
        local.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc,
                                len(data), len(data), len(raw), 0) + raw + data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21,
                                  crc, len(data), len(data), len(raw), 0, 0, 0, 0, 0,
                                  offset) + raw)
    directory, count, start = central.getvalue(), len(names), local.tell()
    # More than 65 535 entries: the counts are in Zip64 end records.
    end64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count,
                        len(directory), start)
    locator = struct.pack("<IIQI", 0x07064B50, 0, start + len(directory), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                      0xFFFFFFFF, 0)
    return local.getvalue() + directory + end64 + locator + end


def test_listing_200_000_members_leaves_the_rest_of_the_mount_answering(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    names = [f"Attachments/{n:07d}.txt" for n in range(200_000)]
    emulator.add_file(backup.zgid, backup.job_id, "Attachments_009.zip", many_members(names))
    m = mount("--expand")
    listed, slowest = list_while_reading(m, backup)
    assert len(listed) == len(names)
    assert slowest < 1.0, slowest


def test_50_000_members_of_one_name_are_listed_without_freezing_the_mount(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": the point of the archive
        for n in range(50_000):
            zf.writestr("Attachments/same.txt", str(n))
    emulator.add_file(backup.zgid, backup.job_id, "Attachments_009.zip", out.getvalue())
    m = mount("--expand")
    m.expect_log("49999 entries shown under another name")
    listed, slowest = list_while_reading(m, backup)
    assert len(set(listed)) == 50_000
    assert (m.path / JOB / "Attachments_009" / "Attachments" / "same (7).txt").read_text() == "6"
    assert slowest < 1.0, slowest
    renamed = [line for line in m.log.splitlines() if "shown under another name" in line]
    assert len(renamed) == 1, renamed  # one line for the archive, not 49 999

