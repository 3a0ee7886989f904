"""What a running mount shows of itself: the status of the root's ``user.zohofs.status``
and each file's extended attributes, and how `zohofs status` and systemd render them."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from zohofs.diskcache import DiskCache
from zohofs.errors import ConfigError
from zohofs.logs import redact_url
from zohofs.stats import FileActivity, Stats
from zohofs.tree import Node

STATUS_XATTR = "user.zohofs.status"


def snapshot(stats: Stats, files: list[Node], open_files: Iterable[FileActivity],
             cache_bytes: int, token_refreshes: int,
             disk: DiskCache | None = None) -> dict[str, object]:
    """The figures `zohofs status` shows, as JSON-ready values."""
    now = time.time()
    expiries = [n.file.expires for n in files if n.file and n.file.expires]
    on_disk = {} if disk is None else {"disk_cache_bytes": disk.size,
                                       "disk_cache_hits": disk.hits,
                                       "disk_cache_dropped": disk.dropped}
    return {**on_disk,
        "mounted_since": datetime.fromtimestamp(stats.started, UTC).isoformat(),
        "files": len(files),
        "open_files": [activity.summary(now) for activity in open_files],
        "bytes_inflated": stats.bytes_inflated,
        "gets": stats.gets, "bytes_fetched": stats.bytes_fetched,
        "retries": stats.retries,
        "chunk_hits": stats.chunk_hits, "chunk_misses": stats.chunk_misses,
        "cache_bytes": cache_bytes,
        "errors": dict(stats.errors),
        "token_refreshes": token_refreshes,
        "links_expire": min(expiries).isoformat() if expiries else None,
    }


def file_xattrs(node: Node) -> dict[str, bytes]:
    """A file's source (never the query: tokens hide there), size, validator, expiry."""
    if node.file is None:
        return {}
    found = {"user.zohofs.url": redact_url(node.file.url)}
    if node.info is not None:
        found["user.zohofs.size"] = str(node.info.size)
        if node.info.etag:
            found["user.zohofs.etag"] = node.info.etag
    if node.file.expires is not None:
        found["user.zohofs.expires"] = node.file.expires.isoformat()
    return {k: v.encode() for k, v in found.items()}


# -- the command line's side ---------------------------------------------------------------

def read(mountpoint: str) -> dict[str, Any]:
    """The status of the mount at ``mountpoint``, asked of the mount itself."""
    try:
        status: dict[str, Any] = json.loads(os.getxattr(mountpoint, STATUS_XATTR))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise ConfigError(f"{mountpoint} is not a zohofs mount") from None
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(f"{mountpoint}: the zohofs process that served it has ended "
                              "(Transport endpoint is not connected); see its log for why, "
                              f"then `zohofs mount {mountpoint}` again (it clears the dead "
                              f"mount) or `fusermount3 -u {mountpoint}`") from None
        raise ConfigError(f"cannot ask {mountpoint}: {exc.strerror}") from None
    return status


def _local(when: str | None) -> str:
    """An ISO time as this machine's clock shows it (Zoho gives its own zone)."""
    if not when:
        return "-"
    return datetime.fromisoformat(when).astimezone().isoformat(sep=" ", timespec="seconds")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def describe(mountpoint: str, s: dict[str, Any]) -> str:
    """The screen of `zohofs status`."""
    lines = [f"zohofs on {mountpoint}: {s['files']} files, mounted since "
             f"{_local(s['mounted_since'])}, links expire {_local(s['links_expire'])}",
             f"fetched {_mb(s['bytes_fetched'])} in {s['gets']} GETs, {s['retries']} retries; "
             f"cache {_mb(s['cache_bytes'])}, chunks {s['chunk_hits']} hit / "
             f"{s['chunk_misses']} missed; {s['token_refreshes']} token refreshes"
             + (f"; inflated {_mb(s['bytes_inflated'])}" if s.get("bytes_inflated") else ""),
             "errors: " + (", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items()))
                           or "none")]
    if "disk_cache_bytes" in s:
        lines.append(f"disk cache {_mb(s['disk_cache_bytes'])}, {s['disk_cache_hits']} chunks "
                     f"read from it, {s['disk_cache_dropped']} damaged ones dropped")
    lines.append(f"open files: {len(s['open_files'])}")
    for f in s["open_files"]:
        lines.append(f"  {f['path']}  {_mb(f['bytes_read'])} read of {_mb(f['size'])} "
                     f"({f['progress']:.0%})  {_mb(f['bytes_per_second'])}/s")
    return "\n".join(lines)


def summary_line(s: dict[str, Any]) -> str:
    """The one line `systemctl status` shows."""
    errors = sum(s["errors"].values())
    return (f"{s['files']} files, {len(s['open_files'])} open; fetched "
            f"{_mb(s['bytes_fetched'])} in {s['gets']} GETs; {errors} errors")
