"""systemd's side of a mount: READY=1, STOPPING=1 and a STATUS= line kept current, sent
to $NOTIFY_SOCKET (a Type=notify unit); nothing when systemd did not start zohofs."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import trio

from zohofs.status import summary_line

log = logging.getLogger(__name__)

STATUS_EVERY = 5.0


def notify(state: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as exc:  # a notification lost is no reason to fail the mount
        log.warning("cannot notify systemd (%s): %s", address, exc)


def expected() -> bool:
    """Whether systemd listens for notifications."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


async def report_status(status: Callable[[], dict[str, object]]) -> None:
    """The one-line summary `systemctl status` shows (STATUS=), kept current."""
    while True:
        notify("STATUS=" + summary_line(status()))
        await trio.sleep(STATUS_EVERY)
