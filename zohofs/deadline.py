"""The read deadline: how long one kernel request may wait on the network in all.

Readers waiting on FUSE cannot be killed, so every read, and the probe behind a stat or
an open, ends within it: with its bytes, or with ReadTimeout (EIO).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from zohofs.errors import ReadTimeout

# Retries included.
READ_DEADLINE = 60.0


@contextlib.contextmanager
def deadline(seconds: float, path: str, doing: str, *args: object) -> Iterator[None]:
    """Fail with ReadTimeout when the body takes longer than ``seconds``.

    The message is only formatted on failure: this wraps every read."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise ReadTimeout(f"{path}: {doing % args}: gave up after the {seconds:g} s read "
                          "deadline (the server is too slow or not answering; see "
                          "--read-timeout)")
