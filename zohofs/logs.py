"""Logging set-up: journald-friendly, quiet libraries, no secrets."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from zohofs.errors import ConfigError
from zohofs.privatedir import private_directory

_JOURNAL_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    """Prefix each line with ``<N>`` so journald records the right priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


_PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(debug: bool, level: str | None = None, log_file: str | None = None) -> None:
    """Log to ``log_file`` if given, else to stderr (journald's format under systemd)."""
    handler: logging.Handler
    if log_file:
        handler = file_handler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(logging.Formatter(_PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level else logging.DEBUG if debug else logging.INFO)
    # Per-request lines from the HTTP libraries are noise, and httpx's carry URLs.
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # pyfuse3's debug output is one line per kernel request: only with --debug.
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.INFO)


def stderr_is_journal() -> bool:
    """Whether our stderr is journald's stream (systemd says which in $JOURNAL_STREAM,
    as device:inode); a variable merely inherited from a parent that systemd started
    does not count."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _PrivateFileHandler(logging.handlers.WatchedFileHandler):
    """Reopens a file rotated away as it made it first: mode 0600, whatever the umask;
    while the path is refused, records go nowhere (said once on stderr), never into a
    file another user put there."""

    _refused = False

    def _open(self) -> Any:
        return os.fdopen(_open_log(self.baseFilename), "a", encoding=self.encoding,
                         errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
            self._refused = False
        except (ConfigError, OSError) as exc:  # from reopening: the logging call must not fail
            self.stream = None  # reopened at the next record
            if not self._refused:
                self._refused = True
                print(f"zohofs: cannot log to {self.baseFilename}: {exc}", file=sys.stderr)


def _open_log(path: str) -> int:
    """``path`` opened to append (made mode 0600), never through another user's link nor
    into their file, a pipe they read, or a second name of some other file (a hard link):
    zohofs, root often, would append to a file of their choosing, or write member names
    where they read them. The process's own stdout and stderr are always fine."""
    me = os.geteuid()
    # The folders on the way: none of another user's, no link of theirs (their writing
    # to a folder alone is allowed: Ubuntu's /var/log is root:syslog 0775).
    where = private_directory(Path(path).parent, "the log file's folder",
                              strict=False) / Path(path).name
    follow = False
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(where)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, me):
                raise ConfigError(f"the log file {path} is a link of another user's: "
                                  "give a path of your own")
            follow = True  # the admin's own (/dev/stdout is one)
        elif not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise ConfigError(f"the log file {path} is not a file: give a path of your own")
    # O_NONBLOCK: a FIFO nobody reads must not hang the start; cleared below.
    fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
                 | (0 if follow else os.O_NOFOLLOW), 0o600)
    st = os.fstat(fd)
    why = None
    if (st.st_dev, st.st_ino) in _standard_streams():
        pass
    elif st.st_uid not in (0, me):
        why = "another user's"
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        why = "not a file"
    elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        why = "a second name of another file"
    if why:
        os.close(fd)
        raise ConfigError(f"the log file {path} is {why}: give a path of your own")
    os.set_blocking(fd, True)
    return fd


def _standard_streams() -> set[tuple[int, int]]:
    found = set()
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            found.add((st.st_dev, st.st_ino))
    return found


def file_handler(path: str) -> logging.Handler:
    """Appends to ``path``, created mode 0600 (names of members are customer data); a
    file rotated away by logrotate is reopened."""
    try:
        handler = _PrivateFileHandler(path, encoding="utf-8")  # opens it, with _open_log
        assert handler.stream is not None  # opened at once (no delay=True)
        mode = os.fstat(handler.stream.fileno()).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot write the log file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        logging.getLogger(__name__).warning(
            "the log file %s is readable by group or others (mode %o): it will hold names "
            "of backup files; chmod 600 it", path, mode & 0o777)
    handler.setFormatter(logging.Formatter("%(asctime)s zohofs[%(process)d] %(levelname)s "
                                           "%(name)s: %(message)s"))
    return handler


def background_handler(state: Path, syslog: str = "/dev/log") -> tuple[logging.Handler, str]:
    """Where a mount in the background logs when nobody set a file and systemd did not
    start it: syslog if it answers, else a file in the state directory. Returns the
    handler and where it writes, in words."""
    if _answers(syslog):
        handler = logging.handlers.SysLogHandler(address=syslog)
        handler.setFormatter(logging.Formatter("zohofs[%(process)d]: %(name)s: %(message)s"))
        return handler, "syslog"
    try:
        state = private_directory(state, "the state directory (for a log file; or give "
                                  "--log-file)")
    except OSError as exc:
        raise ConfigError(f"no syslog, and cannot make {state} for a log file: "
                          f"{exc.strerror}; give --log-file") from None
    path = str(state / "zohofs.log")
    return file_handler(path), path


def _answers(address: str) -> bool:
    # SysLogHandler swallows a failed connect and then fails on every line: ask first.
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_UNIX, kind) as s:
                s.connect(address)
            return True
        except OSError:
            continue
    return False


def redact_url(url: str) -> str:
    """The URL without query and fragment: those are where tokens hide."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
