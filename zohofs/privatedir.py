"""Directories zohofs keeps private data in (the disk cache, shared tokens, its log):
made mode 0700, and refused when another local user could change what is in them.

zohofs often runs as root, and later deletes, truncates and rewrites files in these
directories: in one that somebody else can write to (or could make writable), a symbolic
link put in zohofs's way would turn that into root deleting or overwriting files of
the attacker's choice, and CRM data or tokens written where they can read them. So the
path is walked from ``/`` one name at a time, as OpenSSH checks its keys' and systemd
chases its paths: every directory on the way must belong to root or to the user zohofs
runs as and be writable by nobody else (group write allowed only for the owner's own
private group with no ACL widening it, and on the way only, a sticky directory such as
``/tmp``), every link on
the way must belong to one of them too, and no directory may be on a FUSE filesystem
another user mounted (it could report any owner, and answer differently later).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
from pathlib import Path

from zohofs.errors import ConfigError

# Links followed in one path at most, as the kernel's own limit.
MAX_LINKS = 40


class UnsafeDirectory(ConfigError):
    """Another local user could change what is in the directory: not used."""


def private_directory(path: Path, what: str, strict: bool = True) -> Path:
    """``path`` with its links followed, made (mode 0700, with any missing parents) if
    it does not exist; raises :class:`UnsafeDirectory` (``what`` names its use) when it
    is not safe, and :class:`OSError` when it cannot be made or read. Use the path
    returned: it has no links left to follow, and nothing on it another user could change.

    Not ``strict`` (a log file's folder, which may be a shared one such as Ubuntu's
    root:syslog 0775 /var/log): nothing is made, and only whose each folder and link is
    counts, not who else may write to it."""
    if "\0" in str(path):
        raise UnsafeDirectory(f"{what} {path!r} has a NUL character in it")
    walk = _Walk(path, what, strict)
    todo = list(Path(os.getcwd(), path).parts[1:])
    here = Path("/")
    walk.check(here, os.lstat(here))
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            here = here.parent  # already checked: a prefix of ``here``
            continue
        step = here / name
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            if not strict:
                raise
            with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
                os.mkdir(step, 0o700)  # each missing folder private, whatever the umask
                os.chmod(step, 0o700)
            st = os.lstat(step)
        if stat.S_ISLNK(st.st_mode):
            walk.owner(step, st, "a link")
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
            target = Path(os.readlink(step))
            todo[:0] = target.parts[1:] if target.is_absolute() else target.parts
            if target.is_absolute():
                here = Path("/")
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(step))
        walk.check(step, st)
        here = step
    walk.check(here, os.lstat(here), last=True)
    return here


class _Walk:
    def __init__(self, path: Path, what: str, strict: bool) -> None:
        self.path, self.what, self.strict = path, what, strict
        self.me = os.geteuid()
        self._fuse = _foreign_fuse_mounts(self.me)

    def check(self, directory: Path, st: os.stat_result, last: bool = False) -> None:
        self.owner(directory, st, "a folder")
        if st.st_dev in self._fuse:
            self._refuse(f"{directory} is on a FUSE filesystem {_user(self._fuse[st.st_dev])} "
                         "mounted, which could show anything: choose another directory")
        if not self.strict:
            return
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if (st.st_mode & stat.S_IWGRP and not st.st_mode & stat.S_IWOTH
                and not _has_acl(directory) and _own_group(st)):
            writable = 0  # group write for a group of the owner alone: the owner's
        if writable and (last or not st.st_mode & stat.S_ISVTX):
            self._refuse(f"{directory} is writable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):o}): chmod go-w {directory}, or choose "
                         "another directory")

    def owner(self, step: Path, st: os.stat_result, kind: str) -> None:
        if st.st_uid not in (0, self.me):
            self._refuse(f"{step} is {kind} of {_user(st.st_uid)}'s, who could replace what "
                         f"zohofs keeps there: choose a directory of {_user(self.me)}'s")

    def _refuse(self, why: str) -> None:
        raise UnsafeDirectory(f"{self.what} {self.path} is not safe: {why}")


def _foreign_fuse_mounts(me: int) -> dict[int, int]:
    """The devices of FUSE filesystems mounted by a user other than root and ``me``, and
    that user; none where /proc cannot tell."""
    try:
        with open("/proc/self/mountinfo") as f:
            return _fuse_mounted_by_others(f.read().splitlines(), me)
    except OSError:
        return {}


def _fuse_mounted_by_others(mountinfo: list[str], me: int) -> dict[int, int]:
    found: dict[int, int] = {}
    for line in mountinfo:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 3 or len(tail) < 3 or not tail[0].startswith("fuse"):
            continue
        options = dict(o.partition("=")[::2] for o in tail[2].split(","))
        user = int(options.get("user_id", "0") or 0)
        if user not in (0, me):
            major, _, minor = fields[2].partition(":")
            found[os.makedev(int(major), int(minor))] = user
    return found


def _has_acl(directory: Path) -> bool:
    """Whether an access ACL may grant more than the mode says (its group bits are then
    the ACL's mask, which named users share)."""
    try:
        os.getxattr(directory, "system.posix_acl_access", follow_symlinks=False)
    except OSError as exc:
        return exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
    return True


def _own_group(st: os.stat_result) -> bool:
    """Whether the folder's group is its owner's private group: the owner's own, with
    nobody else in it (Debian's user private groups, under umask 002)."""
    try:
        owner = pwd.getpwuid(st.st_uid)
        group = grp.getgrgid(st.st_gid)
    except KeyError:
        return False
    return (owner.pw_gid == st.st_gid and set(group.gr_mem) <= {owner.pw_name}
            and all(p.pw_gid != st.st_gid or p.pw_uid == st.st_uid for p in pwd.getpwall()))


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
