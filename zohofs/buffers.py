"""Chunk buffers used again once the cache lets go of them.

A fresh buffer per chunk cost half the mount's CPU in a profile of a cold copy: the
allocation zero-fills it holding the GIL, and its pages fault in as the body is read into
it. Buffers of evicted chunks are kept instead and read into again.
"""

from __future__ import annotations

from collections import deque


def _unexported(buffer: bytearray) -> bool:
    """Whether no view of ``buffer`` exists: Python refuses to resize a bytearray that
    has exported its memory (PEP 3118), and only views are ever handed out. Shrunk by a
    byte, then grown back: within its allocation, so it is never moved or made bigger
    (growing first made every pooled buffer a reallocated 147 KiB one)."""
    try:
        buffer.pop()
    except BufferError:
        return False
    buffer.append(0)  # its contents are for the next fetch to write
    return True


class BufferPool:
    """Free buffers of ``size`` bytes, at most ``limit`` of them.

    A buffer is only handed out again when nothing refers to it any more: a view of an
    evicted chunk may still be on its way to the kernel, or held by a read joining pieces.
    Taking and giving are safe from any thread (deque operations are atomic).
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self._free: deque[bytearray] = deque(maxlen=limit)

    def take(self) -> bytearray:
        while True:
            try:
                buffer = self._free.pop()
            except IndexError:
                return bytearray(self.size)
            if _unexported(buffer):
                return buffer

    def give(self, view: memoryview) -> None:
        """A chunk left the cache: its buffer may serve again."""
        buffer = view.obj
        if isinstance(buffer, bytearray) and len(buffer) == self.size:
            self._free.append(buffer)
