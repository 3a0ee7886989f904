"""What the mount has done, for `zohofs status`: counters the layers add to as they work."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Totals since the mount started. Updated from trio and from worker threads: each
    update is one integer addition, which the GIL keeps whole."""

    started: float = field(default_factory=time.time)
    gets: int = 0  # ranged GETs answered, probes included
    bytes_fetched: int = 0  # body bytes announced by those answers
    retries: int = 0
    chunk_hits: int = 0  # chunks a read found cached or on their way
    chunk_misses: int = 0  # chunks a read had to ask for
    bytes_inflated: int = 0  # output of inflating zip members (--expand)
    errors: Counter[str] = field(default_factory=Counter)  # by errno name

    def fetched(self, length: int | None) -> None:
        self.gets += 1
        self.bytes_fetched += length or 0


@dataclass
class FileActivity:
    """One open file, as `zohofs status` shows it."""

    path: str
    size: int
    opened: float = field(default_factory=time.time)
    bytes_read: int = 0
    end: int = 0  # the furthest byte read

    def read(self, offset: int, length: int) -> None:
        self.bytes_read += length
        self.end = max(self.end, offset + length)

    def summary(self, now: float) -> dict[str, object]:
        elapsed = max(now - self.opened, 1e-3)
        return {"path": self.path, "size": self.size, "bytes_read": self.bytes_read,
                "progress": self.end / self.size if self.size else 1.0,
                "bytes_per_second": self.bytes_read / elapsed}
