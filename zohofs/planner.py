"""What to fetch for a read: request sizes that follow the reader, one prefetch budget.

No I/O here: the filesystem asks :class:`ReadPattern` what to fetch ahead of each read and
fetches it; the policy is tested without a server.

Everything is fetched and cached in chunks of :data:`CHUNK` bytes at multiples of
:data:`CHUNK` (the last chunk of a file is shorter), whatever the size of the request that
brought them: a random read costs the chunks it touches, while a sequential reader's
requests cover many chunks at once. With one grid, ranges of different sizes can never
overlap in the cache.
"""

from __future__ import annotations

from collections.abc import Callable

KiB = 1024
MiB = 1024 * KiB

# The cache's unit and every request's alignment: small enough that a random read fetches
# little more than it asks for, big enough that a GiB is not too many Python objects.
CHUNK = 128 * KiB
# What a new sequential run fetches ahead of its reader at first: one mid-sized request.
FIRST_WINDOW = 1 * MiB
# A run is proven sequential, and fetched ahead of, once this much was read in it (or at
# once when it starts at byte 0, as copies do): a buffered reader's one big read after a
# seek reaches FUSE as several consecutive requests, which is no sequential run.
PROVEN_RUN = 2 * MiB
# Requests a sequential reader keeps in flight, shared by the readers in a run: what a
# host's connections take at once.
IN_FLIGHT = 4
# Reads that start this little before where the last one ended still continue a run that
# is not proven yet: parallel FUSE requests arrive slightly out of order.
SLACK = 1 * MiB

# Where fetching ahead of a run stops, given where the run began and where its last read
# ended (None: nowhere before the end of the file).
Fence = Callable[[int, int], int | None]


def chunk_range(start: int, end: int) -> range:
    """The indices of the chunks holding bytes ``[start, end)``."""
    return range(start // CHUNK, -(-end // CHUNK))


def slice_chunks(pieces: list[memoryview], first_chunk: int, offset: int,
                 end: int) -> list[memoryview]:
    """Bytes ``[offset, end)`` as views of ``pieces``, the consecutive chunks from index
    ``first_chunk`` that hold them (no copy)."""
    first = offset - first_chunk * CHUNK
    if len(pieces) == 1:
        return [pieces[0][first:first + end - offset]]
    last = end - (first_chunk + len(pieces) - 1) * CHUNK
    return [pieces[0][first:], *pieces[1:-1], pieces[-1][:last]]


class PrefetchBudget:
    """Bytes fetched ahead of readers and not yet read, for the whole mount.

    Shared equally by the readers that are in a sequential run, so that readers never
    evict each other's prefetched chunks: those stay out of the evictable cache until read.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._readers: set[ReadPattern] = set()

    @property
    def readers(self) -> int:
        return len(self._readers)

    def share(self) -> int:
        return self.capacity // max(1, self.readers)

    def join(self, reader: ReadPattern) -> None:
        self._readers.add(reader)

    def leave(self, reader: ReadPattern) -> None:
        self._readers.discard(reader)

    def take(self, size: int) -> bool:
        if self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, "prefetch budget given back twice"


class ReadPattern:
    """How one open file is being read, and what to fetch ahead of it.

    A read that continues the previous one extends a sequential run. Once the run is
    proven (:data:`PROVEN_RUN`), the window fetched ahead is twice the run so far (from
    :data:`FIRST_WINDOW`, at most ``max_ahead`` and the reader's share of the budget), cut
    into requests of a quarter of the window (at most ``max_request``): a copy has about
    four requests in flight from the start, and soon large ones. Four at once is what a
    host's connections take; over links capped per connection that is what counts. With
    several readers in runs, each cuts its window into fewer, larger requests. Any other
    read ends the run: it fetches only the chunks it touches.
    """

    def __init__(self, budget: PrefetchBudget, size: int, *, max_ahead: int,
                 max_request: int) -> None:
        self._budget = budget
        self._size = size
        self._max_ahead = max_ahead
        self._max_request = max(CHUNK, max_request - max_request % CHUNK)
        self._next: int | None = None  # where the last read ended
        self._run = 0  # bytes read in the current sequential run
        self._run_start = 0
        self._issued = 0  # fetches of this run reach up to here (chunk-aligned or EOF)
        self.window = 0

    @property
    def sequential(self) -> bool:
        return self.window > 0

    @property
    def run_start(self) -> int:
        """Where the current run began."""
        return self._run_start

    def advise(self, offset: int, size: int,
               fence: Fence | None = None) -> list[tuple[int, int]]:
        """Record a read; return the ``(start, length)`` requests to make ahead of it,
        in order, none past ``fence``'s answer. The caller takes each from the budget, and
        stops at the first it cannot."""
        end = offset + size
        if self._next is None:
            sequential = offset == 0  # a copy starts at 0: start the run at once
        elif self.window:
            # A proven run forgives reads out of order by up to its window (at least two
            # requests) either way: through the page cache, the kernel's readahead
            # requests reach FUSE that far apart.
            reach = max(self.window, 2 * self._max_request)
            sequential = self._next - reach <= offset <= self._next + reach
        else:
            # A run is proven only by reads that follow on from each other: random reads
            # that happen to land near each other would otherwise prove one and start a
            # prefetch.
            sequential = self._next - SLACK <= offset <= self._next
        if not sequential:
            self.stop()
            self._next, self._run, self._run_start = end, size, offset
            return []
        # The run grows by what this read adds past its end, not by what it re-reads.
        reached = self._next or 0
        self._run += max(0, end - max(offset, reached))
        self._next = max(reached, end)
        if self._run < PROVEN_RUN and self._run_start != 0:
            return []
        if self.window == 0:
            self._budget.join(self)
            self._issued = 0
        self.window = min(self._max_ahead, self._budget.share(), max(FIRST_WINDOW, 2 * self._run))
        if self.window < CHUNK:  # no budget to spare: fetch on demand
            return []
        # Four requests in flight for the mount: a lone reader's window in four, and
        # fewer, larger ones per reader when several share the connections.
        parts = max(1, IN_FLIGHT // max(1, self._budget.readers))
        request = min(self._max_request, max(CHUNK, self.window // parts // CHUNK * CHUNK))
        start = max(self._issued, -(-end // CHUNK) * CHUNK)
        stop = fence(self._run_start, self._next) if fence is not None else None
        limit = self._size if stop is None else min(self._size, -(-stop // CHUNK) * CHUNK)
        target = min(limit, self._next + self.window)
        plans = []
        while start < target and (target - start >= request or target == limit):
            length = min(request, limit - start)
            plans.append((start, length))
            start += length
        return plans

    def limit(self, end: int) -> None:
        """Fetch nothing ahead past ``end``: the reader will read no further (a member of
        an archive, read through a handle of the whole archive)."""
        self._size = min(self._size, end)

    def issued(self, start: int, length: int) -> None:
        """The caller made (or found already made) the request ``advise`` proposed."""
        self._issued = max(self._issued, start + length)

    def stop(self) -> None:
        """The run is over (a jump, or the file was closed)."""
        if self.window:
            self._budget.leave(self)
        self.window = self._run = 0
