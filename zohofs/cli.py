"""Command line: ``zohofs mount``, ``zohofs emulator``, ``zohofs demo``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pyfuse3
import trio

from zohofs import __version__
from zohofs.auth import StaticToken, TokenSource
from zohofs.cache import BlockCache
from zohofs.config import Config, MiB, access_token, parse_size
from zohofs.errors import ConfigError
from zohofs.fs import ZohoFS
from zohofs.hosts import HostPolicy
from zohofs.logs import setup as setup_logging
from zohofs.operations import Operations
from zohofs.remote import RangeReader, RetryPolicy
from zohofs.transport import Transport
from zohofs.zoho import BackupFile, dedupe, parse_link, read_links_file

log = logging.getLogger("zohofs")

# How long in-flight requests get to finish after SIGTERM before they are cancelled.
SHUTDOWN_GRACE = 2.0
# Sizes are probed before the mount goes live; a host that hangs must not block it forever.
PROBE_DEADLINE = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zohofs", description=(
        "Mount Zoho CRM backups as a read-only filesystem."))
    parser.add_argument("--version", action="version", version=f"zohofs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount backups (runs in the foreground)")
    m.add_argument("mountpoint")
    m.add_argument("--link", action="append", default=[], metavar="URL",
                   help="a backup download link (repeatable)")
    m.add_argument("--links-file", metavar="FILE", help="links, one a line, # comments")
    m.add_argument("--access-token-file", metavar="FILE",
                   help="file holding the access token (else $ZOHO_ACCESS_TOKEN)")
    _add_mount_options(m)

    e = sub.add_parser("emulator", help="run the built-in Zoho emulator")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=0)
    e.add_argument("--tls", action="store_true", help="serve https with a self-signed CA")
    e.add_argument("--ca-out", metavar="FILE", help="where to write the CA (with --tls)")
    e.add_argument("--token", default="emulator-token", help="the access token it accepts")
    e.add_argument("--data-dir", type=Path,
                   help="serve zips found under v2/crm/<zgid>/backup/<job>/ here")
    _add_backup_options(e)
    e.add_argument("-d", "--debug", action="store_true")

    d = sub.add_parser("demo", help="mount a generated backup served by the emulator")
    d.add_argument("mountpoint", nargs="?", default="./zoho-demo")
    _add_backup_options(d, part_size="16M")  # small parts, so the demo shows several
    d.add_argument("-d", "--debug", action="store_true")
    return parser


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-file", metavar="PEM", help="also trust this CA ($SSL_CERT_FILE too)")
    p.add_argument("--trust-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="also send the token to this host (repeatable)")
    p.add_argument("--cache-size", default="256", metavar="MiB",
                   help="block cache budget (MiB, or with a unit: 1G); default 256")
    p.add_argument("--block-size", default=f"{Config.block_size // MiB}M", metavar="SIZE",
                   help="bytes per ranged GET (1M..64M); default %(default)s")
    p.add_argument("--readahead", type=int, default=Config.readahead_blocks, metavar="BLOCKS",
                   help="blocks fetched ahead of a sequential reader; default %(default)s")
    p.add_argument("--connections", type=int, default=Config.connections, metavar="N",
                   help="parallel GETs per host; default %(default)s")
    p.add_argument("--timeout", type=float, default=Config.timeout, metavar="SECONDS",
                   help="socket timeout of one HTTP request; default %(default)s")
    p.add_argument("--retries", type=int, default=Config.retries, metavar="N",
                   help="attempts per request on transient errors; default %(default)s")
    p.add_argument("--retry-delay", type=float, default=Config.retry_base_delay,
                   metavar="SECONDS", help="first backoff between attempts; default %(default)s")
    p.add_argument("--page-cache", action="store_true",
                   help="read through the kernel page cache: mmap works and re-reads are "
                        "fast, but cold reads are slower (the default bypasses it)")
    p.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPT[,OPT]",
                   help="FUSE mount options, e.g. allow_other")
    p.add_argument("-d", "--debug", action="store_true", help="log every request")


def _add_backup_options(p: argparse.ArgumentParser, part_size: str = "1G") -> None:
    p.add_argument("--seed", type=int, default=1, help="generated backup: random seed")
    p.add_argument("--size", default="48M", help="generated backup: total size")
    p.add_argument("--part-size", default=part_size,
                   help="generated backup: largest part (default %(default)s)")


def config_from_args(args: argparse.Namespace, links: Sequence[str]) -> Config:
    options = tuple(o for opt in args.fuse_options for o in opt.split(",") if o)
    return Config(
        # Resolved now: once mounted, a stat() of the mount point from the thread that
        # serves it would wait forever for itself.
        mountpoint=os.path.realpath(args.mountpoint),
        links=tuple(links),
        ca_file=args.ca_file,
        trust_hosts=frozenset(h.lower() for h in args.trust_host),
        cache_size=parse_size(args.cache_size, default_unit=MiB),
        block_size=parse_size(args.block_size),
        readahead_blocks=args.readahead,
        connections=args.connections,
        timeout=args.timeout,
        retries=args.retries,
        retry_base_delay=args.retry_delay,
        direct_io=not args.page_cache,
        debug=args.debug,
        fuse_options=options,
    )


def resolve_files(config: Config) -> list[BackupFile]:
    policy = HostPolicy(config.trust_hosts)
    files = []
    for link in config.links:
        policy.check_link(link)
        files.append(parse_link(link))
    if not files:
        raise ConfigError("no backup links: give --link URL or --links-file FILE")
    return dedupe(files)


def _check_mountpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise ConfigError(f"{path} is already a mount point")


def _notify_systemd(state: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(state.encode())


async def serve(config: Config, files: Sequence[BackupFile], tokens: TokenSource,
                on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Mount, serve until unmounted or signalled, and always unmount on the way out."""
    transport = Transport(config.ssl_context(), config.timeout)
    reader = RangeReader(transport, tokens, HostPolicy(config.trust_hosts),
                         RetryPolicy(config.retries, config.retry_base_delay),
                         config.connections)
    fs = ZohoFS(reader, BlockCache(config.cache_size), block_size=config.block_size,
                readahead_blocks=config.readahead_blocks)
    fs.add_files(files)
    with trio.move_on_after(PROBE_DEADLINE):
        await fs.probe_all()
    mountpoint = config.mountpoint
    options = set(pyfuse3.default_options) | {"fsname=zohofs", "subtype=zohofs", "ro",
                                              *config.fuse_options}
    operations = Operations(fs, direct_io=config.direct_io)
    try:
        pyfuse3.init(operations, mountpoint, options)
    except RuntimeError as exc:
        transport.close()
        raise ConfigError(f"cannot mount on {config.mountpoint}: {exc}") from exc
    log.info("mounted %d files on %s", len(files), config.mountpoint)
    # Signals are watched from here until the unmount is done: a second SIGTERM (init
    # systems and `timeout` both send more than one) must not kill us mid-unmount and
    # leave a dead mount behind. pyfuse3 installs no handlers of its own.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            fuse_scope = trio.CancelScope()
            outer.start_soon(_stop_on_signal, signals, fuse_scope)
            try:
                with fuse_scope:
                    async with trio.open_nursery() as nursery:
                        fs.start(nursery)
                        if not config.direct_io:
                            nursery.start_soon(_raise_kernel_readahead, operations, mountpoint,
                                               2 * config.block_size)
                        _notify_systemd("READY=1")
                        if on_ready is not None:
                            nursery.start_soon(on_ready)
                        await pyfuse3.main()
                        nursery.cancel_scope.cancel()
            finally:
                _notify_systemd("STOPPING=1")
                pyfuse3.close(unmount=True)
                transport.close()
                log.info("unmounted %s", config.mountpoint)
                outer.cancel_scope.cancel()


async def _raise_kernel_readahead(operations: Operations, mountpoint: str, size: int) -> None:
    # The kernel resets the window when it takes the answer to its INIT request.
    await operations.initialised.wait()
    _set_kernel_readahead(mountpoint, size)


def _set_kernel_readahead(mountpoint: str, size: int) -> None:
    """Let the kernel read ahead ``size`` bytes on the mount at ``mountpoint`` (resolved).

    Through the page cache, the kernel asks for at most its readahead window (128 KiB by
    default) at a time; a bigger window means fewer, larger requests into this process,
    which is what limits throughput (README, "Performance"). Found through mountinfo, not
    stat(): this thread serves the mount and must not touch it.
    """
    try:
        with open("/proc/self/mountinfo") as f:
            device = next(line.split()[2] for line in f
                          if _unescape_mountinfo(line.split()[4]) == mountpoint)
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(size // 1024))
    except (OSError, StopIteration) as exc:
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
    links = list(args.link)
    if args.links_file:
        links += read_links_file(args.links_file)
    config = config_from_args(args, links)
    files = resolve_files(config)
    tokens = StaticToken(access_token(args.access_token_file))
    _check_mountpoint(config.mountpoint)
    trio.run(serve, config, files, tokens)
    return 0


def _generated_backup(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from zohofs.emulator.backup import generate

    return generate(seed=args.seed, size=parse_size(args.size),
                    part_size=parse_size(args.part_size))


def cmd_emulator(args: argparse.Namespace) -> int:
    from zohofs.emulator.server import Emulator

    # Blocked before the server threads start, so that only sigwait() below sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    emulator = Emulator(args.host, args.port, tls=args.tls, tokens={args.token},
                        ca_path=args.ca_out)
    links = (emulator.add_data_dir(args.data_dir) if args.data_dir
             else emulator.add_backup(_generated_backup(args)))
    print(emulator.base_url, flush=True)
    if emulator.ca_path:
        print(f"ca-file: {emulator.ca_path}", flush=True)
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
        token = "demo-" + os.urandom(8).hex()
        emulator = Emulator(tls=True, tokens={token}, ca_path=os.path.join(tmp, "ca.pem"))
        links = emulator.add_backup(_generated_backup(args))
        config = Config(mountpoint=mountpoint, links=tuple(links), ca_file=emulator.ca_path,
                        trust_hosts=frozenset({f"{emulator.host}:{emulator.port}"}),
                        debug=args.debug)

        async def show_tree() -> None:
            await trio.to_thread.run_sync(_print_tree, mountpoint)

        with emulator:
            print(f"emulator: {emulator.base_url} (TLS, self-signed CA)")
            trio.run(serve, config, resolve_files(config), StaticToken(token), show_tree)
    return 0


def _print_tree(root: str) -> None:
    # Runs in a worker thread: the thread serving the mount must never touch it.
    print(f"\n{root}")
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        if dirpath != root:
            print("    " * (depth - 1) + os.path.basename(dirpath) + "/")
        for name in sorted(filenames):
            size = os.stat(os.path.join(dirpath, name)).st_size
            print("    " * depth + f"{name}  ({size / MiB:.1f} MiB)")
    print(f"\nTry: ls -l {root}/*/*  or  unzip -l {root}/*/*/Data_001.zip")
    print("Press Ctrl-C to unmount and stop.", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "debug", False))
    commands = {"mount": cmd_mount, "emulator": cmd_emulator, "demo": cmd_demo}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"zohofs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
