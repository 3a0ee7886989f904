"""Shared test machinery: a zohofs mount in a subprocess, waited on with deadlines."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from zohofs.emulator.server import Emulator

MOUNT_DEADLINE = 30.0
EXIT_DEADLINE = 20.0
# Log lines that fail a test unless the test declares them expected.
_ALARMING = re.compile(r"WARNING|ERROR|CRITICAL|Traceback")


def wait_for(condition: Callable[[], bool], deadline: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        time.sleep(0.02)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


_STARTED: list[Path] = []


def started_mounts() -> list[Path]:
    """Every mount point a Mount of this process used."""
    return list(_STARTED)


def started_mounts_add(path: Path) -> None:
    """A mount point a test mounts by other means (mount(8)): cleaned if left behind."""
    _STARTED.append(path)


def ids(path: Path) -> list[str]:
    """The entries of ``path`` that are not symbolic links: the orgs and backups by id,
    without the names zohofs gives them for people (``latest``, dates, account names)."""
    return [name for name in os.listdir(path)
            if not os.path.islink(path / name) and name != "by-name"]


def reads_as(path: Path, data: bytes) -> bool:
    """The file reads as ``data`` now (False while it fails; wrong bytes never pass)."""
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def data_gets(emulator: Emulator, name: str | None = None) -> list[str]:
    """Ranges of the logged GETs that fetched data (probes excluded)."""
    return [r.headers.get("Range", "") for r in emulator.gets(name)
            if r.headers.get("Range") != "bytes=0-0"]


def spans(ranges: list[str]) -> list[tuple[int, int]]:
    """``bytes=first-last`` headers as sorted (first, last) pairs."""
    return sorted((int(a), int(b)) for a, b in (r[6:].split("-") for r in ranges))


def fetched(ranges: list[str]) -> int:
    """Bytes the ranges asked for."""
    return sum(last - first + 1 for first, last in spans(ranges))


def fetched_once(ranges: list[str], size: int) -> bool:
    """The ranges fetched cover ``[0, size)`` with no byte fetched twice."""
    position = 0
    for first, last in spans(ranges):
        if first != position:
            return False
        position = last + 1
    return position == size


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Mount:
    """``zohofs mount`` running in a child process (never in the test's own process:
    a process must not touch a mount from the thread that serves it)."""

    def __init__(self, path: Path, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.path = path
        self.log_path = log_path
        self.expected_log: list[str] = []
        _STARTED.append(path)
        self._log = open(log_path, "wb")  # noqa: SIM115 (lives as long as the mount)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zohofs", "mount", str(path), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: is_mounted(path) or self.proc.poll() is not None,
                     MOUNT_DEADLINE, f"the mount on {path}")
        except AssertionError:
            self.kill()
            raise
        if self.proc.poll() is not None:
            raise AssertionError(f"zohofs mount exited with {self.proc.returncode}:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def expect_log(self, pattern: str) -> None:
        """Declare that log lines matching ``pattern`` (a regex) are part of the test."""
        self.expected_log.append(pattern)

    def unexpected_log_lines(self) -> list[str]:
        return [line for line in self.log.splitlines()
                if _ALARMING.search(line)
                and not any(re.search(p, line) for p in self.expected_log)]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the mount and wait until it exits; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(EXIT_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("zohofs mount did not exit after SIGTERM") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True, check=False)
        self._log.close()


def peak_rss_mib(pid: int) -> float:
    """The most memory the process ``pid`` has held so far."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def zip64_by_hand(name: bytes, data: bytes) -> bytes:
    """One stored member whose central entry keeps its sizes and offset in a Zip64 extra
    field (as an archive over 4 GiB does), behind Zip64 end records."""
    crc = zlib.crc32(data)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, len(data),
                        len(data), len(name), 0) + name + data
    extra = struct.pack("<HHQQQ", 0x0001, 24, len(data), len(data), 0)
    entry = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc,
                        0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0,
                        0xFFFFFFFF) + name + extra
    cd_offset = len(local)
    end64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, len(entry),
                        cd_offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, cd_offset + len(entry), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                      0xFFFFFFFF, 0)
    return local + entry + end64 + locator + end


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
