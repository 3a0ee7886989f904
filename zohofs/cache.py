"""Chunk cache: an LRU with a byte budget, chunks held for their reader, fetches in flight."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import cachetools
import trio


class Flight:
    """A fetch in progress; readers of its chunk wait on it instead of fetching again."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: memoryview | None = None
        self.error: BaseException | None = None


class Abandoned(Exception):
    """The fetch of a chunk ended without a verdict on it (cancelled, or a prefetch that
    gave up): whoever needs the chunk fetches it again."""


class _LRU(cachetools.LRUCache[Hashable, memoryview]):
    def __init__(self, capacity: int, on_evict: Callable[[memoryview], None]) -> None:
        super().__init__(maxsize=capacity, getsizeof=len)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Hashable, memoryview]:
        key, data = super().popitem()
        self._on_evict(data)
        return key, data


class ChunkCache:
    """Chunks keyed by ``(file key, chunk index)``, in three places.

    - *in flight*: a request for it is out; its :class:`Flight` tells waiters the outcome.
    - *held*: fetched ahead for a reader that has not read it yet; never evicted (the
      prefetch budget bounds these), moved to the LRU once read or no longer wanted.
    - the *LRU*: everything else, evicted least recently used first, so that held and
      LRU chunks together stay within ``capacity`` bytes, and so do the LRU and what
      ``reserved`` says is held or on its way to be.

    Registering flights happens with no ``await`` after checking that a chunk is nowhere,
    so two readers never fetch the same chunk.
    """

    def __init__(self, capacity: int, reserved: Callable[[], int] = lambda: 0,
                 on_evict: Callable[[memoryview], None] = lambda data: None) -> None:
        self._lru = _LRU(capacity, on_evict)
        self._held: dict[Hashable, memoryview] = {}
        self.held_bytes = 0
        self._reserved = reserved
        self._flights: dict[Hashable, Flight] = {}
        self.capacity = capacity

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru or key in self._held or key in self._flights

    def peek(self, key: Hashable) -> memoryview | None:
        data = self._lru.get(key)
        return self._held.get(key) if data is None else data

    def flight(self, key: Hashable) -> Flight | None:
        return self._flights.get(key)

    def begin(self, keys: Iterable[Hashable]) -> None:
        """Announce fetches of ``keys`` (none of which may be anywhere in the cache)."""
        for key in keys:
            assert key not in self, "a chunk fetched twice"
            self._flights[key] = Flight()

    def arrive(self, key: Hashable, data: memoryview, *, hold: bool) -> None:
        """A chunk arrived: wake its waiters and keep it (held for its reader, or in the
        LRU)."""
        flight = self._flights.pop(key, None)
        if hold:
            self._held[key] = data
            self.held_bytes += len(data)
            self._make_room()
        else:
            self.put(key, data)
        if flight is not None:
            flight.data = data
            flight.done.set()

    def fail(self, key: Hashable, error: BaseException) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None:
            flight.error = error
            flight.done.set()

    def release(self, key: Hashable) -> None:
        """A held chunk was read, or its reader left: from now on it may be evicted."""
        data = self._held.pop(key, None)
        if data is not None:
            self.held_bytes -= len(data)
            self.put(key, data)

    def put(self, key: Hashable, data: memoryview) -> None:
        """Keep a chunk in the LRU (one that arrived without a flight: a streamed file)."""
        if len(data) + self._room_taken() <= self.capacity:
            self._lru[key] = data
            self._make_room()

    def _make_room(self) -> None:
        while self._lru and self._lru.currsize + self._room_taken() > self.capacity:
            self._lru.popitem()

    @property
    def size(self) -> int:
        """Bytes cached now, held chunks included."""
        return int(self._lru.currsize) + self.held_bytes

    def _room_taken(self) -> int:
        return max(self.held_bytes, self._reserved())
