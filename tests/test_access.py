"""Who may read the mount: owner-only by default, a group when the admin says so, the
kernel enforcing it; credentials checked for real; logs that never vanish; one set of
``-o`` options for the command line and fstab."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory, common_args, run_zohofs, write_config
from tests.helpers import is_mounted, sha256, started_mounts_add, wait_for
from zohofs.access import Access, parse_group, parse_octal
from zohofs.config import SETTINGS
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import EmulatedAccount, Emulator
from zohofs.logs import file_handler
from zohofs.mountopts import parse

JOB = "757345985/4876876000001594004"
# Ids with no name on the machine: setpriv takes them as they are.
READER = 42420
GROUP = 42421
OUTSIDER = 42422


@pytest.fixture(scope="session")
def open_dir() -> Iterator[Path]:
    """A directory every user can pass through (pytest's own are root's alone), for
    mount points that other users must reach."""
    path = Path(tempfile.mkdtemp(prefix="zohofs-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)  # after every test's mounts are gone


def as_user(uid: int, groups: list[int], *command: str) -> subprocess.CompletedProcess[bytes]:
    """``command`` run with another uid and only ``groups``."""
    group_args = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", *group_args,
                           *command], capture_output=True, timeout=60, check=False)


def first_member(archive: bytes) -> tuple[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = next(i for i in zf.infolist() if not i.is_dir())
        return info.filename, zf.read(info)


# -- units -----------------------------------------------------------------------------

def test_modes_default_to_the_owner_alone_and_follow_umask_and_explicit_modes() -> None:
    default = Access.from_settings()
    assert (default.file_mode, default.dir_mode) == (0o400, 0o500)
    assert (default.uid, default.gid) == (os.getuid(), os.getgid())
    group = Access.from_settings(uid=5, gid=6, umask=0o027)
    assert (group.file_mode, group.dir_mode, group.uid, group.gid) == (0o440, 0o550, 5, 6)
    # Write bits are never shown: the mount is read-only.
    explicit = Access.from_settings(file_mode=0o664, dir_mode=0o775)
    assert (explicit.file_mode, explicit.dir_mode) == (0o444, 0o555)
    # A member keeps the zip's execute bits only where folders have them; who reads is
    # the admin's choice, whatever the zip says.
    assert group.member_mode(0o555) == 0o550 and group.member_mode(0o444) == 0o440
    assert group.member_mode(0o400) == 0o440 and default.member_mode(0o444) == 0o400
    assert "every local user" in Access.from_settings(umask=0o022).readers(("allow_other",))


def test_octal_modes_and_ids_are_parsed_or_refused_with_a_reason() -> None:
    assert parse_octal("027") == parse_octal("0o027") == 0o27
    with pytest.raises(ValueError, match="string of octal digits"):
        parse_octal(27)  # TOML's umask = 27 is decimal: never guessed
    for bad in ("0x1f", "+27", "0_27", "-27", "8"):
        with pytest.raises(ValueError, match="not an octal mode"):
            parse_octal(bad)
    assert parse_group("0") == 0 and parse_group("root") == 0
    with pytest.raises(ValueError, match="no group named"):
        parse_group("no-such-group-here")
    with pytest.raises(ValueError, match="no group named"):
        parse_group("\u0661")  # a digit, but not an ASCII one


def test_one_reading_of_mount_options_for_the_command_line_and_fstab() -> None:
    options = parse(["rw,config=/etc/z.toml,_netdev,nofail,noauto,x-systemd.automount",
                     "comment=x,allow_other,expand,uid=0,gid=root,umask=027,noatime",
                     "cache-size=512"], SETTINGS)
    assert options.config == "/etc/z.toml"
    assert options.settings == {"expand": "true", "uid": "0", "gid": "root", "umask": "027",
                                "cache_size": "512"}
    assert options.fuse == ["allow_other", "noatime"]
    with pytest.raises(ValueError, match="unknown mount option 'max_read'"):
        parse(["max_read=131072"], SETTINGS)
    # A secret given as an option by mistake is not repeated in the error.
    with pytest.raises(ValueError) as refused:
        parse(["client_secret=1000.s3cr3t"], SETTINGS)
    assert "s3cr3t" not in str(refused.value)
    # mount(8)'s own defaults: zohofs mounts nosuid and nodev whatever they say.
    assert parse(["rw,dev,suid"], SETTINGS).fuse == []
    with pytest.raises(ValueError, match="needs a value"):
        parse(["umask"], SETTINGS)


# -- real mounts -----------------------------------------------------------------------

def test_by_default_only_the_mounting_user_reads(
        mount: MountFactory, backup: Backup, open_dir: Path) -> None:
    # allow_other lets other users' requests reach the mount; the modes still stop them.
    m = mount("--expand", "-o", "allow_other", name="owner-only", where=open_dir)
    m.expect_log("allow_other has no effect with mode 0400")
    zip_path = m.path / JOB / "Data_001.zip"
    member, data = first_member(backup.files["Data_001.zip"])
    member_path = m.path / JOB / "Data_001" / member
    assert stat.S_IMODE(zip_path.stat().st_mode) == 0o400
    assert stat.S_IMODE((m.path / JOB).stat().st_mode) == 0o500
    assert stat.S_IMODE(member_path.stat().st_mode) == 0o400
    assert zip_path.stat().st_uid == os.getuid()
    assert member_path.read_bytes() == data  # the owner reads
    for path in (zip_path, member_path, m.path / JOB):
        denied = as_user(OUTSIDER, [], "cat", str(path))
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr, denied
    assert "allow_other has no effect with mode 0400" in m.log


def test_a_group_reads_the_right_bytes_and_nobody_else_reads_anything(
        mount: MountFactory, backup: Backup, open_dir: Path) -> None:
    m = mount("--expand", "-o", f"allow_other,gid={GROUP},umask=027", name="group",
              where=open_dir)
    zip_path = m.path / JOB / "Data_001.zip"
    member, data = first_member(backup.files["Data_001.zip"])
    member_path = m.path / JOB / "Data_001" / member
    assert (zip_path.stat().st_gid, stat.S_IMODE(zip_path.stat().st_mode)) == (GROUP, 0o440)
    assert stat.S_IMODE(member_path.stat().st_mode) == 0o440
    for path, expected in ((zip_path, backup.files["Data_001.zip"]), (member_path, data)):
        read = as_user(READER, [GROUP], "cat", str(path))
        assert read.returncode == 0, read.stderr
        assert sha256(read.stdout) == sha256(expected)
        denied = as_user(OUTSIDER, [], "cat", str(path))
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    listed = as_user(READER, [GROUP], "unzip", "-l", str(zip_path))
    assert listed.returncode == 0 and member.encode() in listed.stdout
    assert as_user(OUTSIDER, [], "unzip", "-l", str(zip_path)).returncode != 0
    assert re.search(r"who can read them: user \S+ \(0\), group 42421 \(files 0440", m.log)


def test_allow_other_for_everyone_is_a_warning(
        mount: MountFactory, backup: Backup, open_dir: Path) -> None:
    m = mount("-o", "allow_other", "--umask", "022", name="world", where=open_dir)
    m.expect_log("every local user can now read the backup")
    read = as_user(OUTSIDER, [], "cat", str(m.path / JOB / "Data_001.zip"))
    assert read.returncode == 0 and read.stdout == backup.files["Data_001.zip"]
    assert "WARNING zohofs.access: allow_other with files mode 0444: every local user" in m.log


def test_what_the_options_mean_is_said_when_it_is_not_what_it_seems(
        caplog: pytest.LogCaptureFixture) -> None:
    me = os.getuid()
    cases = [
        # (access, fuse options, a warning that must appear, or None for none)
        (Access.from_settings(gid=GROUP, umask=0o027), (), "without allow_other FUSE lets"),
        (Access.from_settings(umask=0o022), (), "without allow_other FUSE lets"),
        (Access.from_settings(uid=READER), ("allow_other",), None),  # the README's recipe
        (Access.from_settings(gid=GROUP, umask=0o027), ("allow_other",), None),
        (Access.from_settings(), ("allow_other",), "allow_other has no effect"),
        (Access.from_settings(gid=GROUP, file_mode=0o440, dir_mode=0o555), ("allow_other",),
         "every local user can list the names"),
        (Access.from_settings(), (), None),
    ]
    for access, options, warning in cases:
        caplog.clear()
        access.check(options)
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert (warned == []) if warning is None else (warning in " ".join(warned)), (
            access, options, warned)
    assert Access.from_settings(uid=READER).readers(()) .startswith("user ")
    assert f"({me}) alone" in Access.from_settings(uid=READER).readers(())


def test_flags_and_config_keys_set_owner_and_modes(
        oauth_mount: MountFactory) -> None:
    m = oauth_mount("--uid", str(READER), "--file-mode", "0440", "-o", "allow_other",
                    name="flags",
                    extra=f'gid = "{GROUP}"\ndir_mode = "0550"')
    st = (m.path / JOB / "Data_001.zip").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (READER, GROUP, 0o440)
    assert stat.S_IMODE((m.path / JOB).stat().st_mode) == 0o550


def test_every_readme_option_mounts_from_fstab_and_from_the_command_line(
        oauth_mount: MountFactory, emulator: Emulator, account: EmulatedAccount,
        backup: Backup, tmp_path: Path) -> None:
    options = (f"_netdev,nofail,noauto,x-systemd.automount,comment=zohofs,allow_other,expand,"
               f"gid={GROUP},umask=027,noatime")
    cfg = write_config(tmp_path / "c.toml", emulator, account,
                       f'trust_hosts = ["127.0.0.1:{emulator.port}"]')
    # The command line takes fstab's options, config= included.
    m = oauth_mount("-o", f"rw,config={cfg}," + options, name="cli")
    by_fstab = tmp_path / "fstab-mnt"
    by_fstab.mkdir()
    started_mounts_add(by_fstab)
    fstab = tmp_path / "fstab"
    program = Path(sys.executable).parent / "zohofs"
    fstab.write_text(f"{program}#zoho {by_fstab} fuse config={cfg},{options} 0 0\n")
    result = subprocess.run(["mount", "--fstab", str(fstab), str(by_fstab)],
                            capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        for root in (m.path, by_fstab):
            st = (root / JOB / "Data_001.zip").stat()
            assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (GROUP, 0o440)
            assert (root / JOB / "Data_001").is_dir()  # expand
            line = next(line for line in Path("/proc/mounts").read_text().splitlines()
                        if line.split()[1] == str(root))
            flags = line.split()[3].split(",")
            assert {"ro", "nosuid", "nodev", "noatime"} <= set(flags), line
            assert "allow_other" in line
    finally:
        subprocess.run(["umount", str(by_fstab)], capture_output=True, check=False)
    wait_for(lambda: not is_mounted(by_fstab), 10, "the unmount")


@pytest.mark.parametrize("option, message", [
    ("max_read=131072", "unknown mount option 'max_read'"),
    ("blkdev", "unknown mount option 'blkdev'"),
    ("umask=99", "not an octal mode"),
])
def test_a_bad_mount_option_is_named_and_mounts_nothing(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path, option: str,
        message: str) -> None:
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    mnt = tmp_path / "m"
    mnt.mkdir()
    for argv in (["mount", str(mnt), "-o", f"config={cfg},{option}"],
                 ["zoho", str(mnt), "-o", f"rw,config={cfg},{option}"]):  # mount(8)'s call
        result = run_zohofs(*argv)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not is_mounted(mnt)


# -- credentials -----------------------------------------------------------------------

@pytest.mark.parametrize("wrong, message", [
    ("client_secret", "wrong client secret"),
    ("refresh_token", "refresh token is invalid"),
])
def test_wrong_credentials_fail_at_start_whatever_the_token_store_holds(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path,
        private_token_store: Path, wrong: str, message: str) -> None:
    trust = ("--trust-host", f"127.0.0.1:{emulator.port}")
    good = write_config(tmp_path / "good.toml", emulator, account)
    assert run_zohofs("ls", "--config", str(good), *trust).returncode == 0
    assert list(private_token_store.glob("tokens-*.json"))  # a valid token is stored
    text = good.read_text().replace(getattr(account, wrong), "1000.garbage")
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    bad.chmod(0o600)
    listed = run_zohofs("ls", "--config", str(bad), *trust)
    assert listed.returncode == 2 and message in listed.stderr, listed.stderr
    mnt = tmp_path / "m"
    mnt.mkdir()
    mounted = run_zohofs("mount", str(mnt), "--config", str(bad), *trust)
    assert mounted.returncode == 2 and message in mounted.stderr, mounted.stderr
    assert not is_mounted(mnt)
    for stored in private_token_store.glob("tokens-*.json"):
        content = stored.read_text()
        assert account.client_secret not in content and account.refresh_token not in content


# -- logs ------------------------------------------------------------------------------

def syslog_answers() -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect("/dev/log")
        return True
    except OSError:
        return False


def test_a_background_mount_says_where_it_logs_and_logs_there(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path,
        private_token_store: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    mnt = tmp_path / "m"
    mnt.mkdir()
    started_mounts_add(mnt)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    result = subprocess.run(
        [sys.executable, "-m", "zohofs", "mount", str(mnt), "--background", "--config",
         str(cfg), *common_args(emulator)], capture_output=True, text=True, timeout=60,
        env=env)
    try:
        assert result.returncode == 0, result.stderr
        if syslog_answers():
            assert "zohofs: logging to syslog" in result.stderr
            return
        log_file = private_token_store / "zohofs.log"
        assert f"zohofs: logging to {log_file}" in result.stderr
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        wait_for(lambda: "mounted 4 files" in log_file.read_text(), 10, "the log line")
        pid = int(re.findall(r"zohofs\[(\d+)\]", log_file.read_text())[-1])
        os.kill(pid, signal.SIGUSR1)  # the hang dump must land somewhere too
        wait_for(lambda: "thread" in log_file.read_text().split("SIGUSR1", 1)[-1], 10,
                 "the dump")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
    wait_for(lambda: not is_mounted(mnt), 10, "the unmount")


def test_log_file_and_log_level(oauth_mount: MountFactory, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "zohofs.log"
    log_file.parent.mkdir()
    m = oauth_mount("--log-file", str(log_file), "--log-level", "debug", name="logged")
    (m.path / JOB / "Data_001.zip").read_bytes()
    assert m.stop() == 0
    text = log_file.read_text()
    assert "mounted 4 files" in text and "DEBUG" in text and "unmounted" in text
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert "mounted 4 files" not in m.log  # the file, not the terminal


def test_a_log_file_others_can_read_is_a_warning(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "open.log"
    path.write_text("")
    path.chmod(0o644)
    file_handler(str(path)).close()
    assert "readable by group or others (mode 644)" in caplog.text
    caplog.clear()
    file_handler(str(tmp_path / "new.log")).close()
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600
    assert not caplog.text


def test_an_inherited_journal_stream_is_not_the_journal(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path,
        private_token_store: Path) -> None:
    """A JOURNAL_STREAM that names another stream (a terminal started by a systemd user
    service passes it on) must not make a background mount log to our stderr."""
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    mnt = tmp_path / "m"
    mnt.mkdir()
    started_mounts_add(mnt)
    result = subprocess.run(
        [sys.executable, "-m", "zohofs", "mount", str(mnt), "--background", "--config",
         str(cfg), *common_args(emulator)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "JOURNAL_STREAM": "8:12345"})
    try:
        assert result.returncode == 0, result.stderr
        assert "zohofs: logging to" in result.stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
    wait_for(lambda: not is_mounted(mnt), 10, "the unmount")


# -- the shipped service ---------------------------------------------------------------

UNIT = Path(__file__).parents[1] / "systemd" / "zohofs.service"


def test_the_service_is_sandboxed_and_lets_only_its_group_read() -> None:
    unit = UNIT.read_text()
    assert "-o allow_other,gid=zoho-backup,umask=027" in unit
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    level = float(re.findall(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)[0])
    assert level <= 4.5, result.stdout


def test_the_mount_works_with_the_services_privileges(
        emulator: Emulator, account: EmulatedAccount, backup: Backup, open_dir: Path,
        tmp_path: Path) -> None:
    """What the unit's sandbox leaves (CAP_SYS_ADMIN alone, no new privileges, umask
    077), approximated with setpriv: the mount comes up and the group reads."""
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    mnt = open_dir / "service"
    mnt.mkdir()
    started_mounts_add(mnt)
    result = subprocess.run(
        ["setpriv", "--no-new-privs", "--bounding-set=-all,+sys_admin", "--inh-caps=-all",
         "sh", "-c", 'umask 077 && exec "$@"', "sh",
         sys.executable, "-m", "zohofs", "mount", str(mnt), "--background",
         "--config", str(cfg), *common_args(emulator),
         "-o", f"allow_other,gid={GROUP},umask=027"],
        capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        read = as_user(READER, [GROUP], "cat", str(mnt / JOB / "Data_001.zip"))
        assert read.returncode == 0 and read.stdout == backup.files["Data_001.zip"]
        assert as_user(OUTSIDER, [], "cat", str(mnt / JOB / "Data_001.zip")).returncode != 0
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
    wait_for(lambda: not is_mounted(mnt), 10, "the unmount")


def test_a_revoked_refresh_token_works_until_its_access_token_is_refused(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path) -> None:
    """What docs/semantics.md says: zohofs cannot know of a revocation before Zoho
    refuses something, and asking Zoho at every start would spend its token budget."""
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    trust = ("--trust-host", f"127.0.0.1:{emulator.port}")
    assert run_zohofs("ls", "--config", str(cfg), *trust).returncode == 0
    del emulator.accounts[account.refresh_token]  # revoked in Zoho's console
    assert run_zohofs("ls", "--config", str(cfg), *trust).returncode == 0  # token cached
    emulator.expire_access_tokens()
    refused = run_zohofs("ls", "--config", str(cfg), *trust)
    assert refused.returncode == 2 and "invalid_code" in refused.stderr, refused.stderr
