"""A mount's life: checks of the mount point, the FUSE session from start to unmount,
signals, going to the background (what mount(8) and fstab expect) and where its log goes
then."""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pyfuse3
import trio

from zohofs import memory, mountopts, systemd
from zohofs.config import Config
from zohofs.diagnose import dump_on_usr1
from zohofs.diskcache import DiskCache
from zohofs.errors import ConfigError, ZohofsError
from zohofs.logs import background_handler, stderr_is_journal
from zohofs.operations import KernelNotifier, Operations
from zohofs.runtime import fatal_sign_in_errors, open_runtime
from zohofs.tokenstore import state_directory

log = logging.getLogger("zohofs")

# How long in-flight requests get to finish after SIGTERM before they are cancelled.
SHUTDOWN_GRACE = 2.0
# How long a signal waits for the releases of files just closed before naming what is open.
RELEASE_GRACE = 0.5
# Discovery and size probes run before the mount goes live; a host that hangs must not
# keep it from coming up (what is missing is fetched on access or at the next listing).
STARTUP_DEADLINE = 30.0
# How long a listing waits for the sizes of new files: those not known by then are
# probed on access, each within its own deadline.
PROBE_WAIT = 2.0


def check_mountpoint(path: str) -> None:
    """A directory, not mounted on (a dead zohofs mount left there is removed)."""
    mounted = mounted_at(path)
    if mounted is not None and mounted[1] == "fuse.zohofs" and is_dead(path):
        # A zohofs that was killed left its mount behind ("Transport endpoint is not
        # connected"): nobody serves it, so it is safe to take away.
        log.warning("%s: removing a dead zohofs mount left by a process that ended", path)
        result = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise ConfigError(f"{path} holds a dead zohofs mount that could not be "
                              f"removed: {result.stderr.strip()}")
        mounted = mounted_at(path)
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


def is_dead(path: str) -> bool:
    """True for a FUSE mount whose server is gone (a live zohofs answers statfs itself)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def mounted_at(path: str) -> tuple[str, str] | None:
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



async def serve(config: Config, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Discover, mount, serve until unmounted or signalled, and always unmount."""
    memory.tune_allocator()
    kernel = KernelNotifier()
    disk = None
    if config.cache_dir:
        disk = DiskCache(Path(config.cache_dir), config.cache_dir_size)
        disk.open()  # a directory another mount uses is refused before anything mounts
    try:
        await _serve(config, on_ready, kernel, disk)
    finally:
        if disk is not None:
            disk.close()


async def _serve(config: Config, on_ready: Callable[[], Awaitable[None]] | None,
                 kernel: KernelNotifier, disk: DiskCache | None) -> None:
    async with open_runtime(config, kernel, probe_wait=PROBE_WAIT, disk=disk) as runtime:
        with trio.move_on_after(STARTUP_DEADLINE):
            errors = await runtime.catalog.refresh()
            fatal = fatal_sign_in_errors(errors)
            if fatal and len(fatal) == len(runtime.sources) and not config.links:
                raise ConfigError("; ".join(str(e) for e in fatal))
        operations = Operations(runtime.fs, kernel, direct_io=config.direct_io)
        options = set(pyfuse3.default_options) | {"fsname=zohofs", "subtype=zohofs",
                                                  *mountopts.ALWAYS, *config.fuse_options}
        try:
            pyfuse3.init(operations, config.mountpoint, options)
        except RuntimeError as exc:
            raise ConfigError(f"cannot mount on {config.mountpoint}: {exc}") from exc
        access = config.access
        log.info("mounted %d files on %s; who can read them: %s (files %04o, folders %04o)",
                 len(runtime.fs.files), config.mountpoint,
                 access.readers(config.fuse_options), access.file_mode, access.dir_mode)
        access.check(config.fuse_options)
        # Signals are watched from here until the unmount is done: a second SIGTERM (init
        # systems and `timeout` both send more than one) must not kill us mid-unmount and
        # leave a dead mount behind. pyfuse3 installs no handlers of its own.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as outer:
                fuse_scope = trio.CancelScope()
                outer.start_soon(_stop_on_signal, signals, fuse_scope, runtime.fs.open_paths,
                                 runtime.fs.wait_none_open)
                outer.start_soon(dump_on_usr1)
                try:
                    with fuse_scope:
                        async with trio.open_nursery() as nursery:
                            runtime.fs.start(nursery)
                            nursery.start_soon(runtime.catalog.run)
                            if not config.direct_io:
                                nursery.start_soon(_raise_kernel_readahead, kernel,
                                                   config.mountpoint, 2 * config.block_size)
                            systemd.notify("READY=1")
                            if systemd.expected():
                                nursery.start_soon(systemd.report_status, runtime.fs.status)
                            if on_ready is not None:
                                nursery.start_soon(on_ready)
                            await pyfuse3.main()
                            nursery.cancel_scope.cancel()
                    # No signal asked for the end (it sets a deadline), and yet the
                    # kernel never sent INIT: the session failed at start.
                    failed_at_start = (not kernel.initialised.is_set()
                                       and fuse_scope.deadline == math.inf)
                finally:
                    systemd.notify("STOPPING=1")
                    pyfuse3.close(unmount=True)
                    log.info("unmounted %s", config.mountpoint)
                    outer.cancel_scope.cancel()
    if failed_at_start:
        raise ZohofsError(f"the kernel ended the FUSE session on {config.mountpoint} before "
                          "it started (see the lines above)")


async def _raise_kernel_readahead(kernel: KernelNotifier, mountpoint: str, size: int) -> None:
    # The kernel resets the window when it takes the answer to its INIT request.
    await kernel.initialised.wait()
    _set_kernel_readahead(mountpoint, size)


def _set_kernel_readahead(mountpoint: str, size: int) -> None:
    """Let the kernel read ahead ``size`` bytes on the mount at ``mountpoint`` (resolved).

    Through the page cache, the kernel asks for at most its readahead window (128 KiB by
    default) at a time; a bigger window means fewer, larger requests into this process,
    which is what limits throughput (README, "Performance").
    """
    try:
        mounted = mounted_at(mountpoint)
        if mounted is None:
            raise OSError("not in mountinfo")
        with open(f"/sys/class/bdi/{mounted[0]}/read_ahead_kb", "w") as f:
            f.write(str(size // 1024))
    except OSError as exc:
        log.debug("could not raise the kernel readahead of %s: %s", mountpoint, exc)


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


async def _stop_on_signal(signals: AsyncIterator[int], fuse_scope: trio.CancelScope,
                          open_paths: Callable[[], list[str]],
                          none_open: Callable[[], Awaitable[None]]) -> None:
    async for signum in signals:
        # The kernel tells a close() to the filesystem after the closing process goes on:
        # a copy that just ended may not have been heard of yet.
        with trio.move_on_after(RELEASE_GRACE):
            await none_open()
        cut = open_paths()
        if cut:
            # Their readers get ENOTCONN from now on: say which copies were cut short.
            log.warning("%s: unmounting with %d files open, their readers cut off: %s",
                        signal.Signals(signum).name, len(cut), ", ".join(cut))
        else:
            log.info("%s: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        # Requests still waiting on the network get a moment, then are abandoned.
        fuse_scope.deadline = min(fuse_scope.deadline, trio.current_time() + SHUTDOWN_GRACE)


def serve_in_background(cfg: Config) -> int:
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
    if cfg.log_file or stderr_is_journal():
        return
    handler, where = background_handler(state_directory(os.environ))
    logging.getLogger().addHandler(handler)
    print(f"zohofs: logging to {where}", file=sys.stderr, flush=True)


def _detach_output() -> None:
    """Let nothing reach the terminal; under systemd stderr is the journal: kept."""
    if stderr_is_journal():
        return
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h) is not logging.StreamHandler]
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

