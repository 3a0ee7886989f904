"""Where a reader's interest ends, as far as zohofs can tell: fetching ahead stops there.

Two signs, each measured as waste before (a reader's window, up to 32 MiB, fetched past
where it stopped):

- **Another reader of the same file began there.** Readers that split a file between
  them (eight ``dd`` of an eighth each, a parallel copy) each stop where the next one
  began; the bytes past that point were that reader's, read long ago and maybe evicted.
  A reader that does go on past it fetches on demand there, then ahead again.
- **The end of an archive member**, for a run that began at a member's local header (or
  up to :data:`MEMBER_LEAD` before it, where a tool's buffer is aligned) of a zip: an
  archive tool extracting one member, which read the central directory first. The member
  boundaries come from that central directory, parsed from what the cache holds of it:
  no request of its own. Such a run is fetched ahead of to :data:`MEMBER_SLACK` past the
  member's end, and always that far past its reader: a tool going on from member to
  member still finds its next bytes fetched. A copy (a run from byte 0) or a run that
  began elsewhere (a parallel or resumed copy) is not fenced.

No I/O here but the cache's and a worker thread's: :class:`Interest` answers from what it
knows and learns the rest in the background.
"""

from __future__ import annotations

import bisect
import logging
from array import array
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import cachetools
import trio

from zohofs import zipindex
from zohofs.errors import BadArchive
from zohofs.planner import CHUNK, Fence, MiB, chunk_range, slice_chunks

if TYPE_CHECKING:  # for the Protocol only
    from zohofs.answers import RemoteInfo
    from zohofs.planner import ReadPattern
    from zohofs.tree import Node
    from zohofs.zoho import BackupFile

log = logging.getLogger(__name__)

# How far past a member's end, and past its reader, a run extracting it is fetched ahead.
MEMBER_SLACK = 2 * MiB
# How far before a member's local header a run may begin and still be its extraction.
MEMBER_LEAD = 64 * 1024
# Archives (versions) whose member boundaries are kept: 8 bytes a member.
ARCHIVES_KEPT = 8
# A central directory bigger than this (some 80 000 members) is not parsed for fences: a
# parse of its own would cost seconds of CPU and memory outside the cache's budget.
LEARNT_DIRECTORY = 8 * MiB
RUNS_TRIED = 64


class Reader(Protocol):
    """What this module needs of an open handle (blocks.py's ``OpenFile``)."""

    node: Node
    file: BackupFile
    info: RemoteInfo
    pattern: ReadPattern
    version: Hashable
    own: bool


H = TypeVar("H", bound=Reader)


class _NotCached(Exception):
    """The central directory is not all in the cache: learnt at a later run, maybe."""


class _TooBig(Exception):
    """The central directory is bigger than :data:`LEARNT_DIRECTORY`."""


class Interest(Generic[H]):
    def __init__(self, peek: Callable[[H, int], memoryview | None],
                 nursery: Callable[[], trio.Nursery | None]) -> None:
        """``peek(handle, index)`` gives chunk ``index`` of the handle's file if the
        memory cache holds it; ``nursery()`` is where to learn in the background."""
        self._peek = peek
        self._nursery = nursery
        self._bounds: cachetools.LRUCache[Hashable, array[int]] = (
            cachetools.LRUCache(ARCHIVES_KEPT))
        self._learning: set[Hashable] = set()
        # Runs (archive, version, start) the boundaries were tried for, and not found in
        # the cache: a run tries once, whoever else reads.
        self._tried: cachetools.LRUCache[Hashable, bool] = cachetools.LRUCache(RUNS_TRIED)

    def fence(self, handle: H, readers: Iterable[H]) -> Fence:
        """Where fetching ahead of ``handle``'s run stops (see the module's doc), given
        the run's start and where its last read ended; ``readers`` are the open handles."""

        def fence(run_start: int, end: int) -> int | None:
            stops = [h.pattern.run_start for h in readers
                     if h is not handle and h.node is handle.node and h.version == handle.version
                     and h.pattern.sequential and h.pattern.run_start >= end]
            if run_start != 0 and not handle.own and handle.file.name.endswith(".zip"):
                member_end = self._member_end(handle, run_start, end)
                if member_end is not None:
                    stops.append(member_end)
            return min(stops, default=None)

        return fence

    def _member_end(self, handle: H, run_start: int, end: int) -> int | None:
        """Where fetching ahead of a run extracting a member stops (None for a run that
        extracts none); the boundaries learnt in the background if the archive's are not
        known yet (tried again at the next run, not at each read, when the cache did not
        hold its directory). While they are learnt, ``end`` itself: a reader's window
        grows fast, and would otherwise run on past the member first."""
        key = (handle.node.ino, handle.version)
        bounds = self._bounds.get(key)
        if bounds is None:
            nursery = self._nursery()
            if (key not in self._learning and (*key, run_start) not in self._tried
                    and nursery is not None):
                nursery.start_soon(self._learn, key, handle)
                self._learning.add(key)
                self._tried[(*key, run_start)] = True
            return end if key in self._learning else None
        first = bisect.bisect_left(bounds, run_start)
        if first == len(bounds) or bounds[first] - run_start > MEMBER_LEAD:
            return None  # not begun at a member: a copy's part, not an extraction
        # The member the reader was in MEMBER_SLACK ago: a tool's last buffered read of a
        # member reaches into the next one, which is no interest in it.
        i = bisect.bisect_left(bounds, end - MEMBER_SLACK)
        return max(bounds[i] if i < len(bounds) else end, end) + MEMBER_SLACK

    def _cached(self, handle: H, offset: int, length: int, end_only: bool) -> bytes | None:
        """Bytes of the handle's file from the cache alone; None if some are not there
        (with ``end_only``, the longest end of the range that is, None if nothing is)."""
        end = min(offset + length, handle.info.size)
        wanted = chunk_range(offset, end)
        pieces: list[memoryview] = []
        for i in reversed(wanted):
            data = self._peek(handle, i)
            if data is None:
                if end_only and pieces:
                    break
                return None
            pieces.append(data)
        if not pieces:
            return b""
        first = wanted.stop - len(pieces)
        return b"".join(slice_chunks(pieces[::-1], first, max(offset, first * CHUNK), end))

    async def _learn(self, key: Hashable, handle: H) -> None:
        size = handle.info.size
        short = False

        async def read(offset: int, length: int) -> bytes:
            nonlocal short
            # Of the tail, what the cache holds of its end: a tool reads the end record and
            # the directory, not the 64 KiB before them where a comment could be.
            tail = offset + length == size
            if not tail and length > LEARNT_DIRECTORY:
                raise _TooBig
            data = self._cached(handle, offset, length, tail)
            if data is None:
                raise _NotCached
            short = short or len(data) < length
            return data

        try:
            try:
                found, _ = await zipindex.read_index(read, size)
            except BadArchive:
                if short:  # the end record may lie before what the cache holds
                    raise _NotCached from None
                raise
            # Sorting half a million offsets is no work for the event loop.
            self._bounds[key] = await trio.to_thread.run_sync(_boundaries, found, size)
        except _NotCached:
            pass
        except (BadArchive, _TooBig):
            self._bounds[key] = array("q")  # nothing to go by: no fences
        except Exception:  # in the mount's top-level nursery: must never end the mount
            log.exception("%s: unexpected error reading its member boundaries",
                          handle.file.path)
            self._bounds[key] = array("q")
        finally:
            self._learning.discard(key)


def _boundaries(found: list[zipindex.Fields], size: int) -> array[int]:
    """Where each member's local header starts, in order, and the archive's end: a
    member's bytes end at the next boundary."""
    return array("q", sorted({offset for _, _, _, _, _, offset, *_ in found} | {size}))
