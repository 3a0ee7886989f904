"""The rough edges an admin meets: what `ls -la`, `df`, `rsync -aX`, `zohofs status` and a
cron check see, and what the log says when a mount stops under open files."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import MountFactory, run_zohofs, write_config
from tests.helpers import wait_for
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import EmulatedAccount, Emulator

JOB = "757345985/4876876000001594004"


def errno_of(call: object) -> int:
    try:
        call()  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_folders_list_dot_entries_and_say_what_they_are(mount: MountFactory) -> None:
    m = mount("--expand")
    listed = subprocess.run(["ls", "-a", str(m.path / JOB)], capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed[:2] == [".", ".."] and "Data_001.zip" in listed
    assert len(listed) == len(set(listed))  # each once, also across readdir pages
    assert errno_of(lambda: (m.path / JOB).read_bytes()) == errno.EISDIR
    assert errno_of(lambda: (m.path / JOB / "Data_001.zip" / "x").stat()) == errno.ENOTDIR
    assert errno_of(lambda: os.listdir(m.path / JOB / "Data_001.zip")) == errno.ENOTDIR


def test_df_does_not_see_a_full_disk(mount: MountFactory, backup: Backup) -> None:
    m = mount()
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize >= sum(len(d) for d in backup.files.values())
    assert st.f_bfree == st.f_bavail == st.f_blocks  # 0% used, not 100%


def test_rsync_ax_copies_the_files_attributes_once_and_not_the_status(
        mount: MountFactory, tmp_path: Path) -> None:
    m = mount()
    assert "user.zohofs.status" not in os.listxattr(m.path)
    assert os.getxattr(m.path, "user.zohofs.status").startswith(b"{")  # asked for: given
    copy = tmp_path / "copy"
    first = subprocess.run(["rsync", "-aX", f"{m.path}/", f"{copy}/"], capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "user.zohofs.url" in os.listxattr(copy / JOB / "Data_001.zip")
    again = subprocess.run(["rsync", "-aXi", f"{m.path}/", f"{copy}/"], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == "", again.stdout


def test_status_of_a_dead_mount_says_what_happened(mount: MountFactory) -> None:
    m = mount()
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(20)
    result = run_zohofs("status", str(m.path))
    assert result.returncode == 2
    assert "has ended" in result.stderr and "zohofs mount" in result.stderr, result.stderr


def test_stopping_with_files_open_names_them(mount: MountFactory) -> None:
    m = mount()
    m.expect_log("unmounting with 1 files open, their readers cut off: "
                 f"{JOB}/Data_001.zip")
    fd = os.open(m.path / JOB / "Data_001.zip", os.O_RDONLY)
    try:
        os.read(fd, 1)
        wait_for(lambda: '"open_files": [{' in os.getxattr(m.path, "user.zohofs.status")
                 .decode(), 10, "the open file")
        assert m.stop() == 0
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the mount is gone
            os.close(fd)
    assert "their readers cut off" in m.log


def test_a_misspelt_setting_in_the_environment_is_a_warning(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    result = run_zohofs("ls", "--config", str(cfg), "--trust-host",
                        f"127.0.0.1:{emulator.port}", env={"ZOHOFS_CACHESIZE": "512"})
    assert result.returncode == 0, result.stderr
    assert "ignoring $ZOHOFS_CACHESIZE: not a zohofs setting (did you mean " \
           "$ZOHOFS_CACHE_SIZE?)" in result.stderr


def test_ls_warns_with_its_own_status_when_a_backup_expires_soon(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    args = ("ls", "--config", str(cfg), "--trust-host", f"127.0.0.1:{emulator.port}")
    # The emulator's links expire in 6 days.
    later = run_zohofs(*args, "--expires-within", "48h")
    assert later.returncode == 0 and "expires in" not in later.stderr, later.stderr
    soon = run_zohofs(*args, "--expires-within", "7d")
    assert soon.returncode == 3, soon.stderr
    assert f"backup {JOB} expires in 14" in soon.stderr  # 144 h, give or take
    assert "Data_001.zip" in soon.stdout  # the listing is printed all the same
    bad = run_zohofs(*args, "--expires-within", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
