"""Blocking HTTP/1.1 with kept-alive connections, for worker threads.

The bulk bytes move here rather than through httpx: on these machines the standard
library's client over ``ssl``, reading with ``readinto`` into a preallocated buffer, moves
TLS data about five times faster than httpx's async client on trio (see the README's
performance section). Callers run :meth:`Transport.request` in a worker thread and give
it an :class:`Exchange`, through which the event loop can abort the request at once: a
socket timeout only bounds each ``recv``, so a server that drips bytes would otherwise
hold the thread (and the reader waiting on it) for ever.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import quote, urlsplit

from zohofs.buffers import BufferPool
from zohofs.errors import BadAnswer, TransportError, reason
from zohofs.hosts import host_port

T = TypeVar("T")

# Errors that mean "this connection is dead", as opposed to "the server said no".
# ValueError: http.client's chunked decoder raises it on a malformed chunk size.
_CONNECTION_ERRORS = (OSError, http.client.HTTPException, ssl.SSLError, ValueError)
# Errors on a reused connection that mean the server closed it before it saw our request:
# the request is safe to send again on a fresh connection. Timeouts are not among them: a
# server that is slow to answer is slow on a fresh connection too.
_STALE_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                 ConnectionAbortedError, ssl.SSLEOFError)
# An idle connection older than this is not reused: servers close idle keep-alive
# connections (nginx after 75 s, CDNs after a few seconds) and the race with their close
# is lost more often the older the connection is.
MAX_IDLE = 30.0

_Key = tuple[str, str, int]


class Exchange:
    """One request in flight in a worker thread, abortable from any other thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.aborted = False

    def attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if self.aborted:
                conn.close()
                raise TransportError("request aborted")
            self._conn = conn

    def detach(self) -> None:
        """The request is over (its connection pooled, closed or handed on)."""
        with self._lock:
            self._conn = None

    def abort(self) -> None:
        """Wake the worker thread by shutting its socket down; it then fails quickly.

        ``close()`` alone would not wake a ``recv`` blocked in another thread."""
        with self._lock:
            self.aborted = True
            conn, self._conn = self._conn, None
        if conn is not None:
            _shutdown(conn)


def _shutdown(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is usable only if the server has sent nothing on it: readable
    means it closed it (EOF) or sent something we never asked for."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class Transport:
    """A small pool of keep-alive connections per (scheme, host, port)."""

    def __init__(self, ssl_context: ssl.SSLContext, timeout: float,
                 max_idle_per_host: int = 8) -> None:
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._max_idle = max_idle_per_host
        self._idle: dict[_Key, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()

    def _connect(self, key: _Key) -> http.client.HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self._timeout,
                                               context=self._ssl_context)
        return http.client.HTTPConnection(host, port, timeout=self._timeout)

    def _checkout(self, key: _Key) -> http.client.HTTPConnection | None:
        """A pooled connection that is still open, or None."""
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                since, conn = idle.pop()
            if now - since < MAX_IDLE and _still_open(conn):
                return conn
            conn.close()

    def _checkin(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def request(self, method: str, url: str, headers: Mapping[str, str],
                handle: Callable[[http.client.HTTPResponse], T], exchange: Exchange) -> T:
        """Send one request and let ``handle`` read the answer.

        The connection goes back to the pool only when ``handle`` consumed the whole body;
        otherwise it is closed, so a half-read answer can never leak into the next one.
        A pooled connection that the server closed before it saw the request is replaced
        by a fresh one, once; every other failure is the caller's to retry.
        """
        key = host_port(url)
        parts = urlsplit(url)
        # http.client sends the target as ASCII: anything else is percent-encoded, as a
        # browser would, instead of failing inside the library.
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                       safe="/?=&%:@!$'()*+,;~-._")
        pooled = self._checkout(key)
        conn = pooled or self._connect(key)
        exchange.attach(conn)
        try:
            try:
                response = _send(conn, method, target, headers)
            except _STALE_ERRORS:
                if pooled is None:
                    raise
                conn.close()
                conn = self._connect(key)
                exchange.attach(conn)
                response = _send(conn, method, target, headers)
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            # Trying again will not make the certificate trustworthy.
            err = TransportError(f"TLS certificate of {key[1]}:{key[2]} not trusted: "
                                 f"{exc.verify_message} (see --ca-file)")
            err.transient = False
            raise err from exc
        except _CONNECTION_ERRORS as exc:
            conn.close()
            if _oversized_headers(exc):  # a server that will do it again: not retried
                raise BadAnswer(f"{key[1]}:{key[2]} answered with oversized headers "
                                f"({reason(exc)})") from exc
            if exchange.aborted:
                raise TransportError("request aborted") from exc
            raise TransportError(f"cannot reach {key[1]}:{key[2]}: {reason(exc)}") from exc
        try:
            result = handle(response)
        except BaseException:
            conn.close()
            raise
        finally:
            exchange.detach()
        if isinstance(result, OpenBody):
            result.connection = conn  # the body is read later; the connection goes along
        elif response.isclosed() and not response.will_close and not exchange.aborted:
            self._checkin(key, conn)
        else:
            conn.close()
        return result

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for _, c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _send(conn: http.client.HTTPConnection, method: str, target: str,
          headers: Mapping[str, str]) -> http.client.HTTPResponse:
    conn.request(method, target, headers=dict(headers))
    return conn.getresponse()


def _oversized_headers(exc: BaseException) -> bool:
    # http.client has a class for an over-long line, and only a message for too many.
    return isinstance(exc, http.client.LineTooLong) or (
        type(exc) is http.client.HTTPException and "headers" in str(exc))


class OpenBody:
    """An answer whose body the caller reads later, bit by bit; it owns its connection.

    A ``handle`` given to :meth:`Transport.request` returns one to keep the answer open.
    """

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response
        self.connection: http.client.HTTPConnection | None = None

    def read(self, length: int) -> memoryview:
        return read_exactly(self.response, length)

    def abort(self) -> None:
        """Wake a thread blocked reading this body (from any thread)."""
        if self.connection is not None:
            _shutdown(self.connection)

    def close(self) -> None:
        self.response.close()
        if self.connection is not None:
            self.connection.close()


def read_exactly(response: http.client.HTTPResponse, length: int) -> memoryview:
    """The next ``length`` body bytes, or TransportError if the body ends early."""
    return read_pieces(response, length, length)[0]


def read_pieces(response: http.client.HTTPResponse, length: int, piece: int,
                buffers: BufferPool | None = None) -> list[memoryview]:
    """The next ``length`` body bytes as pieces of ``piece`` bytes (the last shorter), or
    TransportError if the body ends early.

    Each piece is read straight into a buffer of its own (one of ``buffers`` when given and
    the size fits): the cache keeps pieces apart, so none is copied, and an evicted piece
    frees exactly its buffer. Read-only views: turning them into ``bytes`` would be a copy
    made holding the GIL, which stalls the thread serving FUSE.
    """
    pieces = []
    got = 0
    try:
        for offset in range(0, length, piece):
            size = min(piece, length - offset)
            view = memoryview(buffers.take() if buffers is not None and size == buffers.size
                              else bytearray(size))
            filled = 0
            while filled < len(view):
                n = response.readinto(view[filled:])
                if not n:
                    raise TransportError(f"body ended after {got + filled} of {length} bytes")
                filled += n
            got += filled
            pieces.append(view.toreadonly())
    except _CONNECTION_ERRORS as exc:
        raise TransportError(f"connection broke after {got} of {length} bytes: "
                             f"{reason(exc)}") from exc
    return pieces


def read_small(response: http.client.HTTPResponse, limit: int = 64 * 1024) -> bytes:
    """Up to ``limit`` bytes of an answer we only want to log (error pages)."""
    try:
        return response.read(limit)
    except _CONNECTION_ERRORS:
        return b""
