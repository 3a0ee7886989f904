"""The mount stays responsive whatever one file or one archive does: a stuck download
does not hold another file's reads, a silent probe does not hold the mount's start, and
indexing a huge or hostile archive does not freeze the rest of the mount."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from tests.conftest import MountFactory
from tests.helpers import Mount, data_gets, many_members, wait_for
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import Emulator

JOB = "757345985/4876876000001594004"
# Generous bounds: each case took 25 s to 250 s before the mount was made responsive.
ANSWERS_WITHIN = 5.0
# Reads of another file while a huge archive is indexed and listed: they took 3 s to
# 250 s before, then 0.16 to 0.25 s (Python's full collections over an object per member);
# measured now: 0.05 to 0.07 s, 0.12 s at worst. A bound a loaded machine keeps; the
# collector's share is asserted without a clock in test_zipindex.py and test_units.py.
SLOWEST_ANSWER = 1.0


def read_some(path: Path, offset: int = 0, size: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def slowest_answer_while(busy: Callable[[], bool], path: Path, data: bytes) -> float:
    """The longest a small read of ``path`` took while ``busy()`` held (at least one)."""
    slowest, offset = 0.0, 0
    while True:
        started = time.monotonic()
        assert read_some(path, offset) == data[offset:offset + 4096]
        slowest = max(slowest, time.monotonic() - started)
        offset = (offset + 4096 * 97) % (len(data) - 4096)
        if not busy():
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
    """List Attachments_009/Attachments/ while reading Data_001.zip here and there: the
    names listed (in order), and the slowest of those reads. The listing runs in a
    process of its own: turning 500 000 names into a list here would hold this process's
    lock, and starve the emulator that serves the reads."""
    folder = m.path / JOB / "Attachments_009" / "Attachments"
    with tempfile.TemporaryFile() as out:
        lister = subprocess.Popen(["ls", "-1", str(folder)], stdout=out)
        slowest = slowest_answer_while(lambda: lister.poll() is None,
                                       m.path / JOB / "Data_001.zip",
                                       backup.files["Data_001.zip"])
        assert lister.wait() == 0
        out.seek(0)
        return out.read().decode().splitlines(), slowest


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
    assert slowest < SLOWEST_ANSWER, slowest
    renamed = [line for line in m.log.splitlines() if "shown under another name" in line]
    assert len(renamed) == 1, renamed  # one line for the archive, not 49 999



def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def listed_and_forgotten(mount: MountFactory, emulator: Emulator, backup: Backup,
                         members: int) -> tuple[float, float, float, int]:
    """An archive of ``members`` tiny members listed (in a process of its own) while
    another file is read, then forgotten by the kernel: the slowest of those reads, the
    mount's RSS in MiB before the listing and after it, and the mount's pid."""
    names = [f"Attachments/{n:07d}.txt" for n in range(members)]
    emulator.add_file(backup.zgid, backup.job_id, "Attachments_009.zip", many_members(names))
    m = mount("--expand", "--cache-size", "8")
    # The chunk cache and its spare buffers full first (they keep their 8 + 16 MiB for
    # the mount's life): what is measured is everything else.
    subprocess.run(["cat", str(m.path / JOB / "Attachments_009.zip")],
                   stdout=subprocess.DEVNULL, check=True)
    before = rss_mib(m.proc.pid)
    listed, slowest = list_while_reading(m, backup)
    assert listed == [n.split("/")[1] for n in names]  # in name order
    after = rss_mib(m.proc.pid)
    assert after > before + 40, (before, after)  # or the test would prove nothing
    # The kernel lets go of every entry nothing holds (all of the folder's): it sends
    # FORGET for each, and the nodes, then the archive's contents, are freed.
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    wait_for(lambda: os.statvfs(m.path).f_files < 100, 30, "the nodes freed")
    return slowest, before, after, m.proc.pid


def test_the_memory_a_listing_took_comes_back_once_the_kernel_forgets(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    _, before, after, pid = listed_and_forgotten(mount, emulator, backup, 200_000)
    wait_for(lambda: rss_mib(pid) < before + 20, 10,
             f"RSS back within 20 MiB of {before:.0f} MiB (after the listing: {after:.0f})")


def test_500_000_members_are_listed_with_the_mount_answering(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    slowest, before, after, pid = listed_and_forgotten(mount, emulator, backup, 500_000)
    assert slowest < SLOWEST_ANSWER, slowest
    # Measured: 12 to 22 MiB of the 400 stay with the process at this size (how the C
    # library's heap is cut up); the 20 MiB bound is asserted for 200 000 members above.
    wait_for(lambda: rss_mib(pid) < after - 0.9 * (after - before), 10,
             f"nine tenths of the listing's memory back ({before:.0f} -> {after:.0f} MiB)")
