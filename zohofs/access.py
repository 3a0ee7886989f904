"""Who may read the mount: owner, group and modes, decided by the admin.

A backup is a company's customer database, so the default lets only the mounting user
read it (files 0400, folders 0500). ``uid=``, ``gid=``, ``umask=``, ``file_mode=`` and
``dir_mode=`` widen or move that, as they do for ntfs-3g, sshfs and rclone; the kernel
enforces the modes (FUSE's ``default_permissions``), so no request reaches zohofs from
someone the modes shut out. The mount is read-only: write bits are never shown.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import stat
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Everything readable, nothing writable: what a umask takes bits away from.
FILE_BITS = 0o444
DIR_BITS = 0o555
# Owner only: files 0400, folders 0500.
DEFAULT_UMASK = 0o077
_READ_EXECUTE = 0o555


def parse_octal(value: Any) -> int:
    """``"027"`` or ``"0o027"``: a mode or umask. TOML integers are refused, since
    ``umask = 27`` would silently mean 0o033."""
    if not isinstance(value, str):
        raise ValueError('write it as a string of octal digits, e.g. "027"')
    text = value.strip().lower().removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,4}", text):
        raise ValueError(f"not an octal mode: {value!r} (e.g. \"027\")")
    number = int(text, 8)
    if number > 0o777:
        raise ValueError(f"{value!r} is more than 0777")
    return number


def parse_user(value: Any) -> int:
    """A user name or a numeric uid."""
    return _parse_id(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def parse_group(value: Any) -> int:
    """A group name or a numeric gid."""
    return _parse_id(value, lambda name: grp.getgrnam(name).gr_gid, "group")


def _parse_id(value: Any, by_name: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        number = int(value)
    elif isinstance(value, str) and value.strip():
        try:
            return int(by_name(value.strip()))
        except KeyError:
            raise ValueError(f"no {what} named {value.strip()!r} on this machine") from None
    else:
        raise ValueError(f"expected a {what} name or number")
    if not 0 <= number < 2**32 - 1:
        raise ValueError(f"not a valid {what} id: {number}")
    return number


@dataclass(frozen=True)
class Access:
    """Owner, group and permission bits of everything the mount shows."""

    uid: int
    gid: int
    file_mode: int
    dir_mode: int

    @classmethod
    def from_settings(cls, *, uid: int | None = None, gid: int | None = None,
                      umask: int | None = None, file_mode: int | None = None,
                      dir_mode: int | None = None) -> Access:
        mask = DEFAULT_UMASK if umask is None else umask
        return cls(
            uid=os.getuid() if uid is None else uid,
            gid=os.getgid() if gid is None else gid,
            file_mode=(FILE_BITS & ~mask if file_mode is None else file_mode) & _READ_EXECUTE,
            dir_mode=(DIR_BITS & ~mask if dir_mode is None else dir_mode) & _READ_EXECUTE)

    def member_mode(self, zip_mode: int) -> int:
        """A member of an expanded archive: the file mode, plus the execute bits the zip
        gives it where folders have them. Who reads is the admin's choice, not that of
        whoever made the zip: its read bits are not consulted."""
        return self.file_mode | (zip_mode & self.dir_mode & 0o111)

    def readers(self, fuse_options: tuple[str, ...]) -> str:
        """Who can read a file, in words, for the log line at mount time. Without
        ``allow_other`` FUSE lets only the mounting user in, whatever the modes say."""
        if "allow_other" not in fuse_options:
            return f"user {_user_name(os.getuid())} alone (no allow_other)"
        who = [f"user {_user_name(self.uid)}"] if self.file_mode & stat.S_IRUSR else []
        if self.file_mode & stat.S_IRGRP:
            who.append(f"group {_group_name(self.gid)}")
        if self.file_mode & stat.S_IROTH:
            who.append("every local user")
        return ", ".join(who) or "nobody but root"

    def check(self, fuse_options: tuple[str, ...]) -> None:
        """Say out loud when the options do something other than the admin may think."""
        widened = bool(self.file_mode & (stat.S_IRGRP | stat.S_IROTH)) or self.uid != os.getuid()
        if "allow_other" not in fuse_options:
            if widened:
                log.warning("without allow_other FUSE lets only %s in: the uid=, gid= and "
                            "mode options give no one else access; add -o allow_other",
                            _user_name(os.getuid()))
        elif self.file_mode & stat.S_IROTH:
            log.warning("allow_other with files mode %04o: every local user can now read the "
                        "backup; give gid=GROUP and umask=027 to let one group in instead",
                        self.file_mode)
        elif self.dir_mode & stat.S_IROTH:
            log.warning("allow_other with folders mode %04o: every local user can list the "
                        "names of the backup's files (not read them)", self.dir_mode)
        elif not widened:
            log.warning("allow_other has no effect with mode %04o: only %s can read; give "
                        "gid=GROUP and umask=027 to let a group in", self.file_mode,
                        self.readers(fuse_options))


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)
