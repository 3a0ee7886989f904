"""Directories zohofs keeps private data in (the disk cache, shared tokens, its log):
made mode 0700, and refused when another local user could change what is in them.

zohofs often runs as root, and later deletes, truncates and rewrites files in these
directories: in one that somebody else can write to (or could make writable), a symbolic
link put in zohofs's way would turn that into root deleting or overwriting files of
the attacker's choice, and CRM data or tokens written where they can read them. So, as
OpenSSH does for its keys, every directory from ``/`` down must belong to root or to
the user zohofs runs as, and none may be writable by group or others, except an
ancestor with the sticky bit (``/tmp``: nobody else may rename what is in it).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from zohofs.errors import ConfigError


class UnsafeDirectory(ConfigError):
    """Another local user could change what is in the directory: not used."""


def private_directory(path: Path, what: str, create: bool = True) -> Path:
    """``path`` resolved, made (mode 0700, with its missing parents) if ``create``;
    raises :class:`UnsafeDirectory` (``what`` names its use) when it is not safe, and
    :class:`OSError` when it cannot be made or read. Use the path returned: links in the
    one given were followed once, here, where they were checked."""
    if create and not path.exists():
        existing = next(p for p in path.parents if p.exists())
        _check(path, what, existing.resolve(), ancestor=True)  # nothing made in an unsafe one
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    resolved = path.resolve(strict=True)
    if not resolved.is_dir():
        raise UnsafeDirectory(f"{what} {path} is not a directory")
    _check(path, what, resolved, ancestor=False)
    return resolved


def _check(path: Path, what: str, resolved: Path, ancestor: bool) -> None:
    me = os.geteuid()
    for part in (*reversed(resolved.parents), resolved):
        st = os.lstat(part)
        if st.st_uid not in (0, me):
            raise UnsafeDirectory(
                f"{what} {path} is not safe: {part} belongs to {_user(st.st_uid)}, who could "
                f"replace what zohofs keeps there; choose a directory of {_user(me)}'s")
        sticky = (ancestor or part != resolved) and st.st_mode & stat.S_ISVTX
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
            raise UnsafeDirectory(
                f"{what} {path} is not safe: {part} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}), who could replace what zohofs keeps "
                f"there; chmod go-w {part}, or choose another directory")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
