"""Blocking HTTP/1.1 with kept-alive connections, for worker threads.

The bulk bytes move here rather than through httpx: on these machines the standard
library's client over ``ssl``, reading with ``readinto`` into a preallocated buffer, moves
TLS data about five times faster than httpx's async client on trio (see the README's
performance section). Callers run :meth:`Transport.request` in a worker thread.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

from zohofs.errors import TransportError
from zohofs.hosts import host_port

T = TypeVar("T")

# Errors that mean "this connection is dead", as opposed to "the server said no".
_CONNECTION_ERRORS = (OSError, http.client.HTTPException, ssl.SSLError)


class Transport:
    """A small pool of keep-alive connections per (scheme, host, port)."""

    def __init__(self, ssl_context: ssl.SSLContext, timeout: float,
                 max_idle_per_host: int = 8) -> None:
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def _connect(self, key: tuple[str, str, int]) -> http.client.HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self._timeout,
                                               context=self._ssl_context)
        return http.client.HTTPConnection(host, port, timeout=self._timeout)

    def _checkout(self, key: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        return self._connect(key), False

    def _checkin(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def request(self, method: str, url: str, headers: Mapping[str, str],
                handle: Callable[[http.client.HTTPResponse], T]) -> T:
        """Send one request and let ``handle`` read the answer.

        The connection goes back to the pool only when ``handle`` consumed the whole body;
        otherwise it is closed, so a half-read answer can never leak into the next one.
        A kept-alive connection that the server closed while idle is retried once on a
        fresh one (the request never reached the server, so this is always safe).
        """
        key = host_port(url)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for _attempt in range(2):
            conn, reused = self._checkout(key)
            try:
                conn.request(method, target, headers=dict(headers))
                response = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                conn.close()
                # Trying again will not make the certificate trustworthy.
                err = TransportError(f"TLS certificate of {key[1]}:{key[2]} not trusted: "
                                     f"{exc.verify_message} (see --ca-file)")
                err.transient = False
                raise err from exc
            except _CONNECTION_ERRORS as exc:
                conn.close()
                if reused:
                    continue
                raise TransportError(f"cannot reach {key[1]}:{key[2]}: {_describe(exc)}") from exc
            try:
                result = handle(response)
            except BaseException:
                conn.close()
                raise
            if isinstance(result, OpenBody):
                result.connection = conn  # the body is read later; the connection goes along
                return result
            if response.isclosed() and not response.will_close:
                self._checkin(key, conn)
            else:
                conn.close()
            return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class OpenBody:
    """An answer whose body the caller reads later, bit by bit; it owns its connection.

    A ``handle`` given to :meth:`Transport.request` returns one to keep the answer open.
    """

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response
        self.connection: http.client.HTTPConnection | None = None

    def read(self, length: int) -> memoryview:
        return read_exactly(self.response, length)

    def close(self) -> None:
        self.response.close()
        if self.connection is not None:
            self.connection.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def read_exactly(response: http.client.HTTPResponse, length: int) -> memoryview:
    """The next ``length`` body bytes, or TransportError if the body ends early.

    A read-only view of the buffer they were read into: turning 8 MiB into ``bytes`` is a
    copy made holding the GIL, which stalls the thread serving FUSE (a fifth of the samples
    in a profile of a cold ``cat``).
    """
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    try:
        while got < length:
            n = response.readinto(view[got:])
            if not n:
                break
            got += n
    except _CONNECTION_ERRORS as exc:
        raise TransportError(f"connection broke after {got} of {length} bytes: "
                             f"{_describe(exc)}") from exc
    if got != length:
        raise TransportError(f"body ended after {got} of {length} bytes")
    return view.toreadonly()


def read_small(response: http.client.HTTPResponse, limit: int = 64 * 1024) -> bytes:
    """Up to ``limit`` bytes of an answer we only want to log (error pages)."""
    try:
        return response.read(limit)
    except _CONNECTION_ERRORS:
        return b""
