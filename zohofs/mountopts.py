"""The ``-o`` options: one reading for ``zohofs mount -o`` and for an fstab line.

mount(8) calls ``zohofs SOURCE MOUNTPOINT -o OPTIONS`` with everything the fstab line
says, its own options included; a command line may say the same. So each option is one
of: a zohofs setting (``expand``, ``uid=``, ``cache_size=``, ``config=`` ...), an option
for mount(8) or systemd that zohofs accepts and ignores (``_netdev``, ``nofail``,
``x-systemd.*`` ...), or a FUSE option zohofs knows to work. Anything else is an error
that names it, before anything is mounted.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field

# For mount(8), systemd or fstab's reader, not for the filesystem. mount(8) passes its
# defaults (rw, dev, suid) to the helper: the mount is read-only, nosuid and nodev
# whatever they say.
IGNORED = frozenset({"rw", "dev", "suid", "defaults", "auto", "noauto", "user", "users",
                     "nouser", "owner", "group", "_netdev", "nofail", "async", "sync",
                     "dirsync"})
IGNORED_PREFIXES = ("x-", "X-", "comment=")
# FUSE options that mount and serve as they should (each one is mounted in the tests).
FUSE_OPTIONS = frozenset({"allow_other", "allow_root", "auto_unmount", "default_permissions",
                          "ro", "nosuid", "nodev", "noexec", "exec", "noatime", "atime",
                          "nodiratime", "relatime", "strictatime"})
# Settings that may be given without a value.
FLAGS = frozenset({"expand", "page_cache"})
# Always on: the kernel checks the modes (access.py), and a backup holds no devices or
# set-uid programs to honour.
ALWAYS = ("default_permissions", "nosuid", "nodev", "ro")


@dataclass
class MountOptions:
    settings: dict[str, str] = field(default_factory=dict)
    fuse: list[str] = field(default_factory=list)
    config: str | None = None


def fuse_option(option: str) -> str:
    """``option`` if it is a FUSE option zohofs passes on; else ValueError saying why."""
    if option in FUSE_OPTIONS:
        return option
    # The name alone: a secret given as an option by mistake must not reach the log.
    raise ValueError(f"unknown mount option {option.partition('=')[0]!r} (FUSE options "
                     f"zohofs takes: "
                     f"{', '.join(sorted(FUSE_OPTIONS))}; and its own settings, e.g. "
                     "expand, uid=, gid=, umask=, config=)")


def parse(words: Iterable[str], settings: Container[str]) -> MountOptions:
    """Sort comma-separated ``-o`` words into settings, FUSE options and ``config=``."""
    found = MountOptions()
    for word in words:
        for option in filter(None, (o.strip() for o in word.split(","))):
            key, has_value, value = option.partition("=")
            name = key.replace("-", "_")
            if key == "config":
                if not value:
                    raise ValueError("config= needs a file name")
                found.config = value
            elif name in settings and name != "fuse_options":
                if not has_value and name not in FLAGS:
                    raise ValueError(f"mount option {key}= needs a value")
                found.settings[name] = value if has_value else "true"
            elif option in IGNORED or option.startswith(IGNORED_PREFIXES):
                continue
            else:
                found.fuse.append(fuse_option(option))
    return found

