"""Ranged GETs against a download link: probing, validation and retries.

Knows nothing of FUSE or caching. Every answer is checked before a byte of it is used,
and only errors from :mod:`zohofs.errors` leave this module.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import tenacity
import trio

from zohofs.answers import (
    RemoteInfo,
    check_body,
    check_unchanged,
    raise_for_status,
    read_probe,
    read_range,
)
from zohofs.auth import TokenSource, authorization_header
from zohofs.buffers import BufferPool
from zohofs.errors import (
    AccessDenied,
    BadAnswer,
    ConfigError,
    RemoteError,
    Throttled,
    TransportError,
    is_transient,
)
from zohofs.hosts import HostPolicy, host_port, is_loopback
from zohofs.logs import redact_url
from zohofs.slots import HostSlots
from zohofs.stats import Stats
from zohofs.transport import (
    Exchange,
    OpenBody,
    Transport,
    read_small,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 10.0


def time_left() -> float:
    """Seconds until the innermost trio deadline (inf when there is none)."""
    return trio.current_effective_deadline() - trio.current_time()


class _Wait(tenacity.wait.wait_base):
    """Exponential backoff with jitter, unless the server said how long to wait."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._backoff = tenacity.wait_random_exponential(multiplier=policy.base_delay,
                                                         max=policy.max_delay)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RemoteError) and exc.retry_after is not None:
            return exc.retry_after  # never beyond the deadline: see _no_long_waits
        return float(self._backoff(retry_state))


class RangeReader:
    """Probe and read byte ranges of download links."""

    def __init__(self, transport: Transport, policy: HostPolicy,
                 retry: RetryPolicy = RetryPolicy(), connections_per_host: int = 4,
                 request_deadline: float = 30.0, stats: Stats | None = None) -> None:
        self._transport = transport
        self._policy = policy
        self._retry = retry
        self._connections = connections_per_host
        self._request_deadline = request_deadline
        self.stats = stats or Stats()
        self._hosts: dict[tuple[str, str, int], HostSlots] = {}

    def _slots(self, url: str) -> HostSlots:
        key = host_port(url)
        if key not in self._hosts:
            self._hosts[key] = HostSlots(self._connections)
        return self._hosts[key]

    async def probe(self, url: str, tokens: TokenSource) -> RemoteInfo:
        """Size and validators of the file behind ``url``.

        ``Range: bytes=0-0`` rather than HEAD: it works whether or not the server knows
        HEAD, and tells in one go whether it honours Range at all.
        """
        return await self._with_retries(url, {"Range": "bytes=0-0"}, tokens, read_probe)

    async def fetch(self, url: str, start: int, length: int, info: RemoteInfo,
                    tokens: TokenSource, piece: int | None = None,
                    buffers: BufferPool | None = None) -> list[memoryview]:
        """Exactly the bytes ``[start, start+length)`` of the file ``info`` describes, in
        pieces of ``piece`` bytes (the last shorter; default: one piece), read into
        buffers from ``buffers`` where they fit."""
        if length <= 0 or start < 0 or start + length > info.size:
            raise BadAnswer(f"range {start}+{length} outside a file of {info.size} bytes")
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        # Pin the validator seen at probe time: a replaced file fails with 412 (-> ESTALE)
        # instead of mixing old and new bytes. Weak ETags cannot be used with If-Match.
        if info.etag and not info.etag.startswith("W/"):
            headers["If-Match"] = info.etag
        elif info.last_modified is not None:
            headers["If-Unmodified-Since"] = email.utils.formatdate(info.last_modified,
                                                                     usegmt=True)

        def read(response: http.client.HTTPResponse, url: str) -> list[memoryview]:
            return read_range(response, url, start, length, info, piece or length, buffers)

        return await self._with_retries(url, headers, tokens, read)

    async def open_whole(self, url: str, info: RemoteInfo,
                         tokens: TokenSource) -> WholeFileStream:
        """The whole file as one stream, for servers that ignore Range."""
        def read(response: http.client.HTTPResponse, url: str) -> OpenBody:
            return _open_whole(response, url, info)

        return WholeFileStream(await self._with_retries(url, {}, tokens, read), info)

    async def _with_retries(self, url: str, headers: dict[str, str], tokens: TokenSource,
                            read: Callable[[http.client.HTTPResponse, str], T]) -> T:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._retry.attempts),
            wait=_Wait(self._retry),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=lambda state: self._retrying(url, state),
            sleep=trio.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await _no_long_waits(self._authorised_get(url, headers, tokens, read))
        raise AssertionError("unreachable")  # tenacity reraises the last error

    def _retrying(self, url: str, state: tenacity.RetryCallState) -> None:
        self.stats.retries += 1
        log.info("retrying %s after: %s", redact_url(url),
                 state.outcome.exception() if state.outcome else "?")

    async def _authorised_get(self, url: str, headers: dict[str, str], tokens: TokenSource,
                              read: Callable[[http.client.HTTPResponse, str], T]) -> T:
        token = await tokens.token()
        try:
            return await self._get(url, headers, token, read)
        except AccessDenied as exc:
            # An access token that expired under us is renewed once, then tried again.
            if exc.status == 401 and await tokens.rejected(token):
                return await self._get(url, headers, await tokens.token(), read)
            raise

    async def _get(self, url: str, headers: dict[str, str], token: str,
                   read: Callable[[http.client.HTTPResponse, str], T]) -> T:
        for _hop in range(_MAX_REDIRECTS + 1):
            sent = {"Accept-Encoding": "identity", "User-Agent": "zohofs", **headers}
            # The token goes only to hosts that may see it, also after a redirect.
            if self._policy.may_send_token(url):
                sent["Authorization"] = authorization_header(token)

            def call(exchange: Exchange, url: str = url,
                     sent: dict[str, str] = sent) -> T | _Redirect:
                started, answer = time.monotonic(), "no answer"

                def handle(response: http.client.HTTPResponse) -> T | _Redirect:
                    nonlocal answer
                    if response.status in (200, 206):
                        self.stats.fetched(response.length)
                    answer = f"{response.status} {response.reason}" + (
                        f", {response.length} bytes" if response.length is not None else "")
                    return _follow_or_read(response, url, read)

                try:
                    return self._transport.request("GET", url, sent, handle, exchange)
                except BaseException as exc:
                    answer += f", then {type(exc).__name__}"
                    raise
                finally:
                    # One line per request with -d; the query stays out (tokens hide there).
                    log.debug("GET %s%s -> %s in %.0f ms", redact_url(url),
                              f" ({sent['Range']})" if "Range" in sent else "", answer,
                              (time.monotonic() - started) * 1000)

            result = await self._in_thread(url, call)
            if not isinstance(result, _Redirect):
                return result
            url = str(result)
        raise BadAnswer(f"more than {_MAX_REDIRECTS} redirects from {redact_url(url)}")

    async def _in_thread(self, url: str, call: Callable[[Exchange], T]) -> T:
        """Run one blocking request within the request deadline, aborting it for real
        (socket shut down, thread freed) on timeout or cancellation.

        The host's connection slot is held in trio, not by the thread: an abandoned
        request gives its slot back at once, so a stuck request cannot starve the others.
        """
        exchange = Exchange()
        async with self._slots(url).slot(urlsplit(url).path):
            try:
                with trio.fail_after(self._request_deadline):
                    return await trio.to_thread.run_sync(call, exchange,
                                                         abandon_on_cancel=True)
            except trio.TooSlowError:
                raise TransportError(f"no complete answer from {redact_url(url)} within "
                                     f"{self._request_deadline:g} s") from None
            finally:
                exchange.abort()  # a no-op once the request is over


class WholeFileStream:
    """A file read front to back from one whole-file answer, for servers that ignore Range.

    It can only move forward: whoever needs an earlier byte opens a new one.
    """

    def __init__(self, body: OpenBody, info: RemoteInfo) -> None:
        self._body = body
        self.info = info
        self.position = 0

    async def read(self, length: int) -> memoryview:
        try:
            data = await trio.to_thread.run_sync(self._body.read, length,
                                                 abandon_on_cancel=True)
        except BaseException:
            self._body.abort()  # wake an abandoned thread; the stream is unusable now
            raise
        self.position += length
        return data

    def close(self) -> None:
        self._body.close()


def _open_whole(response: http.client.HTTPResponse, url: str, info: RemoteInfo) -> OpenBody:
    if response.status != 200:
        raise_for_status(response, url)
    check_unchanged(response, info, redact_url(url))
    check_body(response, redact_url(url))
    if response.length != info.size:
        raise BadAnswer(f"{redact_url(url)}: whole-file answer of {response.length} bytes, "
                        f"expected {info.size}")
    return OpenBody(response)


async def _no_long_waits(call: Awaitable[T]) -> T:
    """The call's result; a server asking to wait longer than the caller's deadline
    allows fails now with EBUSY instead of holding the reader until the deadline."""
    try:
        return await call
    except RemoteError as exc:
        if exc.retry_after is not None and exc.retry_after > time_left():
            err = Throttled(f"{exc}; the server asks to wait {exc.retry_after:.0f} s, longer "
                            "than the read deadline allows", status=exc.status)
            err.transient = False
            raise err from exc
        raise


class _Redirect(str):
    """The absolute target of a redirect the transport handed back."""


def _follow_or_read(response: http.client.HTTPResponse, url: str,
                    read: Callable[[http.client.HTTPResponse, str], T]) -> T | _Redirect:
    if response.status in _REDIRECTS:
        location = response.headers.get("Location")
        read_small(response)
        if not location:
            raise BadAnswer(f"redirect without Location from {redact_url(url)}")
        try:
            target = urljoin(url, location)
        except ValueError:
            raise BadAnswer(f"redirect to a malformed Location from {redact_url(url)}") from None
        try:
            scheme, host, _ = host_port(target)
        except ConfigError:
            raise BadAnswer(f"{redact_url(url)} redirects to something that is not an "
                            "http(s) URL") from None
        if scheme != "https" and not is_loopback(host):
            raise BadAnswer(f"{redact_url(url)} redirects to plain http "
                            f"({redact_url(target)}): refused, the bytes would travel in "
                            "clear text")
        return _Redirect(target)
    return read(response, url)

