"""Command line: ``zohofs mount | ls | login | emulator | demo``; owns the FUSE lifecycle."""

from __future__ import annotations

import argparse
import ctypes
import errno
import getpass
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pyfuse3
import trio

from zohofs import __version__, config, login, mountopts
from zohofs.auth import Credentials
from zohofs.config import Config, MiB, access_token, parse_size
from zohofs.diagnose import dump_on_usr1
from zohofs.errors import ConfigError, ZohofsError
from zohofs.fs import ZohoFS, view_name
from zohofs.hosts import DATA_CENTRES
from zohofs.logs import background_handler
from zohofs.logs import setup as setup_logging
from zohofs.operations import Operations
from zohofs.runtime import fatal_sign_in_errors, open_runtime, read_links
from zohofs.tokenstore import state_directory

log = logging.getLogger("zohofs")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter
# How long in-flight requests get to finish after SIGTERM before they are cancelled.
SHUTDOWN_GRACE = 2.0
# Discovery and size probes run before the mount goes live; a host that hangs must not
# keep it from coming up (what is missing is fetched on access or at the next listing).
STARTUP_DEADLINE = 30.0


# -- arguments -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zohofs", description=(
        "Mount Zoho CRM backups as a read-only filesystem."))
    parser.add_argument("--version", action="version", version=f"zohofs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount backups (runs in the foreground)")
    m.add_argument("mountpoint")
    m.add_argument("--background", action="store_true",
                   help="go to the background once the mount is live (what mount(8) and "
                        "fstab expect); start-up errors are reported before that")
    _add_source_options(m)
    _add_mount_options(m)

    st = sub.add_parser("status", help="what a running mount is doing")
    st.add_argument("mountpoint")
    st.add_argument("--json", action="store_true", help="print the figures as JSON")
    st.add_argument("--watch", action="store_true", help="refresh every second, like top")

    ls = sub.add_parser("ls", help="list what would be mounted, without mounting")
    _add_source_options(ls)

    lg = sub.add_parser("login", help="one-time set-up: grant code -> stored refresh token")
    _add_account_options(lg)
    lg.add_argument("--code-file", metavar="FILE", help="read the grant code from FILE")
    lg.add_argument("--output", metavar="FILE", type=Path,
                    help=f"where to store the refresh token (default {login.default_token_path()})")
    lg.add_argument("--ca-file", metavar="PEM", help="also trust this CA ($SSL_CERT_FILE too)")
    lg.add_argument("-d", "--debug", action="store_true", help="log every request")

    e = sub.add_parser("emulator", help="run the built-in Zoho emulator")
    e.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    e.add_argument("--port", type=int, default=0, help="port to listen on (default: any free)")
    e.add_argument("--tls", action="store_true", help="serve https with a self-signed CA")
    e.add_argument("--ca-out", metavar="FILE", help="where to write the CA (with --tls)")
    e.add_argument("--token", default="emulator-token",
                   help="an access token it accepts for downloads, besides issued ones")
    e.add_argument("--token-lifetime", type=int, default=3600, metavar="SECONDS",
                   help="lifetime of the access tokens it issues (default %(default)s)")
    e.add_argument("--data-dir", type=Path,
                   help="serve zips found under v2/crm/<zgid>/backup/<job>/ here")
    e.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long before each answer's first byte (e.g. 0.03)")
    e.add_argument("--rate", metavar="SIZE",
                   help="cap each connection at SIZE bytes per second (e.g. 20M)")
    _add_backup_options(e)
    e.add_argument("-d", "--debug", action="store_true", help="log every request it serves")

    d = sub.add_parser("demo", help="mount a generated backup served by the emulator")
    d.add_argument("mountpoint", nargs="?", default="./zoho-demo")
    _add_backup_options(d, part_size="16M")  # small parts, so the demo shows several
    d.add_argument("--expand", action="store_true",
                   help="also show each zip's files in a folder next to it")
    d.add_argument("-d", "--debug", action="store_true", help="log every request")
    return parser


def _add_account_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (default $XDG_CONFIG_HOME/zohofs/config.toml, "
                        "then /etc/zohofs/config.toml)")
    p.add_argument("--strict", action="store_true",
                   help="refuse secret files readable by group or others")
    p.add_argument("--dc", choices=sorted(DATA_CENTRES), help="Zoho data centre (default us)")
    p.add_argument("--accounts-url", metavar="URL", help="override the accounts server")
    p.add_argument("--client-id-file", metavar="FILE",
                   help="the Self Client's client id (else $ZOHO_CLIENT_ID or the config)")
    p.add_argument("--client-secret-file", metavar="FILE",
                   help="its client secret (else $ZOHO_CLIENT_SECRET or the config)")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    _add_account_options(p)
    p.add_argument("--refresh-token-file", metavar="FILE",
                   help="the refresh token `zohofs login` stored (else $ZOHO_REFRESH_TOKEN "
                        "or the config)")
    p.add_argument("--api-url", metavar="URL", help="override the API server")
    p.add_argument("--api-version", type=int, metavar="N", help="backup API version (8)")
    p.add_argument("--listing-interval", type=float, metavar="SECONDS",
                   help="how often to look for a new backup (600)")
    p.add_argument("--link", action="append", metavar="URL",
                   help="a backup download link (repeatable)")
    p.add_argument("--links-file", metavar="FILE", help="links, one a line, # comments")
    p.add_argument("--access-token-file", metavar="FILE",
                   help="access token for --link (else $ZOHO_ACCESS_TOKEN)")
    p.add_argument("--ca-file", metavar="PEM", help="also trust this CA ($SSL_CERT_FILE too)")
    p.add_argument("--trust-host", action="append", metavar="HOST[:PORT]",
                   help="also send the token to this host (repeatable)")
    p.add_argument("--connections", type=int, metavar="N", help="parallel GETs per host (4)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="longest one HTTP request may take, body included (30)")
    p.add_argument("--read-timeout", type=float, metavar="SECONDS",
                   help="longest one read or stat may take, retries included, before it "
                        "fails with EIO (60)")
    p.add_argument("--retries", type=int, metavar="N",
                   help="attempts per request on transient errors (5)")
    p.add_argument("--retry-delay", type=float, metavar="SECONDS",
                   help="first backoff between attempts (0.25)")
    p.add_argument("-d", "--debug", action="store_true", help="log every request")
    p.add_argument("--log-file", metavar="FILE",
                   help="append the log to FILE (mode 600) instead of the terminal, "
                        "journald or syslog")
    p.add_argument("--log-level", choices=config.LOG_LEVELS,
                   help="least important messages logged (info; debug with -d)")


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-size", metavar="MiB",
                   help="cache budget, half of it for what is fetched ahead of readers "
                        "(MiB, or with a unit: 1G); default 256")
    p.add_argument("--block-size", metavar="SIZE",
                   help="largest ranged GET, made for sequential readers (1M..64M; 8M)")
    p.add_argument("--readahead", type=int, metavar="BLOCKS",
                   help="most a sequential reader is fetched ahead of, in block sizes (4)")
    p.add_argument("--page-cache", action="store_true", default=None,
                   help="read through the kernel page cache: mmap works and re-reads are "
                        "fast, but cold reads are slower (the default bypasses it)")
    p.add_argument("--expand", action="store_true", default=None,
                   help="also show each X.zip's files (CSVs, attachments) in a folder X/ "
                        "next to it, read on demand; -o expand does the same")
    p.add_argument("--uid", metavar="USER",
                   help="owner of everything in the mount (default: who mounts)")
    p.add_argument("--gid", metavar="GROUP",
                   help="group of everything in the mount (default: who mounts)")
    p.add_argument("--umask", metavar="OCTAL",
                   help="permission bits taken away from r-x (default 077: owner only; "
                        "027 lets the group read)")
    p.add_argument("--file-mode", metavar="OCTAL", help="mode of files (overrides --umask)")
    p.add_argument("--dir-mode", metavar="OCTAL", help="mode of folders (overrides --umask)")
    p.add_argument("-o", dest="fuse_options", action="append", metavar="OPT[,OPT]",
                   help="mount options as in fstab: zohofs settings (expand, uid=, gid=, "
                        "umask=, config=, ...), FUSE's (allow_other, ...), mount(8)'s "
                        "(_netdev, nofail, ... are ignored)")


def _add_backup_options(p: argparse.ArgumentParser, part_size: str = "1G") -> None:
    p.add_argument("--seed", type=int, default=1, help="generated backup: random seed")
    p.add_argument("--size", default="48M", help="generated backup: total size")
    p.add_argument("--part-size", default=part_size,
                   help="generated backup: largest part (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Flags (``-o`` options among them) > environment > config file > defaults, secrets
    never from argv."""
    try:
        options = mountopts.parse(getattr(args, "fuse_options", None) or (), config.SETTINGS)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    given: dict[str, Any] = {
        "fuse_options": options.fuse or None,
        "dc": args.dc, "accounts_url": args.accounts_url, "api_url": args.api_url,
        "api_version": args.api_version, "listing_interval": args.listing_interval,
        "connections": args.connections, "timeout": args.timeout,
        "read_timeout": args.read_timeout, "retries": args.retries,
        "retry_delay": args.retry_delay, "ca_file": args.ca_file,
        "trust_hosts": args.trust_host, "links": args.link, "links_file": args.links_file,
        "log_file": args.log_file, "log_level": args.log_level,
    }
    for key in ("cache_size", "block_size", "readahead", "page_cache", "expand", "uid", "gid",
                "umask", "file_mode", "dir_mode"):
        given[key] = getattr(args, key, None)
    flags = {**options.settings, **{k: v for k, v in given.items() if v is not None}}
    secret_flags = {"client_id": args.client_id_file, "client_secret": args.client_secret_file,
                    "refresh_token": args.refresh_token_file}
    settings, accounts = config.build(flags, secret_flags, os.environ,
                                      args.config or options.config, args.strict)
    mountpoint = getattr(args, "mountpoint", None)
    return Config.from_settings(
        settings, accounts=accounts, debug=args.debug,
        links=read_links(list(settings.get("links", ())), settings.get("links_file")),
        access_token=access_token(args.access_token_file, os.environ, args.strict),
        # Resolved now: once mounted, a stat() of the mount point from the thread that
        # serves it would wait forever for itself.
        mountpoint=os.path.realpath(mountpoint) if mountpoint else "")


# -- mount ---------------------------------------------------------------------------------

def _check_mountpoint(path: str) -> None:
    mounted = _mounted_at(path)
    if mounted is not None and mounted[1] == "fuse.zohofs" and _is_dead(path):
        # A zohofs that was killed left its mount behind ("Transport endpoint is not
        # connected"): nobody serves it, so it is safe to take away.
        log.warning("%s: removing a dead zohofs mount left by a process that ended", path)
        result = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise ConfigError(f"{path} holds a dead zohofs mount that could not be "
                              f"removed: {result.stderr.strip()}")
        mounted = _mounted_at(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ConfigError(f"mount point {path} does not exist: create it first "
                              f"(mkdir -p {path})") from None
        raise ConfigError(f"cannot use mount point {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mount point {path} is not a directory")
    if mounted is not None:
        raise ConfigError(f"{path} is already a mount point")
    try:
        hidden = len(os.listdir(path))
    except OSError:
        hidden = 0
    if hidden:
        log.warning("%s is not empty (%d names): what it holds is hidden while zohofs is "
                    "mounted on it", path, hidden)


def _is_dead(path: str) -> bool:
    """True for a FUSE mount whose server is gone (a live zohofs answers statfs itself)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _mounted_at(path: str) -> tuple[str, str] | None:
    """(device, filesystem type) of the topmost mount at ``path``, or None.

    Read from mountinfo, not with stat(): a process must not touch a mount it serves,
    and a dead one answers stat() from the kernel's cache."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape_mountinfo(fields[4]) == path:
                found = fields[2], fields[fields.index("-") + 1]  # the last one wins
    return found


def _notify_systemd(state: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as exc:  # a notification lost is no reason to fail the mount
        log.warning("cannot notify systemd (%s): %s", address, exc)


STATUS_EVERY = 5.0


async def _report_to_systemd(fs: ZohoFS) -> None:
    """The one-line summary `systemctl status` shows (STATUS=), kept current."""
    while True:
        _notify_systemd("STATUS=" + status_line(fs.status()))
        await trio.sleep(STATUS_EVERY)


def status_line(s: dict[str, Any]) -> str:
    errors = sum(s["errors"].values())
    return (f"{s['files']} files, {len(s['open_files'])} open; fetched "
            f"{_mb(s['bytes_fetched'])} in {s['gets']} GETs; {errors} errors")


async def serve(config: Config, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Discover, mount, serve until unmounted or signalled, and always unmount."""
    _map_big_buffers()
    async with open_runtime(config) as runtime:
        with trio.move_on_after(STARTUP_DEADLINE):
            errors = await runtime.catalog.refresh()
            fatal = fatal_sign_in_errors(errors)
            if fatal and len(fatal) == len(runtime.sources) and not config.links:
                raise ConfigError("; ".join(str(e) for e in fatal))
        operations = Operations(runtime.fs, direct_io=config.direct_io)
        options = set(pyfuse3.default_options) | {"fsname=zohofs", "subtype=zohofs",
                                                  *mountopts.ALWAYS, *config.fuse_options}
        try:
            pyfuse3.init(operations, config.mountpoint, options)
        except RuntimeError as exc:
            raise ConfigError(f"cannot mount on {config.mountpoint}: {exc}") from exc
        access = config.access
        log.info("mounted %d files on %s; who can read them: %s (files %04o, folders %04o)",
                 len(runtime.fs.files), config.mountpoint, access.readers(),
                 access.file_mode, access.dir_mode)
        access.check_allow_other(config.fuse_options)
        # Signals are watched from here until the unmount is done: a second SIGTERM (init
        # systems and `timeout` both send more than one) must not kill us mid-unmount and
        # leave a dead mount behind. pyfuse3 installs no handlers of its own.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as outer:
                fuse_scope = trio.CancelScope()
                outer.start_soon(_stop_on_signal, signals, fuse_scope)
                outer.start_soon(dump_on_usr1)
                try:
                    with fuse_scope:
                        async with trio.open_nursery() as nursery:
                            runtime.fs.start(nursery)
                            nursery.start_soon(runtime.catalog.run)
                            if not config.direct_io:
                                nursery.start_soon(_raise_kernel_readahead, operations,
                                                   config.mountpoint, 2 * config.block_size)
                            _notify_systemd("READY=1")
                            if os.environ.get("NOTIFY_SOCKET"):
                                nursery.start_soon(_report_to_systemd, runtime.fs)
                            if on_ready is not None:
                                nursery.start_soon(on_ready)
                            await pyfuse3.main()
                            nursery.cancel_scope.cancel()
                    # No signal asked for the end (it sets a deadline), and yet the
                    # kernel never sent INIT: the session failed at start.
                    failed_at_start = (not operations.initialised.is_set()
                                       and fuse_scope.deadline == math.inf)
                finally:
                    _notify_systemd("STOPPING=1")
                    pyfuse3.close(unmount=True)
                    log.info("unmounted %s", config.mountpoint)
                    outer.cancel_scope.cancel()
    if failed_at_start:
        raise ZohofsError(f"the kernel ended the FUSE session on {config.mountpoint} before "
                          "it started (see the lines above)")


async def _raise_kernel_readahead(operations: Operations, mountpoint: str, size: int) -> None:
    # The kernel resets the window when it takes the answer to its INIT request.
    await operations.initialised.wait()
    _set_kernel_readahead(mountpoint, size)


def _set_kernel_readahead(mountpoint: str, size: int) -> None:
    """Let the kernel read ahead ``size`` bytes on the mount at ``mountpoint`` (resolved).

    Through the page cache, the kernel asks for at most its readahead window (128 KiB by
    default) at a time; a bigger window means fewer, larger requests into this process,
    which is what limits throughput (README, "Performance").
    """
    try:
        mounted = _mounted_at(mountpoint)
        if mounted is None:
            raise OSError("not in mountinfo")
        with open(f"/sys/class/bdi/{mounted[0]}/read_ahead_kb", "w") as f:
            f.write(str(size // 1024))
    except OSError as exc:
        log.debug("could not raise the kernel readahead of %s: %s", mountpoint, exc)


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


async def _stop_on_signal(signals: AsyncIterator[int], fuse_scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        # Requests still waiting on the network get a moment, then are abandoned.
        fuse_scope.deadline = min(fuse_scope.deadline, trio.current_time() + SHUTDOWN_GRACE)


def cmd_mount(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    _log_as_configured(cfg)
    _check_mountpoint(cfg.mountpoint)
    if args.background:
        return _serve_in_background(cfg)
    trio.run(serve, cfg)
    return 0


def _log_as_configured(cfg: Config) -> None:
    if cfg.log_file or cfg.log_level:
        setup_logging(cfg.debug, cfg.log_level, cfg.log_file)


def _serve_in_background(cfg: Config) -> int:
    """Fork; the parent exits 0 once the child's mount is live, or with the child's exit
    status (its error already printed) when it could not start."""
    _log_in_background(cfg)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child:
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            if ready.read() == b"ready":
                return 0
        _, status = os.waitpid(child, 0)
        return os.waitstatus_to_exitcode(status) or 1
    os.close(ready_r)
    os.setsid()  # no terminal: the mount outlives the shell that started it

    async def on_ready() -> None:
        os.write(ready_w, b"ready")
        os.close(ready_w)
        _detach_output()

    trio.run(serve, cfg, on_ready)
    return 0


def _log_in_background(cfg: Config) -> None:
    """Soon nobody reads our terminal: log to the file asked for, to journald (started
    by systemd), else to syslog, else to a file in the state directory; until the mount
    is live, to the terminal as well."""
    if cfg.log_file or os.environ.get("JOURNAL_STREAM"):
        return
    handler, where = background_handler(state_directory(os.environ))
    logging.getLogger().addHandler(handler)
    print(f"zohofs: logging to {where}", file=sys.stderr, flush=True)


def _detach_output() -> None:
    """Let nothing reach the terminal; under systemd stderr is the journal: kept."""
    if os.environ.get("JOURNAL_STREAM"):
        return
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h) is not logging.StreamHandler]
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _map_big_buffers() -> None:
    """Give every buffer of 256 KiB or more a mapping of its own, returned to the system
    when freed; chunk buffers (128 KiB) stay below it, on the heap, and are reused.

    glibc raises its mmap threshold each time a big buffer is freed, after which big
    buffers come from per-thread heaps that seldom shrink: with the 8 MiB blocks zohofs
    once had, peak RSS grew to several times the cache budget. A fixed threshold keeps
    that from coming back with any big buffer.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# -- status --------------------------------------------------------------------------------

STATUS_XATTR = "user.zohofs.status"


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        # Ctrl-C is how --watch ends, also when started from a shell that ignores SIGINT
        # for its background jobs (Python then leaves it ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            text = _status_text(args)
            if not args.watch:
                print(text)
                return 0
            print("\x1b[H\x1b[2J" + text, flush=True)  # home, clear: a screen like top's
            time.sleep(1)
    except KeyboardInterrupt:  # how --watch ends
        return 0


def _status_text(args: argparse.Namespace) -> str:
    try:
        status = json.loads(os.getxattr(args.mountpoint, STATUS_XATTR))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise ConfigError(f"{args.mountpoint} is not a zohofs mount") from None
        raise ConfigError(f"cannot ask {args.mountpoint}: {exc.strerror}") from None
    if args.json:
        return json.dumps(status, indent=2)
    return describe_status(args.mountpoint, status)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def describe_status(mountpoint: str, s: dict[str, Any]) -> str:
    lines = [f"zohofs on {mountpoint}: {s['files']} files, mounted since "
             f"{s['mounted_since']}, links expire {s['links_expire'] or '-'}",
             f"fetched {_mb(s['bytes_fetched'])} in {s['gets']} GETs, {s['retries']} retries; "
             f"cache {_mb(s['cache_bytes'])}, chunks {s['chunk_hits']} hit / "
             f"{s['chunk_misses']} fetched; {s['token_refreshes']} token refreshes"
             + (f"; inflated {_mb(s['bytes_inflated'])}" if s.get("bytes_inflated") else ""),
             "errors: " + (", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items()))
                           or "none")]
    lines.append(f"open files: {len(s['open_files'])}")
    for f in s["open_files"]:
        lines.append(f"  {f['path']}  {_mb(f['bytes_read'])} read of {_mb(f['size'])} "
                     f"({f['progress']:.0%})  {_mb(f['bytes_per_second'])}/s")
    return "\n".join(lines)


# -- ls ------------------------------------------------------------------------------------

async def list_backups(cfg: Config) -> int:
    """Print what would be mounted. Exit 0 when every file was listed and probed; 2 when
    sign-in failed for a reason waiting will not fix (as `mount` does); else 1, also when
    there is nothing to list: a cron check must notice."""
    # The failures of sign-in and listing are printed below, once each: not also logged.
    for name in ("zohofs.auth", "zohofs.catalog"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    async with open_runtime(cfg) as runtime:
        errors = await runtime.catalog.refresh()
        for error in errors:
            print(f"zohofs: error: {error}", file=sys.stderr)
        fatal = fatal_sign_in_errors(errors)
        if fatal and len(fatal) == len(runtime.sources) and not cfg.links:
            return 2
        rows = [("ZGID", "JOB", "FILE", "SIZE", "EXPIRES")]
        failed = bool(errors)
        for node in sorted(runtime.fs.files, key=lambda n: n.file.path if n.file else ""):
            assert node.file is not None
            if node.info is not None:
                size = str(node.info.size)
            else:
                failed = True
                size = f"error: {node.failure.error}" if node.failure else "?"
            expires = node.file.expires.isoformat() if node.file.expires else "-"
            rows.append((node.file.zgid, node.file.job_id, node.file.name, size, expires))
        if len(rows) == 1:
            print("zohofs: no backup files" + (
                "" if errors else " (Zoho lists none, or every link was refused: see "
                                  "the warnings above)"), file=sys.stderr)
            return 1
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
        return 1 if failed else 0


def cmd_ls(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    _log_as_configured(cfg)
    return trio.run(list_backups, cfg)


# -- login ---------------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    _, top, _ = config.read_config_file(args.config, os.environ, args.strict)
    dc = args.dc or os.environ.get("ZOHOFS_DC") or top.get("dc", "us")
    accounts_url = (args.accounts_url or os.environ.get("ZOHOFS_ACCOUNTS_URL")
                    or top.get("accounts_url") or f"https://{DATA_CENTRES[dc].accounts}")
    print(login.instructions(accounts_url))
    secret_flags = {"client_id": args.client_id_file, "client_secret": args.client_secret_file}
    known = config.find_secrets(config.single_account_sources(secret_flags, os.environ, top),
                                args.strict)
    client_id = known.get("client_id") or login.ask("Client ID: ", input)
    client_secret = known.get("client_secret") or login.ask("Client Secret: ", getpass.getpass)
    if args.code_file:
        code = config.read_secret_file(args.code_file, "grant code")
    else:
        code = login.ask("Grant code: ", input)
    cfg = Config(ca_file=args.ca_file or top.get("ca_file"))

    async def exchange() -> str:
        async with httpx.AsyncClient(verify=cfg.ssl_context(), timeout=cfg.timeout) as client:
            return await login.exchange_code(client, accounts_url, client_id, client_secret,
                                             code)

    try:
        refresh_token = trio.run(exchange)
    except ZohofsError as exc:
        print(f"zohofs: {exc}", file=sys.stderr)
        return 1
    path = args.output or login.default_token_path()
    login.store_secret(path, refresh_token)
    # A secret typed at the prompt is kept too: the mount needs it with every refresh.
    secret_path = None
    if not known.get("client_secret"):
        secret_path = path.with_name("client-secret")
        login.store_secret(secret_path, client_secret)
    default_url = f"https://{DATA_CENTRES[dc].accounts}"
    text = login.config_text(client_id, secret_path, path, dc,
                             accounts_url if accounts_url != default_url else None)
    print(login.summary(path, secret_path, text,
                        Path(args.config) if args.config else
                        login.config_directory() / "config.toml"))
    return 0


# -- emulator and demo ---------------------------------------------------------------------

def _generated_backup(args: argparse.Namespace) -> Any:
    from zohofs.emulator.backup import generate

    return generate(seed=args.seed, size=parse_size(args.size),
                    part_size=parse_size(args.part_size))


def cmd_emulator(args: argparse.Namespace) -> int:
    from zohofs.emulator.server import Emulator

    # Blocked before the server threads start, so that only sigwait() below sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    emulator = Emulator(args.host, args.port, tls=args.tls, tokens={args.token},
                        ca_path=args.ca_out)
    emulator.token_lifetime = args.token_lifetime
    emulator.latency = args.latency
    emulator.rate = parse_size(args.rate) if args.rate else None
    links = (emulator.add_data_dir(args.data_dir) if args.data_dir
             else emulator.add_backup(_generated_backup(args)))
    print(emulator.base_url, flush=True)
    if emulator.ca_path:
        print(f"ca-file: {emulator.ca_path}", flush=True)
    for zgid in sorted(emulator.current_job):
        account = emulator.add_account(zgid)
        print(f"account: zgid={zgid} client_id={account.client_id} "
              f"client_secret={account.client_secret} "
              f"refresh_token={account.refresh_token}", flush=True)
        # One grant code each, to rehearse `zohofs login --accounts-url ...` locally.
        print(f"grant-code: zgid={zgid} code={emulator.add_grant_code(account)}", flush=True)
    for link in links:
        print(f"link: {link}", flush=True)
    emulator.start()
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        emulator.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from zohofs.emulator.server import Emulator

    mountpoint = os.path.realpath(args.mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    _check_mountpoint(mountpoint)
    with tempfile.TemporaryDirectory(prefix="zohofs-demo-") as tmp:
        emulator = Emulator(tls=True, ca_path=os.path.join(tmp, "ca.pem"))
        backup = _generated_backup(args)
        emulator.add_backup(backup)
        account = emulator.add_account(backup.zgid)
        # The demo signs in and discovers exactly as against Zoho: refresh token, token
        # endpoint, backup URLs API, then ranged downloads.
        cfg = Config(
            mountpoint=mountpoint, ca_file=emulator.ca_path, debug=args.debug,
            expand=args.expand,
            trust_hosts=frozenset({f"{emulator.host}:{emulator.port}"}),
            accounts=(config.Account("demo", "us", emulator.base_url, emulator.base_url,
                                     Credentials(account.client_id,
                                                        account.client_secret,
                                                        account.refresh_token)),))

        async def show_tree() -> None:
            await trio.to_thread.run_sync(_print_tree, mountpoint, args.expand)

        with emulator:
            print(f"emulator: {emulator.base_url} (Zoho's accounts, API and download hosts; "
                  "TLS with a throw-away CA)")
            trio.run(serve, cfg, show_tree)
    return 0


def _print_tree(root: str, expand: bool) -> None:
    # Runs in a worker thread: the thread serving the mount must never touch it.
    print(f"\n{root}")
    for dirpath, dirnames, filenames in os.walk(root):  # top-down: pruned below
        dirnames.sort()
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        if dirpath != root:
            print("    " * (depth - 1) + os.path.basename(dirpath) + "/")
        folders = {view_name(f) for f in filenames}
        inside = [d for d in dirnames if d in folders]  # --expand's folders
        dirnames[:] = [d for d in dirnames if d not in inside]
        for name in inside:
            print("    " * depth + f"{name}/  (what {name}.zip holds)")
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            when = datetime.fromtimestamp(st.st_mtime).strftime("%Y-%m-%d %H:%M")
            print("    " * depth + f"{name}  {st.st_size / MiB:.1f} MiB  {when}")
    print(f"\nTry: ls -l {root}/*/*  or  unzip -l {root}/*/*/Data_001.zip"
          + (f"  or  head {root}/*/*/Data_001/Data/Leads_001.csv" if expand else ""))
    print("Press Ctrl-C to unmount and stop.", flush=True)


def from_mount_helper(argv: Sequence[str]) -> list[str] | None:
    """The arguments of `zohofs mount --background` for mount(8)'s helper call
    `zohofs SOURCE MOUNTPOINT -o OPTIONS` (an fstab line of type fuse.zohofs); None when
    ``argv`` is a command line of our own. SOURCE is a label; the options are read as
    `zohofs mount -o` reads them (mountopts.py)."""
    if len(argv) < 2 or argv[0] in _COMMANDS or argv[0].startswith("-"):
        return None
    args = ["mount", argv[1], "--background"]
    rest = list(argv[2:])
    while rest:
        word = rest.pop(0)
        if word == "-o" and rest:
            args += ["-o", rest.pop(0)]
        elif word.startswith("-o") and len(word) > 2:
            args += ["-o", word[2:]]
        else:
            raise ConfigError(f"unexpected argument {word!r} (mount(8) calls zohofs as "
                              "`zohofs SOURCE MOUNTPOINT -o OPTIONS`)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = from_mount_helper(argv) or argv
    except ConfigError as exc:
        print(f"zohofs: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "debug", False))
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"zohofs: error: {exc}", file=sys.stderr)
        return 2
    except ZohofsError as exc:
        print(f"zohofs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "mount": cmd_mount, "status": cmd_status, "ls": cmd_ls, "login": cmd_login,
    "emulator": cmd_emulator, "demo": cmd_demo}
