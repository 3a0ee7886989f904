"""Block cache: an LRU with a byte budget and one fetch in flight per block."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

import cachetools
import trio


class _Flight:
    """A fetch in progress; later readers of the same block wait on it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: memoryview | None = None
        self.error: BaseException | None = None


class BlockCache:
    """Blocks keyed by ``(file key, block index)``.

    A second reader of a block that is being fetched waits for that fetch instead of
    issuing its own, so concurrent readers (and prefetch racing a reader) cost one GET.
    Checking the cache and registering a flight happen with no ``await`` in between.
    """

    def __init__(self, capacity: int) -> None:
        self._blocks: cachetools.LRUCache[Hashable, memoryview] = cachetools.LRUCache(
            maxsize=capacity, getsizeof=len)
        self._flights: dict[Hashable, _Flight] = {}
        self.capacity = capacity

    def __contains__(self, key: Hashable) -> bool:
        return key in self._blocks or key in self._flights

    def peek(self, key: Hashable) -> memoryview | None:
        return self._blocks.get(key)

    async def get(self, key: Hashable,
                  fetch: Callable[[], Awaitable[memoryview]]) -> memoryview:
        while True:
            data = self._blocks.get(key)
            if data is not None:
                return data
            waiting = self._flights.get(key)
            if waiting is None:
                break
            await waiting.done.wait()
            if waiting.data is not None:
                return waiting.data
            # A fetch whose task was cancelled says nothing about the block: try ourselves.
            if not isinstance(waiting.error, _Abandoned):
                assert waiting.error is not None
                raise waiting.error
        flight = self._flights[key] = _Flight()
        try:
            flight.data = await fetch()
        except BaseException as exc:
            # Never hand trio.Cancelled to another task: it belongs to our cancel scope.
            flight.error = _Abandoned() if isinstance(exc, trio.Cancelled) else exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        if len(flight.data) <= self.capacity:
            self._blocks[key] = flight.data
        return flight.data

    def put(self, key: Hashable, data: memoryview) -> None:
        """Keep a block that arrived without a fetch of its own (a streamed file)."""
        if len(data) <= self.capacity:
            self._blocks[key] = data


class _Abandoned(Exception):
    """The task fetching a block was cancelled before it finished."""
