"""A bounded soak: eight readers, sequential and random, over several files, while the
server misbehaves in every way the fault matrix knows on about one request in twenty."""

from __future__ import annotations

import errno
import functools
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MiB, MountFactory
from tests.helpers import Mount, file_sha256, peak_rss_mib, sha256, wait_for
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import Emulator, Fault
from zohofs.tree import FAILED_PROBE_TTL

JOB = "757345985/4876876000001594004"
SOAK_SECONDS = 15.0
READ_DEADLINE = 4.0
CACHE_MIB = 4
# Errnos a reader may see while the server misbehaves; anything else fails the soak.
ALLOWED = {errno.EIO, errno.EBUSY}
CHAOS = [
    Fault("status", status=503, reason="SERVICE_UNAVAILABLE"),
    Fault("status", status=500, reason="INTERNAL_ERROR"),
    Fault("status", status=429, reason="TOO_MANY_REQUESTS", headers={"Retry-After": "0"}),
    Fault("reset"), Fault("truncate"), Fault("hang_up"), Fault("wrong_range"),
    Fault("wrong_length"), Fault("gzip"), Fault("html"), Fault("bad_chunk"),
    Fault("big_headers"), Fault("ignore_range"), Fault("delay", seconds=0.3),
    Fault("drip", seconds=0.05), Fault("silent"),
]


@dataclass
class Tally:
    reads: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    short: int = 0  # reads that returned a correct prefix of what was asked
    slowest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, seconds: float) -> None:
        with self.lock:
            self.reads += 1
            self.slowest = max(self.slowest, seconds)

    def failed(self, code: int) -> None:
        with self.lock:
            self.errors[code] = self.errors.get(code, 0) + 1


def _read(tally: Tally, fd: int, data: bytes, offset: int, size: int, where: str) -> None:
    started = time.monotonic()
    try:
        got = os.pread(fd, size, offset)
    except OSError as exc:
        tally.failed(exc.errno or 0)
        return
    finally:
        tally.timed(time.monotonic() - started)
    want = data[offset:offset + size]
    if 0 < len(got) < len(want) and got == want[:len(got)]:
        # The kernel splits a read into several requests (pages, or max_read chunks with
        # direct I/O); when a later one fails it returns what the earlier ones brought
        # (the next read reports the error). The bytes returned are still the server's;
        # the next read must report the error or go on with them, never end the file.
        with tally.lock:
            tally.short += 1
        try:
            if not os.pread(fd, 1, offset + len(got)):
                tally.wrong.append(f"{where}: the file ended at {offset + len(got)} of "
                                   f"{len(data)} bytes")
        except OSError as exc:
            tally.failed(exc.errno or 0)
        return
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                     min(len(got), len(want)))
        tally.wrong.append(f"{where} at {offset}+{size}: got {len(got)} bytes, first "
                           f"difference at +{first}, zeros {got[first:].count(0)}")


def forget_pages(fd: int) -> None:
    """Make the kernel drop its cached pages, so that page-cache mode reads reach the mount
    again instead of being served from memory."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def sequential(m: Mount, backup: Backup, name: str, stop: float, tally: Tally) -> None:
    data = backup.files[name]
    while time.monotonic() < stop:
        try:
            fd = os.open(m.path / JOB / name, os.O_RDONLY)
        except OSError as exc:  # the probe behind the open met a fault
            tally.failed(exc.errno or 0)
            continue
        try:
            for offset in range(0, len(data), 128 * 1024):
                if time.monotonic() >= stop:
                    break
                _read(tally, fd, data, offset, 128 * 1024, name)
            forget_pages(fd)
        finally:
            os.close(fd)


def scattered(m: Mount, backup: Backup, name: str, stop: float, tally: Tally,
              seed: int) -> None:
    rng = random.Random(seed)
    data = backup.files[name]
    while True:
        try:
            fd = os.open(m.path / JOB / name, os.O_RDONLY)
            break
        except OSError as exc:
            tally.failed(exc.errno or 0)
    try:
        while time.monotonic() < stop:
            _read(tally, fd, data, rng.randrange(len(data)),
                  rng.choice([1, 4096, 65536, 300_000, MiB + 3]), name)
            if rng.random() < 0.05:
                forget_pages(fd)
    finally:
        os.close(fd)


def opens(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("mode", [[], ["--page-cache"]], ids=["direct-io", "page-cache"])
def test_soak_under_faults(mount: MountFactory, emulator: Emulator, backup: Backup,
                          mode: list[str]) -> None:
    m = mount(*mode, "--cache-size", str(CACHE_MIB), "--timeout", "1",
              "--read-timeout", str(READ_DEADLINE), "--retries", "4")
    # Every kind of fault is logged on the way; only crashes are not expected.
    m.expect_log(r"^(?!.*(Traceback|unexpected error)).*(WARNING|ERROR)")
    names = sorted(backup.files)
    emulator.start_chaos(0.05, CHAOS, seed=len(mode))
    tally = Tally()
    stop = time.monotonic() + SOAK_SECONDS
    threads = [threading.Thread(target=sequential, args=(m, backup, names[i % len(names)],
                                                          stop, tally)) for i in range(4)]
    threads += [threading.Thread(target=scattered, args=(m, backup, names[i % len(names)],
                                                         stop, tally, i)) for i in range(4)]
    for t in threads:
        t.start()
    # The mount answers the tree while the readers fight the faults.
    while time.monotonic() < stop:
        assert sorted(os.listdir(m.path / JOB)) == names
        time.sleep(0.5)  # pacing of this check, not synchronisation
    for t in threads:
        t.join(READ_DEADLINE * 4 + 30)
    assert not any(t.is_alive() for t in threads), "a reader is stuck"
    assert emulator.chaos is not None
    served = emulator.chaos.served
    emulator.chaos = None
    emulator.stopping.set()  # silent and dripping answers still open end now
    assert not tally.wrong, tally.wrong[:10]
    assert tally.reads > 200, tally
    assert set(tally.errors) <= ALLOWED, tally.errors
    assert tally.slowest < READ_DEADLINE + 6, f"slowest read {tally.slowest:.1f} s"
    # The server did misbehave, in many ways, and most reads still got through.
    assert sum(served.values()) >= 30 and len(served) >= 8, served
    assert sum(tally.errors.values()) < tally.reads
    emulator.stopping.clear()
    # And the mount is well afterwards: a probe that failed in the last second of the
    # chaos is answered from its failure for up to a second (FAILED_PROBE_TTL), no longer.
    for name in names:
        path = m.path / JOB / name
        wait_for(functools.partial(opens, path), 2 * FAILED_PROBE_TTL + 1,
                 f"{name} to open again")
        assert file_sha256(path) == sha256(backup.files[name])
    rss = peak_rss_mib(m.proc.pid)
    print(f"soak {mode}: {tally.reads} reads, {tally.short} short, errors {tally.errors}, slowest "
          f"{tally.slowest:.2f} s, peak RSS {rss:.0f} MiB")
    assert rss < CACHE_MIB + 100, f"peak RSS {rss:.0f} MiB with a {CACHE_MIB} MiB cache"
