"""Chunk buffers used again once the cache lets go of them.

A fresh buffer per chunk cost half the mount's CPU in a profile of a cold copy: the
allocation zero-fills it holding the GIL, and its pages fault in as the body is read into
it. Buffers of evicted chunks are kept instead and read into again.

Each buffer is a private anonymous memory map: page-aligned, so the disk cache writes
the very buffer a chunk was fetched into with ``O_DIRECT`` (no copy, no page cache; see
chunkfiles.py), and zero-filled by the kernel rather than under the GIL. Private: the
kernel merges neighbouring private maps, where shared ones took a map each (at 8 GiB of
cache, past ``vm.max_map_count``).
"""

from __future__ import annotations

import mmap
from collections import deque

Buffer = mmap.mmap | bytearray


def _unexported(buffer: mmap.mmap) -> bool:
    """Whether no view of ``buffer`` exists: a map refuses to be resized while it has
    exported its memory (PEP 3118), and only views are ever handed out. Resized to its
    own size: nothing moves."""
    try:
        buffer.resize(len(buffer))
    except BufferError:
        return False
    return True


class BufferPool:
    """Free buffers of ``size`` bytes, at most ``limit`` of them.

    A buffer is only handed out again when nothing refers to it any more: a view of an
    evicted chunk may still be on its way to the kernel or to the disk cache, or held by a
    read joining pieces. Taking and giving are safe from any thread (deque operations are
    atomic).
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self._free: deque[mmap.mmap] = deque(maxlen=limit)

    def take(self) -> mmap.mmap:
        # One still in use (a view of it on its way to the disk cache, say) goes back to
        # the other end, each looked at once at most.
        for _ in range(len(self._free)):
            try:
                buffer = self._free.pop()
            except IndexError:
                break
            if _unexported(buffer):
                return buffer
            self._free.appendleft(buffer)
        return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, view: memoryview) -> None:
        """A chunk left the cache: its buffer may serve again."""
        buffer = view.obj
        if isinstance(buffer, mmap.mmap) and len(buffer) == self.size:
            self._free.append(buffer)
