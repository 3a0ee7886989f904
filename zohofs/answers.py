"""What an answer of a download host must be to be trusted: the parsing and checks that
stand between its bytes and a reader (exact ranges and lengths, no encoding, no page in
place of the file, the validator seen at open), and what a probe learns.

Only errors from :mod:`zohofs.errors` leave this module.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import re
import time
from dataclasses import dataclass

from zohofs.buffers import BufferPool
from zohofs.errors import (
    BadAnswer,
    RemoteChanged,
    error_for_status,
)
from zohofs.logs import redact_url
from zohofs.transport import read_exactly, read_pieces, read_small

log = logging.getLogger(__name__)

# re.ASCII: \d would also match other scripts' digits, which int() then reads or rejects.
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII)
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)", re.ASCII)
_DIGITS = re.compile(r"\d+", re.ASCII)
# Answers that are a page about the file, never the file: a zip is none of these.
_PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml", "application/json"})


@dataclass(frozen=True)
class RemoteInfo:
    """What a probe learnt about a file; the validators are pinned for its lifetime."""

    size: int
    etag: str | None = None
    last_modified: float | None = None
    ranges: bool = True


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) of ``bytes first-last/total``; None if malformed."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not m:
        return None
    first, last = int(m[1]), int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(value)
    when = parse_http_date(value)
    return None if when is None else max(0.0, when - time.time())


def parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        return when.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def parse_length(value: str | None) -> int | None:
    """A ``Content-Length`` of ASCII digits only, else None."""
    value = (value or "").strip()
    return int(value) if _DIGITS.fullmatch(value) else None


def is_identity(response: http.client.HTTPResponse) -> bool:
    return response.headers.get("Content-Encoding", "identity").strip().lower() == "identity"


def check_body(response: http.client.HTTPResponse, where: str) -> None:
    """BadAnswer unless the body can be the file's own bytes: not encoded (gzip would be
    other bytes at other offsets), not an HTML or JSON page (a proxy's error or login
    page)."""
    media = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media in _PAGE_TYPES:
        read_small(response)
        raise BadAnswer(f"{where}: the server answered HTTP {response.status} with a "
                        f"{media} page instead of the file")
    if not is_identity(response):
        raise BadAnswer(f"{where}: encoded answer "
                        f"({response.headers.get('Content-Encoding')}) refused")


def raise_for_status(response: http.client.HTTPResponse, url: str) -> None:
    read_small(response)
    raise error_for_status(response.status, response.reason, redact_url(url),
                           parse_retry_after(response.headers.get("Retry-After")))


def _validators(response: http.client.HTTPResponse) -> tuple[str | None, float | None]:
    return (response.headers.get("ETag"),
            parse_http_date(response.headers.get("Last-Modified")))


def check_unchanged(response: http.client.HTTPResponse, info: RemoteInfo, where: str) -> None:
    """RemoteChanged if the answer's validator differs from the one pinned at probe time.

    An answer without one proves nothing either way; its size is checked separately."""
    etag, mtime = _validators(response)
    if (info.etag and etag and etag != info.etag) or (
            info.etag is None and info.last_modified and mtime and mtime != info.last_modified):
        raise RemoteChanged(f"{where}: the file changed on the server (validator "
                            f"{info.etag or info.last_modified} -> {etag or mtime})")


def read_probe(response: http.client.HTTPResponse, url: str) -> RemoteInfo:
    etag, mtime = _validators(response)
    where = f"probe of {redact_url(url)}"
    if response.status in (200, 206):
        check_body(response, where)
    if response.status == 206:
        parsed = parse_content_range(response.headers.get("Content-Range"))
        if parsed is None or parsed[:2] != (0, 0) or parsed[2] is None:
            raise BadAnswer(f"{where}: unusable Content-Range "
                            f"{response.headers.get('Content-Range')!r}")
        read_exactly(response, 1)
        return RemoteInfo(parsed[2], etag, mtime, ranges=True)
    if response.status == 416:
        # Only an empty file cannot satisfy bytes=0-0.
        m = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        read_small(response)
        if m and int(m[1]) == 0:
            return RemoteInfo(0, etag, mtime, ranges=True)
        raise BadAnswer(f"{where}: 416 without an empty-file Content-Range")
    if response.status == 200:
        # The server ignored Range and started sending the whole file: take the size from
        # Content-Length and hang up (the transport closes a half-read connection).
        length = parse_length(response.headers.get("Content-Length"))
        if length is None:
            raise BadAnswer(f"{where}: 200 without a usable Content-Length")
        log.warning("%s ignores Range requests: only whole-file reads will work",
                    redact_url(url))
        return RemoteInfo(length, etag, mtime, ranges=False)
    raise_for_status(response, url)
    raise AssertionError("unreachable")  # raise_for_status always raises


def read_range(response: http.client.HTTPResponse, url: str, start: int, length: int,
                info: RemoteInfo, piece: int,
                buffers: BufferPool | None) -> list[memoryview]:
    where = f"{redact_url(url)} bytes {start}-{start + length - 1}"
    status = response.status
    if status == 412:
        read_small(response)
        raise RemoteChanged(f"{where}: the file changed on the server (HTTP 412)",
                            status=status)
    if status not in (200, 206, 416):
        raise_for_status(response, url)
    check_unchanged(response, info, where)
    if status == 416:
        # The validator still matches (else 412), yet the server will not serve a range
        # inside the size it announced: it is inconsistent, not changed.
        read_small(response)
        raise BadAnswer(f"{where}: HTTP 416 for a range inside the {info.size} bytes the "
                        "probe announced")
    check_body(response, where)
    if status == 200:
        # A whole-file answer is only the range we asked for when the range is the file.
        if start == 0 and length == info.size and response.length == length:
            return read_pieces(response, length, piece, buffers)
        raise BadAnswer(f"{where}: the server ignored Range (HTTP 200); refusing to guess")
    parsed = parse_content_range(response.headers.get("Content-Range"))
    if parsed != (start, start + length - 1, info.size):
        total = parsed[2] if parsed else None
        if total is not None and total != info.size:
            if info.etag is None and info.last_modified is None:
                # Without validators a new size is the only sign of a new version.
                raise RemoteChanged(f"{where}: the file size changed from {info.size} to "
                                    f"{total}")
            raise BadAnswer(f"{where}: the server now gives the size as {total}, not the "
                            f"{info.size} bytes it announced, under the same validator")
        raise BadAnswer(f"{where}: Content-Range {response.headers.get('Content-Range')!r} "
                        "does not match the request")
    if response.length is not None and response.length != length:
        raise BadAnswer(f"{where}: Content-Length {response.length} does not match the request")
    data = read_pieces(response, length, piece, buffers)
    if response.length is None and response.read(1):
        raise BadAnswer(f"{where}: the body is longer than its Content-Range")
    return data
