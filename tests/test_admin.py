"""The rough edges an admin meets: what `ls -la`, `df`, `rsync -aX`, `zohofs status` and a
cron check see, and what the log says when a mount stops under open files."""

from __future__ import annotations

import ast
import collections
import contextlib
import csv
import errno
import io
import os
import re
import signal
import subprocess
import sys
import zipfile
from datetime import timedelta, timezone
from pathlib import Path

from tests.conftest import MiB, MountFactory, common_args, run_zohofs, write_config
from tests.helpers import Mount, data_gets, fetched, wait_for
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


def named_mount(mount_process: MountFactory, emulator: Emulator, account: EmulatedAccount,
                tmp_path: Path, *args: str) -> Mount:
    """A mount of one account named in an [[account]] table: its org has a name too."""
    cfg = tmp_path / "named.toml"
    cfg.write_text(f"""
[[account]]
name = "acme-crm"
accounts_url = "{emulator.base_url}"
api_url = "{emulator.base_url}"
client_id = "{account.client_id}"
client_secret = "{account.client_secret}"
refresh_token = "{account.refresh_token}"
""")
    cfg.chmod(0o600)
    return mount_process("--config", str(cfg), *common_args(emulator), *args)


def test_names_people_read_are_links_that_backup_tools_keep_as_links(
        mount_process: MountFactory, emulator: Emulator, account: EmulatedAccount,
        backup: Backup, tmp_path: Path) -> None:
    m = named_mount(mount_process, emulator, account, tmp_path)
    zgid, job = backup.zgid, backup.job_id
    # When the backup completed: its links' expiry less 7 days, in Zoho's zone.
    made = (emulator.links_expire.astimezone(timezone(timedelta(hours=5, minutes=30)))
            - timedelta(days=7)).date().isoformat()
    assert os.readlink(m.path / "by-name" / "acme-crm") == f"../{zgid}"
    assert os.readlink(m.path / zgid / "latest") == job
    assert os.readlink(m.path / zgid / made) == job
    assert sorted(os.listdir(m.path / zgid)) == sorted([job, "latest", made])
    data = (m.path / "by-name" / "acme-crm" / "latest" / "Data_001.zip").read_bytes()
    assert data == backup.files["Data_001.zip"]
    copy = tmp_path / "copy"
    assert subprocess.run(["rsync", "-a", f"{m.path}/", f"{copy}/"], timeout=120).returncode == 0
    assert os.readlink(copy / zgid / "latest") == job and (copy / zgid / job).is_dir()
    assert (copy / zgid / "latest").is_symlink()
    env = {**os.environ, "RESTIC_REPOSITORY": str(tmp_path / "restic"),
           "RESTIC_PASSWORD": "zohofs-test", "RESTIC_CACHE_DIR": str(tmp_path / "cache")}
    for argv in (["restic", "init"], ["restic", "backup", str(m.path)],
                 ["restic", "restore", "latest", "--target", str(tmp_path / "restored")]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    restored = tmp_path / "restored" / m.path.relative_to("/")
    assert os.readlink(restored / zgid / made) == job
    assert os.readlink(restored / "by-name" / "acme-crm") == f"../{zgid}"
    # Each file once: stored through its real folder alone, the links not followed.
    listed = subprocess.run(["restic", "ls", "latest"], env=env, capture_output=True,
                            text=True, timeout=120, check=True).stdout.splitlines()
    assert sum(line.endswith("/Data_001.zip") for line in listed) == 1, listed


def readme_block(starting: str) -> str:
    """The README's fenced code block that begins with ``starting``."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks: list[str] = re.findall(r"```\w*\n(.*?)```", text, re.S)
    return next(block for block in blocks if block.startswith(starting))


def test_the_readmes_duckdb_question_answers_from_the_mount(
        mount_process: MountFactory, emulator: Emulator, account: EmulatedAccount,
        backup: Backup, tmp_path: Path) -> None:
    # A named org: its name must not make the README's glob meet it twice.
    m = named_mount(mount_process, emulator, account, tmp_path, "--expand")
    code = readme_block("import duckdb").replace("/zoho/", f"{m.path}/")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr
    with zipfile.ZipFile(io.BytesIO(backup.files["Data_001.zip"])) as zf:
        info = zf.getinfo("Data/Leads_001.csv")
        rows = list(csv.DictReader(io.StringIO(zf.read(info).decode("utf-8-sig"))))
    counts = collections.Counter(row["Lead Source"] for row in rows)
    expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    assert ast.literal_eval(ran.stdout.strip()) == expected
    fetched_once = fetched(data_gets(emulator, "Data_001.zip"))
    assert fetched_once <= info.compress_size + 3 * MiB  # the CSV, not the part
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    assert again.stdout == ran.stdout
    assert fetched(data_gets(emulator, "Data_001.zip")) == fetched_once  # from the cache


def test_the_readmes_csv_lines_read_zohos_byte_order_mark(
        mount: MountFactory, backup: Backup) -> None:
    m = mount("--expand")
    code = readme_block("import csv, glob").replace("/zoho/", f"{m.path}/")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr
    first = ran.stdout.splitlines()[0].split()
    assert first[0].isdigit() and "@" in first[1]


SYSTEMD = Path(__file__).parents[1] / "systemd"


def unit_commands(unit: str, mountpoint: Path) -> list[str]:
    """The unit's ExecStartPre, ExecStart and ExecStartPost lines, in order, for a shell,
    with the mount point a test's."""
    commands = []
    for line in (SYSTEMD / unit).read_text().splitlines():
        key, _, command = line.partition("=")
        if key in ("ExecStartPre", "ExecStart", "ExecStartPost"):
            commands.append(command.lstrip("-").replace("/zoho", str(mountpoint)))
    return commands


def test_the_shipped_backup_job_copies_every_zip_and_restores_them_bit_for_bit(
        mount: MountFactory, backup: Backup, tmp_path: Path) -> None:
    m = mount("--expand")
    password = tmp_path / "password"
    password.write_text("zohofs-test\n")
    env = {**os.environ, "RESTIC_REPOSITORY": str(tmp_path / "repo"),
           "RESTIC_PASSWORD_FILE": str(password), "RESTIC_CACHE_DIR": str(tmp_path / "cache")}
    commands = unit_commands("zohofs-backup.service", m.path)
    assert any(c.startswith("/usr/bin/restic backup") for c in commands)
    for _ in range(2):  # a second day: the repository is there already
        for command in commands:
            done = subprocess.run(command, shell=True, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, (command, done.stderr)
    restored = tmp_path / "restored"
    subprocess.run(["restic", "restore", "latest", "--target", str(restored)], env=env,
                   check=True, capture_output=True, timeout=300)
    job = restored / m.path.relative_to("/") / JOB
    assert sorted(p.name for p in job.iterdir()) == sorted(backup.files)  # no --expand
    for name, data in backup.files.items():
        assert (job / name).read_bytes() == data, name
    # Nothing to copy from is a failure, not an empty snapshot.
    m.stop()
    first = subprocess.run(commands[0], shell=True, env=env, capture_output=True,
                           timeout=60)
    assert first.returncode != 0


def test_the_backup_units_verify(tmp_path: Path) -> None:
    for unit in ("zohofs-backup.service", "zohofs-backup.timer"):
        (tmp_path / unit).write_text((SYSTEMD / unit).read_text())
    (tmp_path / "zohofs.service").write_text((SYSTEMD / "zohofs.service").read_text()
                                             .replace("/usr/local/bin/zohofs", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify",
                             *(str(tmp_path / u) for u in ("zohofs-backup.service",
                                                            "zohofs-backup.timer"))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
