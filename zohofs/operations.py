"""The pyfuse3 adapter: kernel requests in, domain calls out, errors through one table."""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from zohofs.errors import NoAttribute, NoSuchEntry, ReadOnly, ZohofsError
from zohofs.fs import Attr, ZohoFS

log = logging.getLogger(__name__)
P = ParamSpec("P")
NEGATIVE_TIMEOUT = 10.0
READDIR_STEP = 64  # entries of a listing between two turns for other requests
R = TypeVar("R")


def handler(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Answer every failure with an errno; nothing may escape into pyfuse3's loop.

    pyfuse3 only understands FUSEError: anything else ends the main loop, leaves the
    caller hanging and takes the mount down.
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ZohofsError as exc:
            log.log(exc.log_level, "%s: %s", fn.__name__, exc)
            if args and isinstance(args[0], Operations) and not isinstance(exc, NoAttribute):
                args[0].fs.stats.errors[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _invalidate_inode(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino)
    except OSError as exc:
        log.debug("could not invalidate inode %d: %s", ino, exc)


def entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = attr.timeout
    e.attr_timeout = attr.timeout
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = 0
    e.st_size = attr.size
    e.st_blksize = attr.blksize
    e.st_blocks = attr.blocks
    e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = attr.mtime_ns
    return e


class KernelNotifier:
    """Tells the kernel what it holds that is no longer true (tree.KernelCache), once
    the mount is live."""

    def __init__(self) -> None:
        # Set once the kernel's INIT request has been answered: settings the kernel takes
        # from that answer (such as readahead) can only be changed after it.
        self.initialised = trio.Event()

    def removed(self, parent: int, name: str) -> None:
        # Without this the kernel would keep showing a backup that left the listing until
        # its entry timed out. Asynchronous: called from inside request handlers.
        if self.initialised.is_set():
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)

    def stale(self, ino: int) -> None:
        # The kernel may hold pages and a size that are no longer true. Called from inside
        # the read that found out, whose pages the kernel keeps locked until we answer: a
        # synchronous invalidation there would wait for itself, so it runs in a thread.
        if self.initialised.is_set():
            threading.Thread(target=_invalidate_inode, args=(ino,), daemon=True,
                             name="zohofs-invalidate").start()


class Operations(pyfuse3.Operations):
    def __init__(self, fs: ZohoFS, kernel: KernelNotifier, *, direct_io: bool = False) -> None:
        super().__init__()
        self.fs = fs
        self.kernel = kernel
        self.direct_io = direct_io
        self._reply = bytearray()

    def init(self) -> None:
        self.kernel.initialised.set()

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        try:
            return entry(await self.fs.lookup(parent_inode, os.fsdecode(name)))
        except NoSuchEntry:
            # A negative entry the kernel may keep for a while: file managers ask for the
            # same absent names (.hidden, desktop.ini) in every folder, again and again.
            missing = pyfuse3.EntryAttributes()
            missing.st_ino = 0
            missing.entry_timeout = NEGATIVE_TIMEOUT
            return missing

    @handler
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.getattr(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # forget() has no reply: it must not raise.
        try:
            self.fs.forget(inode_list)
        except Exception:
            log.exception("unexpected error in forget")

    @handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        await self.fs.opendir(inode)
        return inode

    @handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        await self.fs.opendir(fh)  # an archive's contents may have been let go since
        dots = [d for d in self.fs.dots(fh) if d[2] > start_id]
        entries = itertools.chain(dots, self.fs.readdir(fh, start_id))
        for n, (name, attr, next_id) in enumerate(entries, 1):
            taken = pyfuse3.readdir_reply(token, os.fsencode(name), entry(attr), next_id)
            if next_id > 2:
                # Each entry taken is a lookup the kernel will forget (`.` and `..` are
                # not); the one that did not fit is no lookup at all.
                if taken:
                    self.fs.listed(attr.ino)
                else:
                    self.fs.forget([(attr.ino, 0)])
            if not taken:
                break
            if n % READDIR_STEP == 0:
                # The kernel asks for up to 128 KiB of entries at once (about 900): other
                # requests get their turn meanwhile, or they wait 100 ms behind them.
                # Here, with every entry made so far counted: none can be freed meanwhile.
                await trio.lowlevel.checkpoint()

    @handler
    async def releasedir(self, fh: int) -> None:
        pass

    @handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        fh, keep_cache = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=keep_cache)

    @handler
    async def read(  # type: ignore[override]
            self, fh: int, off: int, size: int) -> memoryview:
        # pyfuse3 takes any buffer here (it calls PyObject_GetBuffer): a view into a cached
        # chunk spares a copy per kernel read.
        pieces = await self.fs.read(fh, off, size)
        if len(pieces) == 1:
            return pieces[0]
        # Several chunks are copied into one reply buffer, reused by every read: pyfuse3
        # sends the reply before it awaits anything (fuse_reply_buf right after this
        # coroutine returns), so no other read can overwrite it first. A fresh buffer per
        # read cost a MiB of page faults each time.
        length = sum(len(p) for p in pieces)
        if len(self._reply) < length:
            self._reply = bytearray(length)
        position = 0
        for piece in pieces:
            self._reply[position:position + len(piece)] = piece
            position += len(piece)
        return memoryview(self._reply)[:length]

    @handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(self.fs.readlink(inode))

    @handler
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        bsize, blocks, files = self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = bsize
        s.f_blocks = blocks
        s.f_bfree = s.f_bavail = blocks  # fs.statfs: not a full disk
        s.f_files = files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        value = self.fs.xattr(inode, name.decode(errors="replace"))
        if value is None:
            raise NoAttribute(f"no extended attribute {name!r}")
        return value

    @handler
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [name.encode() for name in self.fs.xattrs(inode)]

    @handler
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise ReadOnly("zohofs is read-only")
        return True

    # Everything that would change the tree: read-only, never ENOSYS (the kernel would
    # remember ENOSYS for the life of the mount).
    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only
