"""How the mount gives memory back to the system (glibc; elsewhere nothing to do).

Python frees objects, but the C library keeps what was freed inside its heaps for later,
one heap per thread that allocated: after the nodes of a half-million-member listing
were freed, a fifth of their memory stayed with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

# mallopt's parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
BIG = 256 * 1024  # a buffer this big or bigger gets a mapping of its own
HEAPS = 2  # the main one, and one for every worker thread: they take turns on Python's lock


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: once
    return ctypes.CDLL(name) if name else None


def tune_allocator() -> None:
    """Call before any thread starts.

    Every buffer of :data:`BIG` or more gets a mapping of its own, returned to the system
    when freed (chunk buffers are maps of their own anyway, see buffers.py, and reused). glibc
    raises its mmap threshold each time a big buffer is freed, after which big buffers
    come from per-thread heaps that seldom shrink: with the 8 MiB blocks zohofs once had,
    peak RSS grew to several times the cache budget.

    At most :data:`HEAPS` heaps (by default eight per core): what worker threads free
    then lands where it can be handed back.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, BIG)
        mallopt(_M_ARENA_MAX, HEAPS)


class Collector:
    """Keeps Python's full collections short while a listing makes nodes by the hundred
    thousand.

    A full collection follows every object the program holds, with every request held
    meanwhile; it comes each time the objects held grew by a quarter. Nodes are held until
    the kernel forgets them: at half a million, each full collection took 0.1 to 0.25 s.
    Each time :data:`FREEZE_STEP` more are held, what exists is moved out of the
    collector's sight (``gc.freeze``): a full collection then follows only what came since.
    Nodes make no reference cycles: frozen or not, each is freed as soon as the tree lets
    go of it. Cyclic garbage that happened to exist at a freeze waits until the nodes
    shrink by a step, or :meth:`give_back`.
    """

    FREEZE_STEP = 25_000

    def __init__(self) -> None:
        self._held_at_freeze = 0

    def held(self, count: int) -> None:
        """The tree holds ``count`` nodes now."""
        if count >= self._held_at_freeze + self.FREEZE_STEP:
            gc.freeze()
            self._held_at_freeze = count
        elif count < self._held_at_freeze - self.FREEZE_STEP:
            # Many were freed: the collector may look at everything again (garbage in
            # cycles that happened to be frozen included), and growth counts from here.
            gc.unfreeze()
            self._held_at_freeze = count

    def give_back(self) -> None:
        """Hand freed memory back: garbage in reference cycles first, the frozen included
        (it would otherwise wait for Python's rare full collection, and each survivor pins
        the 1 MiB arena it is in), then what the C library keeps inside its heaps."""
        gc.unfreeze()
        self._held_at_freeze = 0
        gc.collect()
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim(0)
