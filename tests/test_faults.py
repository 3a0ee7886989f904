"""The fault matrix: every misbehaviour of a download host the emulator can play, each
against a real mount. A row asserts the bytes or the errno, a time bound, the log line,
and that the mount still serves another file afterwards."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, MountFactory
from tests.helpers import Mount, file_sha256, is_mounted, reads_as, sha256, wait_for
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import Emulator

JOB = "757345985/4876876000001594004"
VICTIM = "Attachments_001.zip"  # the file the fault hits
OTHER = "Attachments_002.zip"  # the file that must keep working
# Tight deadlines keep the matrix quick; the rows check that they hold.
REQUEST_DEADLINE = 1.5
READ_DEADLINE = 4.0
FAST = ["--timeout", str(REQUEST_DEADLINE), "--read-timeout", str(READ_DEADLINE),
        "--retries", "3"]
# Slack for a loaded 2-core machine on top of a deadline: the bound is on the order of
# magnitude (a read that hangs for minutes), not on speed.
SLACK = 6.0


@dataclass
class Row:
    fault: dict[str, Any]
    errno: int | None  # None: the read must return the server's bytes
    log: str | None  # a regex the mount's log must match; None: nothing to say
    bound: float = READ_DEADLINE + SLACK
    extra_log: list[str] = field(default_factory=list)


ROWS: dict[str, Row] = {
    "503-then-ok": Row({"kind": "status", "status": 503, "reason": "SERVICE_UNAVAILABLE"},
                       None, r"retrying .*HTTP 503"),
    "503-forever": Row({"kind": "status", "status": 503, "reason": "SERVICE_UNAVAILABLE",
                        "count": None}, errno.EIO, r"ERROR .*HTTP 503"),
    "500-forever": Row({"kind": "status", "status": 500, "reason": "INTERNAL_ERROR",
                        "count": None}, errno.EIO, r"ERROR .*HTTP 500 INTERNAL_ERROR"),
    "401": Row({"kind": "status", "status": 401, "reason": "INVALID_OAUTHSCOPE",
                "count": None}, errno.EACCES, r"WARNING .*HTTP 401 INVALID_OAUTHSCOPE"),
    "403": Row({"kind": "status", "status": 403, "reason": "FORBIDDEN", "count": None},
               errno.EACCES, r"WARNING .*HTTP 403 FORBIDDEN"),
    "404": Row({"kind": "status", "status": 404, "reason": "NOT_FOUND", "count": None},
               errno.ENOENT, r"WARNING .*HTTP 404 NOT_FOUND"),
    "429-retry-after": Row({"kind": "status", "status": 429, "reason": "TOO_MANY_REQUESTS",
                            "headers": {"Retry-After": "1"}}, None, r"retrying .*HTTP 429"),
    "429-retry-after-too-long": Row(
        {"kind": "status", "status": 429, "reason": "TOO_MANY_REQUESTS",
         "headers": {"Retry-After": "3600"}, "count": None},
        errno.EBUSY, r"WARNING .*asks to wait 3600 s, longer than the read deadline",
        bound=SLACK),
    # A reset reaches the client as a reset, or as an early end when the data won the race.
    "reset-mid-body": Row({"kind": "reset"}, None, r"retrying .*(connection broke|body ended)"),
    "truncated-body": Row({"kind": "truncate"}, None, r"retrying .*(body ended|broke)"),
    "hang-up": Row({"kind": "hang_up", "count": 2}, None, r"retrying .*cannot reach"),
    "drip": Row({"kind": "drip", "seconds": 0.2, "count": None}, errno.EIO,
                r"ERROR .*read deadline", extra_log=[r"no complete answer"]),
    "silent": Row({"kind": "silent", "count": None}, errno.EIO, r"ERROR .*read deadline",
                  extra_log=[r"no complete answer"]),
    "wrong-content-range": Row({"kind": "wrong_range", "count": None}, errno.EIO,
                               r"ERROR .*Content-Range .* does not match the request"),
    "wrong-content-length": Row({"kind": "wrong_length", "count": None}, errno.EIO,
                                r"ERROR .*Content-Length \d+ does not match the request"),
    "gzip-on-a-range": Row({"kind": "gzip", "count": None}, errno.EIO,
                           r"ERROR .*encoded answer \(gzip\) refused"),
    "html-200-on-read": Row({"kind": "html", "count": None}, errno.EIO,
                            r"ERROR .*text/html page instead of the file"),
    "starts-ignoring-range": Row({"kind": "ignore_range", "count": None}, errno.EIO,
                                 r"ERROR .*ignored Range"),
    "oversized-headers": Row({"kind": "big_headers", "count": None}, errno.EIO,
                             r"ERROR .*oversized headers", bound=SLACK),
    "chunked-206": Row({"kind": "chunked"}, None, None),  # a valid answer: served, quietly
    "bad-chunk": Row({"kind": "bad_chunk"}, None, r"retrying .*connection broke"),
}


def still_serves(m: Mount, backup: Backup, name: str = OTHER) -> None:
    assert file_sha256(m.path / JOB / name) == sha256(backup.files[name]), name


def serves_again(m: Mount, backup: Backup, name: str = VICTIM) -> None:
    """Once the fault is gone the file reads again: a failed probe is remembered for a
    moment, so wait for it (wrong bytes never count as success)."""
    wait_for(lambda: reads_as(m.path / JOB / name, backup.files[name]), 10,
             f"{name} to read again")


@pytest.mark.parametrize("row_id", list(ROWS))
def test_fault_matrix(mount: MountFactory, emulator: Emulator, backup: Backup,
                      row_id: str) -> None:
    row = ROWS[row_id]
    m = mount(*FAST)
    for pattern in [*([row.log] if row.log else []), *row.extra_log, "retrying"]:
        m.expect_log(pattern)
    data = backup.files[VICTIM]
    offset, size = 2 * MiB + 5, 100_000
    emulator.add_fault(**row.fault, path=VICTIM)
    fd = os.open(m.path / JOB / VICTIM, os.O_RDONLY)
    try:
        started = time.monotonic()
        if row.errno is None:
            assert os.pread(fd, size, offset) == data[offset:offset + size]
        else:
            with pytest.raises(OSError) as info:
                os.pread(fd, size, offset)
            assert info.value.errno == row.errno, info.value
        elapsed = time.monotonic() - started
    finally:
        os.close(fd)
    assert elapsed < row.bound, f"{row_id}: took {elapsed:.1f} s"
    if row.fault.get("count", 1) is not None:
        assert not emulator.faults, "the fault was never served: the row proves nothing"
    if row.log:
        assert any(re.search(row.log, line) for line in m.log.splitlines()), m.log
    still_serves(m, backup)
    # Once the server behaves, the same file reads again (a fresh open probes afresh).
    emulator.faults.clear()
    serves_again(m, backup)


def test_a_timed_out_request_is_retried_within_retries_only(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = mount("--timeout", "0.5", "--read-timeout", "30", "--retries", "3")
    m.expect_log("no complete answer|retrying")
    still_serves(m, backup)  # leaves kept-alive connections in the pool
    emulator.add_fault("silent", path=VICTIM, count=None)
    arrived = len(emulator.arrived)
    with open(m.path / JOB / VICTIM, "rb", buffering=0) as f, pytest.raises(OSError) as info:
        f.seek(3 * MiB)
        f.read(4096)
    assert info.value.errno == errno.EIO
    assert len(emulator.arrived) - arrived == 3  # --retries 3: three GETs, not four


def test_probe_answered_with_an_html_page_is_never_the_file(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    emulator.add_fault("html", path=VICTIM, count=None)
    m = mount(*FAST)
    m.expect_log("text/html page instead of the file")
    path = m.path / JOB / VICTIM
    with pytest.raises(OSError) as info:
        os.stat(path)
    assert info.value.errno == errno.EIO
    still_serves(m, backup)
    emulator.faults.clear()
    serves_again(m, backup)
    assert os.stat(path).st_size == len(backup.files[VICTIM])


def test_a_probe_claiming_more_than_the_body_gives_eio(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    size = len(backup.files[VICTIM])
    emulator.add_fault("headers", path=VICTIM, headers={"Content-Range": f"bytes 0-0/{2 * size}"})
    m = mount(*FAST)
    m.expect_log("HTTP 416 for a range inside|now gives the size as")
    fd = os.open(m.path / JOB / VICTIM, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, size + 10)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    # The lie is forgotten: the kernel is told, and the next stat probes again.
    wait_for(lambda: os.stat(m.path / JOB / VICTIM).st_size == size, 10, "the real size")
    still_serves(m, backup, VICTIM)


def test_unicode_digits_in_headers_are_not_numbers(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = mount(*FAST)
    m.expect_log("retrying|HTTP 429")
    emulator.add_fault("status", status=429, reason="TOO_MANY_REQUESTS",
                       headers={"Retry-After": "\u00b2"}, path=VICTIM)
    still_serves(m, backup, VICTIM)  # an unreadable Retry-After is ignored, not fatal
    assert "Traceback" not in m.log and "unexpected error" not in m.log


def test_concurrent_stats_of_a_failing_file_share_one_probe(
        mount: MountFactory, emulator: Emulator) -> None:
    emulator.add_fault("status", status=503, reason="SERVICE_UNAVAILABLE", path=VICTIM,
                       count=None, seconds=1.0)
    m = mount("--retries", "1", "--read-timeout", "20")
    m.expect_log("HTTP 503")
    arrived = sum(p.endswith(VICTIM) for p in emulator.arrived)
    errors: list[int] = []
    barrier = threading.Barrier(5)

    def stat() -> None:
        barrier.wait()
        try:
            os.stat(m.path / JOB / VICTIM)
        except OSError as exc:
            errors.append(exc.errno or 0)

    threads = [threading.Thread(target=stat) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [errno.EIO] * 5
    assert sum(p.endswith(VICTIM) for p in emulator.arrived) - arrived <= 2


def test_idle_connections_closed_by_the_server_cost_no_error(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = mount("--retries", "1")
    # Parallel reads leave several kept-alive connections in the pool.
    threads = [threading.Thread(target=still_serves, args=(m, backup, name))
               for name in backup.files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    emulator.idle_timeout = 0.2
    # The server closes every idle connection (as nginx does after 75 s) ...
    wait_for(lambda: emulator.idle_closed >= 2, 20, "the server to close idle connections")
    emulator.idle_timeout = None
    # ... and the next reads, one retry allowed, still work without a word in the log.
    for name in backup.files:
        with open(m.path / JOB / name, "rb", buffering=0) as f:
            f.seek(len(backup.files[name]) // 2)
            assert f.read(1000) == backup.files[name][len(backup.files[name]) // 2:][:1000]


def test_a_server_gone_and_back(mount: MountFactory, emulator: Emulator,
                                backup: Backup) -> None:
    m = mount(*FAST)
    m.expect_log("cannot reach|retrying|read deadline")
    emulator.stop()
    started = time.monotonic()
    with open(m.path / JOB / VICTIM, "rb", buffering=0) as f, pytest.raises(OSError) as info:
        f.read(4096)
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < READ_DEADLINE + SLACK
    assert sorted(os.listdir(m.path / JOB)) == sorted(backup.files)  # the tree stays
    emulator.restart()
    serves_again(m, backup)


def test_a_stuck_host_blocks_neither_cached_reads_nor_other_hosts_nor_stat(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    with Emulator(tokens=set(emulator.tokens)) as other:
        other.add_file("757345985", "4876876000001594005", "Data_001.zip",
                       backup.files["Data_001.zip"])
        links = [emulator.base_url + p for p in emulator.files] + [
            other.base_url + p for p in other.files]
        m = mount("--read-timeout", "60", "--timeout", "60",
                  "--trust-host", f"127.0.0.1:{other.port}", links=links)
        m.expect_log("read deadline|no complete answer")
        with open(m.path / JOB / VICTIM, "rb", buffering=0) as f:
            head = f.read(4096)  # block 0 is cached from now on
        emulator.add_fault("silent", count=None)  # every request to the first host hangs
        arrived = len(emulator.arrived)

        def stuck_read(block: int) -> None:
            with open(m.path / JOB / OTHER, "rb", buffering=0) as f:
                f.seek(block * MiB)
                f.read(4096)

        # More readers of different blocks than the host has connection slots (4).
        stuck = [threading.Thread(target=stuck_read, args=(i,), daemon=True)
                 for i in range(6)]
        for t in stuck:
            t.start()
        wait_for(lambda: len(emulator.arrived) - arrived >= 4, 20,
                 "readers to be stuck on the first host")
        with open(m.path / JOB / VICTIM, "rb", buffering=0) as f:
            assert f.read(4096) == head
        assert os.stat(m.path / JOB / VICTIM).st_size == len(backup.files[VICTIM])
        assert sorted(os.listdir(m.path / JOB)) == sorted(backup.files)
        other_file = m.path / "757345985" / "4876876000001594005" / "Data_001.zip"
        assert file_sha256(other_file) == sha256(backup.files["Data_001.zip"])
        emulator.faults.clear()
        emulator.stopping.set()  # the silent answers end; the readers' retries succeed
        for t in stuck:
            t.join(60)
        assert not any(t.is_alive() for t in stuck)
        emulator.stopping.clear()


def test_a_redirect_to_another_host_does_not_get_the_token(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = mount(*FAST)
    m.expect_log("HTTP 401")
    target = f"http://localhost:{emulator.port}/v2/crm/{JOB.replace('/', '/backup/')}/{VICTIM}"
    emulator.add_fault("status", status=302, reason="Found", headers={"Location": target},
                       path=VICTIM)
    with open(m.path / JOB / VICTIM, "rb", buffering=0) as f, pytest.raises(OSError) as info:
        f.seek(MiB)
        f.read(4096)
    assert info.value.errno == errno.EACCES
    redirected = [r for r in emulator.requests if r.headers.get("Host", "").startswith("localhost")]
    assert redirected and all("Authorization" not in r.headers for r in redirected)
    still_serves(m, backup)


def test_no_validators_and_a_replaced_file_never_mix(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    old = backup.files[VICTIM]
    new = bytes(b ^ 0xFF for b in old)  # the same size: only the bytes tell
    path = f"/v2/crm/{JOB.replace('/', '/backup/')}/{VICTIM}"
    emulator.files[path].validators = False
    m = mount(*FAST)
    m.expect_log("neither ETag nor Last-Modified")
    assert (m.path / JOB / VICTIM).read_bytes() == old  # every block is now cached
    emulator.replace(path, new)
    assert (m.path / JOB / VICTIM).read_bytes() == new


def test_page_cache_after_a_replaced_file_gives_the_new_bytes_only(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    old = backup.files[VICTIM]
    new = bytes(b ^ 0x5A for b in old)
    # No prefetch: the whole file would be fetched (old bytes, consistently) before the
    # change, and the read below would not meet it.
    m = mount("--page-cache", "--readahead", "0", *FAST)
    m.expect_log("changed on the server")
    with open(m.path / JOB / VICTIM, "rb") as f:
        assert f.read(MiB) == old[:MiB]  # now in the kernel's page cache
        emulator.replace(f"/v2/crm/{JOB.replace('/', '/backup/')}/{VICTIM}", new)
        f.seek(4 * MiB)
        with pytest.raises(OSError) as info:
            f.read(MiB)
        assert info.value.errno == errno.ESTALE
    result = subprocess.run(["cat", str(m.path / JOB / VICTIM)], capture_output=True)
    assert result.returncode == 0
    assert result.stdout == new


def test_a_dead_mount_point_is_recovered(mount: MountFactory, backup: Backup) -> None:
    first = mount(name="dead")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    with pytest.raises(OSError) as info:
        os.listdir(first.path)
    assert info.value.errno == errno.ENOTCONN
    second = mount(name="dead")  # returns at once: the dead mount is still listed
    second.expect_log("removing a dead zohofs mount")
    wait_for(lambda: " mounted 4 files" in second.log, 30, "the new mount")
    assert is_mounted(second.path)
    still_serves(second, backup)
    assert "removing a dead zohofs mount" in second.log
    # Stopped here: the teardown's lazy unmount of the dead one shares this path.
    assert second.stop() == 0


def test_the_suite_leaves_other_zohofs_mounts_alone(mount: MountFactory) -> None:
    # A zohofs mount the inner run did not make, like a production /zoho.
    outside = mount(name="production")
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_units.py::test_changed_files_are_stale"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert inner.returncode == 0, inner.stdout + inner.stderr
    assert is_mounted(outside.path)
    assert "mounts left behind" not in inner.stdout


def test_sigusr1_logs_every_task_and_thread_and_the_mount_goes_on(
        mount: MountFactory, backup: Backup) -> None:
    m = mount()
    m.expect_log("stacks on SIGUSR1")
    m.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "thread MainThread" in m.log, 10, "the stack dump")
    dump = m.log[m.log.index("stacks on SIGUSR1"):]
    assert "task <init>" in dump and "pyfuse3" in dump and "in main" in dump
    still_serves(m, backup)
