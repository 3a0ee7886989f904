"""Directories zohofs deletes and rewrites files in (the disk cache, shared tokens), and
its log file: refused when another local user could put a link in zohofs's way, before
anything in them is touched."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MountFactory, run_zohofs
from tests.helpers import started_mounts_add
from zohofs import privatedir
from zohofs.diskcache import LAYOUT, DiskCache
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import Emulator
from zohofs.errors import ConfigError
from zohofs.logs import file_handler
from zohofs.privatedir import UnsafeDirectory, private_directory

NOBODY = 65534
JOB = "757345985/4876876000001594004"
LINK = "https://download-accl.zoho.com/v2/crm/1/backup/2/Data_001.zip"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory of somebody's files that a link planted in zohofs's way points at."""
    path = tmp_path / "victim"
    path.mkdir(mode=0o755)
    (path / "precious.txt").write_text("not zohofs's\n")
    return path


def untouched(victim: Path) -> bool:
    return ([p.name for p in victim.iterdir()] == ["precious.txt"]
            and stat.S_IMODE(victim.stat().st_mode) == 0o755)


def planted(tmp_path: Path, victim: Path, mode: int) -> Path:
    """A cache directory of ``mode`` whose layout directory is a link to ``victim``."""
    directory = tmp_path / "cache"
    directory.mkdir()
    directory.chmod(mode)
    (directory / LAYOUT).symlink_to(victim)
    return directory


def refused_mount(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``zohofs mount`` expected to refuse: should it mount, the suite's end unmounts it."""
    path.mkdir()
    started_mounts_add(path)
    return run_zohofs("mount", str(path), *args, timeout=20)


def test_a_new_directory_is_made_private(tmp_path: Path) -> None:
    made = private_directory(tmp_path / "a" / "b", "the test's directory")
    assert made == (tmp_path / "a" / "b").resolve()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_one_anybody_may_write_to_is_refused_and_left_alone(tmp_path: Path) -> None:
    open_to_all = tmp_path / "shared"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match=r"writable by group or others \(mode 777\)"):
        private_directory(open_to_all, "the test's directory")
    with pytest.raises(UnsafeDirectory, match="writable by group or others"):
        private_directory(open_to_all / "inside" / "deeper", "the test's directory")
    assert stat.S_IMODE(open_to_all.stat().st_mode) == 0o777
    assert list(open_to_all.iterdir()) == []  # nothing made in it


def test_a_sticky_ancestor_is_safe_but_not_as_the_directory_itself(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: others may not rename what is not theirs
    assert private_directory(sticky / "mine", "the test's directory") == (sticky / "mine")
    with pytest.raises(UnsafeDirectory):
        private_directory(sticky, "the test's directory")


def test_one_another_user_owns_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, -1)
    with pytest.raises(UnsafeDirectory, match=f"{theirs} is a folder of (nobody|uid {NOBODY})'s"):
        private_directory(theirs / "cache", "the test's directory")
    assert not (theirs / "cache").exists()


def test_the_admins_link_is_followed_once_and_checked_where_it_leads(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    assert private_directory(tmp_path / "link", "the test's directory") == real.resolve()
    real.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match=str(real.resolve())):
        private_directory(tmp_path / "link", "the test's directory")


def test_a_link_of_another_users_on_the_way_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    os.lchown(tmp_path / "link", NOBODY, -1)  # as if planted where others may write
    with pytest.raises(UnsafeDirectory, match=f"{tmp_path / 'link'} is a link of "):
        private_directory(tmp_path / "link" / "cache", "the test's directory")
    assert list(real.iterdir()) == []


def test_missing_parents_are_made_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = private_directory(tmp_path / "a" / "b" / "c", "the test's directory")
    finally:
        os.umask(old)
    for folder in (made, made.parent, made.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_folder_its_group_may_write_to_is_refused_unless_the_group_is_the_owners(
        tmp_path: Path) -> None:
    shared = tmp_path / "group"
    shared.mkdir()
    os.chown(shared, os.geteuid(), 54321)  # a group nobody's own
    shared.chmod(0o770)
    with pytest.raises(UnsafeDirectory, match=r"writable by group or others \(mode 770\)"):
        private_directory(shared / "cache", "the test's directory")


def test_an_acl_granting_write_is_not_taken_for_the_owners_group(tmp_path: Path) -> None:
    granted = tmp_path / "granted"
    granted.mkdir(mode=0o755)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rwx", str(granted)], check=True)
    assert stat.S_IMODE(granted.stat().st_mode) == 0o775  # the ACL's mask, as group bits
    with pytest.raises(UnsafeDirectory, match=r"writable by group or others \(mode 775\)"):
        private_directory(granted / "cache", "the test's directory")


def test_a_fuse_filesystem_another_user_mounted_is_not_trusted() -> None:
    me = os.geteuid()
    mountinfo = [  # as /proc/self/mountinfo says them
        "36 25 0:52 / /tmp/dc rw,nosuid,nodev - fuse.evil evil rw,user_id=1001,group_id=1001",
        "37 25 0:53 / /zoho ro,nosuid,nodev - fuse zohofs ro,user_id=0,group_id=0",
        f"38 25 0:54 / /home/me/m rw - fuse.sshfs me@h rw,user_id={me},group_id=0",
        "39 25 8:1 / /srv rw - ext4 /dev/sda1 rw",
    ]
    assert privatedir._fuse_mounted_by_others(mountinfo, me) == {os.makedev(0, 52): 1001}


def test_a_mount_refuses_a_cache_directory_others_could_write_to(
        tmp_path: Path, victim: Path, token_file: Path) -> None:
    cache = planted(tmp_path, victim, 0o777)
    refused = refused_mount(tmp_path / "mnt", "--cache-dir", str(cache), "--link", LINK,
                            "--access-token-file", str(token_file))
    assert refused.returncode == 2, refused.stderr
    assert f"the cache directory {cache} is not safe" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert untouched(victim)
    cleared = run_zohofs("cache", "clear", "--cache-dir", str(cache))
    assert cleared.returncode == 2 and "is not safe" in cleared.stderr
    assert untouched(victim)


def test_a_link_in_place_of_the_cache_is_never_followed(
        tmp_path: Path, victim: Path, token_file: Path) -> None:
    cache = planted(tmp_path, victim, 0o700)  # safe, but a link where zohofs's folder goes
    refused = refused_mount(tmp_path / "mnt", "--cache-dir", str(cache), "--link", LINK,
                            "--access-token-file", str(token_file))
    assert refused.returncode == 2
    assert f"{cache / LAYOUT} is a link, not the directory zohofs makes there" in refused.stderr
    cleared = run_zohofs("cache", "clear", "--cache-dir", str(cache))
    assert cleared.returncode == 2 and "is a link, not the directory" in cleared.stderr
    assert untouched(victim)


@pytest.mark.parametrize("kind", ["file", "folder of another user's"])
def test_something_else_in_place_of_the_cache_is_refused_and_left(
        tmp_path: Path, kind: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if kind == "file":
        (cache / LAYOUT).write_text("not zohofs's\n")
        expected = "is not a directory, not the directory zohofs makes there"
    else:
        (cache / LAYOUT).mkdir(mode=0o755)
        (cache / LAYOUT / "precious.txt").write_text("not zohofs's\n")
        os.chown(cache / LAYOUT, NOBODY, -1)
        expected = f"is owned by uid {NOBODY}, not the directory zohofs makes there"
    with pytest.raises(UnsafeDirectory, match=expected):
        DiskCache(cache, 1 << 20).open()
    if kind == "file":
        assert (cache / LAYOUT).read_text() == "not zohofs's\n"
    else:
        assert [p.name for p in (cache / LAYOUT).iterdir()] == ["precious.txt"]
        assert stat.S_IMODE((cache / LAYOUT).stat().st_mode) == 0o755


def test_tokens_are_not_shared_through_a_directory_others_could_write_to(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    shared = tmp_path / "shared-state"
    shared.mkdir()
    shared.chmod(0o777)
    m = oauth_mount(env={"XDG_STATE_HOME": str(shared)})
    m.expect_log("is not safe.*keeps its tokens to itself")
    # It still signs in and reads, its tokens its own.
    assert (m.path / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]
    assert re.search(re.escape(f"the token store's directory {shared / 'zohofs'} is not "
                               f"safe: {shared} is writable by group or others (mode 777)")
                     + ".*keeps its tokens to itself", m.log)
    assert list(shared.iterdir()) == []
    listed = run_zohofs("ls", "--config", str(tmp_path / "mnt.toml"), "--trust-host",
                        f"127.0.0.1:{emulator.port}", env={"XDG_STATE_HOME": str(shared)})
    assert listed.returncode == 0 and "keeps its tokens to itself" in listed.stderr


def test_a_log_file_is_never_appended_through_another_users_link_or_name(
        tmp_path: Path, victim: Path) -> None:
    precious = victim / "precious.txt"
    planted_link = tmp_path / "link.log"
    planted_link.symlink_to(precious)
    os.lchown(planted_link, NOBODY, -1)
    hard = tmp_path / "hard.log"
    os.link(precious, hard)
    theirs = tmp_path / "theirs.log"
    theirs.write_text("")
    os.chown(theirs, NOBODY, -1)
    for path, why in ((planted_link, "a link of another user's"),
                      (hard, "a second name of another file"), (theirs, "another user's")):
        with pytest.raises(ConfigError, match=f"the log file {path} is {why}"):
            file_handler(str(path))
    assert precious.read_text() == "not zohofs's\n"
    shared = tmp_path / "shared"  # one others may write to, as Ubuntu's /var/log
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "sub").symlink_to(victim)  # planted by another user
    os.lchown(shared / "sub", NOBODY, -1)
    with pytest.raises(ConfigError, match=f"{shared / 'sub'} is a link of "):
        file_handler(str(shared / "sub" / "precious.txt"))
    file_handler(str(shared / "mine.log")).close()  # the folder itself is fine
    fifo = tmp_path / "fifo.log"  # another user's reader behind it, or none: start hangs
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=f"the log file {fifo} is not a file"):
        file_handler(str(fifo))
    own = tmp_path / "own.log"  # the admin's own link, and a new file: as before
    own.symlink_to(tmp_path / "new.log")
    file_handler(str(own)).close()
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600


def test_a_log_file_replaced_by_another_users_is_not_reopened_nor_fails_the_caller(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "zohofs.log"
    handler = file_handler(str(path))
    log = logging.getLogger("test_private_dirs.rotated")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("first")
        path.rename(tmp_path / "zohofs.log.1")  # rotated away, and another user's put there
        path.write_text("")
        os.chown(path, NOBODY, -1)
        log.warning("second")
        log.warning("third")  # neither raises, and the refusal is said once
        assert capsys.readouterr().err.count(f"cannot log to {path}") == 1
        assert path.read_text() == ""
        path.unlink()  # the admin cleans up: logging resumes, in a file of its own
        log.warning("fourth")
        assert "fourth" in path.read_text() and path.stat().st_uid == os.geteuid()
    finally:
        log.removeHandler(handler)
        handler.close()


def test_the_process_own_stdout_is_a_fine_log_file_whoever_made_it(tmp_path: Path) -> None:
    out = tmp_path / "out.log"  # as `sudo zohofs … --log-file /dev/stdout >> ~/out.log`
    out.write_text("")
    os.chown(out, NOBODY, -1)
    with open(out, "a") as f:
        done = subprocess.run(
            [sys.executable, "-c", "import logging\nfrom zohofs.logs import file_handler\n"
             "h = file_handler('/dev/stdout')\nlogging.getLogger().addHandler(h)\n"
             "logging.getLogger().warning('to stdout')"], stdout=f, stderr=subprocess.PIPE,
            text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "to stdout" in out.read_text()
