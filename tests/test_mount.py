"""Real mounts: zohofs in a subprocess, the emulator in this process, real cp/rsync/unzip."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, MountFactory
from tests.helpers import (
    data_gets,
    fetched_once,
    file_sha256,
    ids,
    is_mounted,
    reads_as,
    sha256,
    wait_for,
)
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import DEFAULT_LAST_MODIFIED, Emulator

JOB = "757345985/4876876000001594004"


def test_tree_shape_and_attributes(mount: MountFactory, backup: Backup) -> None:
    m = mount()
    assert ids(m.path) == ["757345985"]
    assert ids(m.path / "757345985") == ["4876876000001594004"]
    job = m.path / JOB
    assert sorted(os.listdir(job)) == sorted(backup.files)
    for d in (m.path, m.path / "757345985", job):
        st = os.stat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o500  # owner only
        assert st.st_uid == os.getuid()
    for name, data in backup.files.items():
        st = os.stat(job / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o400
        assert st.st_size == len(data)
        assert st.st_mtime == DEFAULT_LAST_MODIFIED
        assert st.st_blocks == (len(data) + 511) // 512
        assert st.st_blksize >= MiB
        assert st.st_uid == os.getuid()


def test_inode_numbers_survive_a_remount(mount: MountFactory) -> None:
    first = mount(name="a")
    inodes = {p: os.lstat(p).st_ino for p in first.path.rglob("*")}
    assert first.stop() == 0
    second = mount(name="b")
    again = {p: os.lstat(second.path / p.relative_to(first.path)).st_ino for p in inodes}
    assert list(inodes.values()) == list(again.values())
    assert len(set(inodes.values())) == len(inodes)


@pytest.mark.parametrize("mode", [[], ["--page-cache"]], ids=["direct-io", "page-cache"])
def test_cp_rsync_and_unzip_give_the_servers_bytes(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path,
        mode: list[str]) -> None:
    m = mount(*mode)
    job = m.path / JOB
    cp_dest, rsync_dest = tmp_path / "cp", tmp_path / "rsync"
    subprocess.run(["cp", "-r", str(job), str(cp_dest)], check=True)
    subprocess.run(["rsync", "-a", f"{m.path}/", f"{rsync_dest}/"], check=True)
    for name, data in backup.files.items():
        assert file_sha256(cp_dest / name) == sha256(data), name
        assert file_sha256(rsync_dest / JOB / name) == sha256(data), name
        result = subprocess.run(["unzip", "-tq", str(job / name)], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    # rsync kept the server's mtimes, so a second run finds nothing to transfer.
    gets_before = len(emulator.gets())
    second = subprocess.run(["rsync", "-a", "--itemize-changes", "--stats", f"{m.path}/",
                             f"{rsync_dest}/"], check=True, capture_output=True, text=True)
    assert "Number of regular files transferred: 0" in second.stdout, second.stdout
    assert len(emulator.gets()) == gets_before


def test_a_sequential_copy_fetches_each_byte_once(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    m = mount()
    name = "Attachments_001.zip"
    subprocess.run(["cp", str(m.path / JOB / name), str(tmp_path / name)], check=True)
    assert file_sha256(tmp_path / name) == sha256(backup.files[name])
    ranges = data_gets(emulator, name)
    assert fetched_once(ranges, len(backup.files[name])), ranges
    # Requests grow with the copy: far fewer than one per read of cp.
    assert len(ranges) <= len(backup.files[name]) // (512 * 1024), ranges


def test_random_reads_match_the_source(mount: MountFactory, backup: Backup) -> None:
    m = mount()
    rng = random.Random(3)
    for name, data in backup.files.items():
        fd = os.open(m.path / JOB / name, os.O_RDONLY)
        try:
            for _ in range(60):
                offset = rng.randrange(len(data) + 10)
                size = rng.choice([1, 7, 4096, 65536, 131072, 3 * MiB])
                assert os.pread(fd, size, offset) == data[offset:offset + size], (name, offset)
        finally:
            os.close(fd)


def test_concurrent_readers_share_one_get_per_block(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    # Direct I/O (the default): every reader's read reaches zohofs, so the block cache is
    # what is tested.
    m = mount()
    name = "Attachments_002.zip"
    data = backup.files[name]
    results: list[bytes] = []
    barrier = threading.Barrier(6)

    def read_all() -> None:
        barrier.wait()
        with open(m.path / JOB / name, "rb", buffering=0) as f:
            results.append(f.read())

    threads = [threading.Thread(target=read_all) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and all(r == data for r in results)
    ranges = data_gets(emulator, name)
    assert fetched_once(ranges, len(data)), ranges


@pytest.mark.parametrize(("status", "reason", "code"), [
    (401, "INVALID_OAUTHSCOPE", errno.EACCES),
    (403, "FORBIDDEN", errno.EACCES),
    (500, "INTERNAL_ERROR", errno.EIO),
    (404, "NOT_FOUND", errno.ENOENT),
])
def test_http_errors_become_errnos_and_recover(
        mount: MountFactory, emulator: Emulator, backup: Backup,
        status: int, reason: str, code: int) -> None:
    fault = emulator.add_fault("status", status=status, reason=reason,
                               path="Attachments_003.zip", count=None)
    m = mount("--retries", "2")
    m.expect_log(rf"HTTP {status} {reason}")
    m.expect_log("retrying")
    path = m.path / JOB / "Attachments_003.zip"
    # The entry is still listed, but stat and open fail with the mapped errno.
    assert "Attachments_003.zip" in os.listdir(m.path / JOB)
    for call in (os.stat, lambda p: os.close(os.open(p, os.O_RDONLY))):
        with pytest.raises(OSError) as info:
            call(path)
        assert info.value.errno == code
    # Once the server is well again, the next access probes again and works.
    emulator.faults.remove(fault)
    wait_for(lambda: reads_as(path, backup.files["Attachments_003.zip"]), 10,
             "the file to read again")


def test_missing_names_and_writes(mount: MountFactory) -> None:
    m = mount()
    job = m.path / JOB
    with pytest.raises(FileNotFoundError):
        os.stat(job / "Data_999.zip")
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "123")
    for attempt in (
        lambda: os.open(job / "Data_001.zip", os.O_RDWR),
        lambda: os.open(job / "new.zip", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(job / "dir"),
        lambda: os.unlink(job / "Data_001.zip"),
        lambda: os.rename(job / "Data_001.zip", job / "x.zip"),
        lambda: os.truncate(job / "Data_001.zip", 0),
        lambda: os.chmod(job / "Data_001.zip", 0o644),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS


def test_retries_hide_transient_faults(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = mount()
    m.expect_log("retrying")
    name = "Attachments_001.zip"
    for kind in ("reset", "truncate"):
        emulator.add_fault(kind, path=name, count=2)
    emulator.add_fault("status", status=429, reason="TOO_MANY_REQUESTS",
                       headers={"Retry-After": "0"}, path=name, count=1)
    emulator.add_fault("status", status=503, reason="SERVICE_UNAVAILABLE", path=name, count=1)
    assert (m.path / JOB / name).read_bytes() == backup.files[name]
    assert not emulator.faults


@pytest.mark.parametrize("kind", ["wrong_range", "ignore_range"])
def test_untrustworthy_answers_are_refused_never_served(
        mount: MountFactory, emulator: Emulator, backup: Backup, kind: str) -> None:
    m = mount()
    m.expect_log("does not match the request|ignored Range")
    name = "Attachments_001.zip"
    emulator.add_fault(kind, path=name, count=None)
    fd = os.open(m.path / JOB / name, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, 2 * MiB + 5)
        assert info.value.errno == errno.EIO
        emulator.faults.clear()
        offset = 2 * MiB + 5
        assert os.pread(fd, 4096, offset) == backup.files[name][offset:offset + 4096]
    finally:
        os.close(fd)


def test_a_file_replaced_on_the_server_is_stale_never_mixed(
        mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = mount()
    m.expect_log("changed on the server")
    name = "Attachments_001.zip"
    old = backup.files[name]
    new = bytes(reversed(old))
    fd = os.open(m.path / JOB / name, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == old[:100]
        emulator.replace(f"/v2/crm/{JOB.replace('/', '/backup/')}/{name}", new)
        with pytest.raises(OSError) as info:
            os.pread(fd, 100, 3 * MiB)
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    with open(m.path / JOB / name, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(100) == new[3 * MiB:3 * MiB + 100]


def test_sigterm_during_a_read_unmounts_cleanly(
        mount: MountFactory, emulator: Emulator) -> None:
    m = mount()
    m.expect_log("unmounting with 1 files open, their readers cut off: .*Attachments_002")
    emulator.add_fault("delay", seconds=30, path="Attachments_002.zip", count=None)
    outcome: list[object] = []

    def slow_read() -> None:
        try:
            with open(m.path / JOB / "Attachments_002.zip", "rb", buffering=0) as f:
                outcome.append(f.read(4096))
        except OSError as exc:
            outcome.append(exc)

    probes = len(emulator.arrived)
    reader = threading.Thread(target=slow_read, daemon=True)
    reader.start()
    wait_for(lambda: any(p.endswith("Attachments_002.zip") for p in emulator.arrived[probes:]),
             10,
             "the read to reach the server")
    assert m.stop() == 0
    assert not is_mounted(m.path)
    reader.join(10)
    assert not reader.is_alive()
    assert outcome and isinstance(outcome[0], OSError)


def test_unknown_host_and_plain_http_are_refused(tmp_path: Path, token_file: Path) -> None:
    from tests.conftest import run_zohofs

    (tmp_path / "m").mkdir()
    evil = "https://files.example.net/v2/crm/1/backup/2/Data_001.zip"
    result = run_zohofs("mount", str(tmp_path / "m"), "--link", evil,
                        "--access-token-file", str(token_file))
    assert result.returncode == 2
    assert "files.example.net:443" in result.stderr and "--trust-host" in result.stderr
    plain = "http://download-accl.zoho.com/v2/crm/1/backup/2/Data_001.zip"
    result = run_zohofs("mount", str(tmp_path / "m"), "--link", plain,
                        "--access-token-file", str(token_file))
    assert result.returncode == 2 and "plain http" in result.stderr
    assert not is_mounted(tmp_path / "m")


def test_the_token_never_reaches_the_log(mount: MountFactory, backup: Backup) -> None:
    from tests.conftest import TOKEN

    m = mount("--debug")
    shutil.copyfile(m.path / JOB / "Data_001.zip", m.path.parent / "copy.zip")
    assert TOKEN not in m.log
    # -d logs one line per request: what, which bytes, the answer and how long it took.
    size = len(backup.files["Data_001.zip"])
    assert re.search(rf"GET http://127\.0\.0\.1:\d+/v2/crm/\d+/backup/\d+/Data_001\.zip "
                     rf"\(bytes=0-{size - 1}\) -> 206 Partial Content, {size} bytes in \d+ ms",
                     m.log), m.log


def test_a_server_that_ignores_range_still_serves_exact_bytes(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    emulator.add_fault("ignore_range", count=None)
    m = mount("--cache-size", "2")  # less than the file: going back means starting over
    m.expect_log("ignores Range requests")
    name = "Attachments_001.zip"
    data = backup.files[name]
    subprocess.run(["cp", str(m.path / JOB / name), str(tmp_path / name)], check=True)
    assert file_sha256(tmp_path / name) == sha256(data)
    # One whole-file GET for the sequential copy, not one per block.
    assert len(data_gets(emulator, name)) == 1
    # Random access (unzip reads the end first) works too: it starts over when it must.
    result = subprocess.run(["unzip", "-tq", str(m.path / JOB / name)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    fd = os.open(m.path / JOB / name, os.O_RDONLY)
    try:
        for offset in (3 * MiB + 5, 17, 4 * MiB - 1, 0):
            assert os.pread(fd, 70000, offset) == data[offset:offset + 70000]
    finally:
        os.close(fd)
    assert len(data_gets(emulator, name)) > 1  # it did start over, and still got it right



def test_status_shows_a_copy_in_progress_and_files_show_their_source(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    from tests.conftest import TOKEN, run_zohofs

    name = "Attachments_009.zip"
    data = random.Random(9).randbytes(16 * MiB)
    emulator.add_file(backup.zgid, backup.job_id, name, data)
    m = mount()
    emulator.rate = 1_000_000  # a slow link: the copy takes a few seconds

    def status() -> dict[str, Any]:
        figures: dict[str, Any] = json.loads(os.getxattr(m.path, "user.zohofs.status"))
        return figures

    copy = subprocess.Popen(["cp", str(m.path / JOB / name), str(tmp_path / name)])
    try:
        wait_for(lambda: any(f["bytes_read"] > 0 for f in status()["open_files"]), 20,
                 "the copy to show")
        [first] = status()["open_files"]
        assert first["path"] == f"{JOB}/{name}" and first["size"] == len(data)
        wait_for(lambda: any(f["bytes_read"] > first["bytes_read"]
                             for f in status()["open_files"]), 20, "progress")
        screens = tmp_path / "screens"
        with open(screens, "w") as out:
            watch = subprocess.Popen([sys.executable, "-m", "zohofs", "status", str(m.path),
                                      "--watch"], stdout=out)
        wait_for(lambda: screens.read_text().count("open files:") >= 2, 20, "two screens")
        assert "open files: 1" in screens.read_text()
    finally:
        assert copy.wait(60) == 0
    watch.send_signal(signal.SIGINT)
    assert watch.wait(10) == 0
    emulator.rate = None
    done = status()
    assert done["open_files"] == [] and done["gets"] >= 2
    assert done["bytes_fetched"] >= len(data)
    result = run_zohofs("status", str(m.path), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["files"] == len(backup.files) + 1
    # Per file: where it comes from (never the query: tokens hide there), size, expiry.
    url = os.getxattr(m.path / JOB / name, "user.zohofs.url").decode()
    assert url.endswith(f"/{name}") and "?" not in url and TOKEN not in url
    assert os.getxattr(m.path / JOB / name, "user.zohofs.size") == str(len(data)).encode()
    assert "user.zohofs.etag" in os.listxattr(m.path / JOB / name)
    not_zohofs = run_zohofs("status", str(tmp_path))
    assert not_zohofs.returncode == 2 and "is not a zohofs mount" in not_zohofs.stderr


def test_mount_point_mistakes_are_named(
        mount: MountFactory, emulator: Emulator, token_file: Path, tmp_path: Path) -> None:
    from tests.conftest import common_args, run_zohofs

    link = ["--link", emulator.base_url + next(iter(emulator.files)),
            "--access-token-file", str(token_file), *common_args(emulator)]
    missing = run_zohofs("mount", str(tmp_path / "nowhere"), *link)
    assert missing.returncode == 2
    assert f"mount point {tmp_path / 'nowhere'} does not exist" in missing.stderr
    (tmp_path / "file").write_text("")
    not_dir = run_zohofs("mount", str(tmp_path / "file"), *link)
    assert not_dir.returncode == 2 and "is not a directory" in not_dir.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("")
    m = mount(name="full")
    assert "full is not empty (1 names): what it holds is hidden" in m.log
    m.expect_log("is not empty")


def test_systemd_hears_ready_and_a_status_line(mount: MountFactory, backup: Backup) -> None:
    name = f"zohofs-test-{os.getpid()}-{random.randrange(1 << 30)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)  # abstract: nothing to clean up
        notify.settimeout(20)
        m = mount(env={"NOTIFY_SOCKET": "@" + name})
        heard = [notify.recv(4096).decode() for _ in range(2)]
        assert m.stop() == 0
        while "STOPPING=1" not in heard:  # a timeout here fails the test
            heard.append(notify.recv(4096).decode())
    assert heard[0] == "READY=1"
    assert re.fullmatch(rf"STATUS={len(backup.files)} files, 0 open; fetched \S+ MB in \d+ "
                        r"GETs; 0 errors", heard[1]), heard[1]
