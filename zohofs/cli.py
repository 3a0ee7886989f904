"""Command line: ``zohofs mount | status | ls | login | emulator | demo``: arguments and
their settings, and the commands that are no more than a few lines over the modules that
do the work (the mount's life is lifecycle.py's, the demo demo.py's)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from zohofs import __version__, config, diskcache, listing, login, mountopts, status
from zohofs.config import Config, access_token
from zohofs.demo import cmd_demo, cmd_emulator
from zohofs.errors import ConfigError, ZohofsError
from zohofs.hosts import DATA_CENTRES
from zohofs.lifecycle import check_mountpoint, serve, serve_in_background
from zohofs.logs import setup as setup_logging
from zohofs.planner import MiB
from zohofs.runtime import read_links

log = logging.getLogger("zohofs")

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
    ls.add_argument("--expires-within", metavar="DURATION", type=listing.duration,
                    help="exit 3, naming them, when backups expire within DURATION "
                         "(e.g. 48h, 2d, 90m): for a cron or monitoring check")

    lg = sub.add_parser("login", help="one-time set-up: grant code -> stored refresh token")
    _add_account_options(lg)
    lg.add_argument("--code-file", metavar="FILE", help="read the grant code from FILE")
    lg.add_argument("--output", metavar="FILE", type=Path,
                    help=f"where to store the refresh token (default {login.default_token_path()})")
    lg.add_argument("--ca-file", metavar="PEM", help="also trust this CA ($SSL_CERT_FILE too)")
    lg.add_argument("--api-url", metavar="URL", help="override the API server (kept in the "
                                                     "config it prints)")
    lg.add_argument("--trust-host", action="append", metavar="HOST[:PORT]",
                    help="also send the token to this host (kept in the config it prints)")
    lg.add_argument("--write-config", metavar="FILE", type=Path,
                    help="write the config it prints to FILE (mode 600), not only print it")
    lg.add_argument("-d", "--debug", action="store_true", help="log every request")

    c = sub.add_parser("cache", help="the disk cache: clear it (when no mount uses it)")
    c.add_argument("action", choices=["clear"])
    c.add_argument("--cache-dir", metavar="DIR",
                   help="the directory (default: cache_dir of the config file)")
    c.add_argument("--config", metavar="FILE", help="TOML config to read cache_dir from")

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
    d.add_argument("--cache-dir", metavar="DIR",
                   help="keep what is fetched on disk there: a second demo reads it from there")
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
    p.add_argument("--cache-dir", metavar="DIR",
                   help="also keep fetched chunks on disk in DIR, for later reads and later "
                        "mounts (made 0700: it holds CRM data); default: none")
    p.add_argument("--cache-dir-size", metavar="SIZE",
                   help="most the disk cache may hold (MiB, or with a unit: 20G); default 10G")
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
                "umask", "file_mode", "dir_mode", "cache_dir", "cache_dir_size"):
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
def cmd_mount(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    _log_as_configured(cfg)
    check_mountpoint(cfg.mountpoint)
    if args.background:
        return serve_in_background(cfg)
    trio.run(serve, cfg)
    return 0


def _log_as_configured(cfg: Config) -> None:
    if cfg.log_file or cfg.log_level:
        setup_logging(cfg.debug, cfg.log_level, cfg.log_file)


# -- status --------------------------------------------------------------------------------

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
    figures = status.read(args.mountpoint)
    if args.json:
        return json.dumps(figures, indent=2)
    return status.describe(args.mountpoint, figures)


# -- ls and login --------------------------------------------------------------------------

def cmd_ls(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    _log_as_configured(cfg)
    return trio.run(listing.list_backups, cfg, args.expires_within)


def cmd_cache(args: argparse.Namespace) -> int:
    directory = args.cache_dir or config.read_config_file(args.config, os.environ,
                                                          False)[1].get("cache_dir")
    if not directory:
        raise ConfigError("which cache? give --cache-dir DIR (or cache_dir in the config)")
    freed = diskcache.clear(Path(directory))
    print(f"zohofs: cleared {directory} ({freed / MiB:.1f} MiB)" if freed
          else f"zohofs: nothing to clear in {directory}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    return login.run(args)


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
    "cache": cmd_cache,
    "emulator": cmd_emulator, "demo": cmd_demo}
