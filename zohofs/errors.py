"""The one table that says what every zohofs error means.

Exception tree (each class carries its errno and the log level it deserves)::

    ZohofsError                      EIO
    ├── ConfigError                  (never reaches FUSE: bad flags, files, hosts)
    ├── ReadOnly                     EROFS   any write, create, truncate
    ├── NoSuchEntry                  ENOENT  a name that is not in the tree
    ├── IsADirectory                 EISDIR  open() of a folder
    ├── NotADirectory                ENOTDIR a path through a file, readdir of a file
    ├── NotALink                     EINVAL  readlink of anything but a symbolic link
    ├── NoAttribute                  ENODATA a missing xattr
    ├── SignInError                  EACCES  Zoho Accounts refused the refresh token or client
    │   ├── SignInThrottled          EBUSY   too many token refreshes: waiting it out
    │   └── SignInUnavailable        EIO     Zoho Accounts unreachable or failing (5xx)
    ├── DiscoveryError               EIO     the backup URLs API failed or answered nonsense
    ├── BadArchive                   EIO     (--expand) a zip whose directory cannot be read,
    │   │                                    a member that fails its CRC or cannot be inflated
    │   └── UnreadableMember         EIO     encrypted, or a method other than stored/deflate
    └── RemoteError                  EIO     anything the download host did wrong
        ├── AccessDenied             EACCES  401 / 403
        │   └── LinkExpired          EACCES  the link is past its expiry date
        ├── RemoteNotFound           ENOENT  404
        ├── ServerError              EIO     5xx
        ├── Throttled                EBUSY   429 (after retries)
        ├── TransportError           EIO     connection refused, reset, timeout, truncated body
        ├── ReadTimeout              EIO     a read (retries included) outlived the read deadline
        ├── BadAnswer                EIO     an answer zohofs must not trust (wrong range, length)
        └── RemoteChanged            ESTALE  the file's validator changed under an open file

Nothing outside this module decides which errno an error becomes. Throttling is EBUSY, not
EAGAIN: on a blocking read, EAGAIN makes some readers (Python's among them) stop silently
as if at end of file, which would turn a refusal into a truncated copy.
"""

from __future__ import annotations

import copy
import errno as _errno
import logging
import socket
import ssl
from typing import TypeVar


class ZohofsError(Exception):
    errno: int = _errno.EIO
    log_level: int = logging.ERROR


class ConfigError(ZohofsError):
    """Bad configuration: reported to the user before anything is mounted."""


class CacheInUse(ConfigError):
    """Another mount holds the disk cache's directory."""


class ReadOnly(ZohofsError):
    errno = _errno.EROFS
    log_level = logging.DEBUG


class NoSuchEntry(ZohofsError):
    errno = _errno.ENOENT
    log_level = logging.DEBUG


class IsADirectory(ZohofsError):
    errno = _errno.EISDIR
    log_level = logging.DEBUG


class NotADirectory(ZohofsError):
    errno = _errno.ENOTDIR
    log_level = logging.DEBUG


class NotALink(ZohofsError):
    errno = _errno.EINVAL
    log_level = logging.DEBUG


class NoAttribute(ZohofsError):
    errno = _errno.ENODATA
    log_level = logging.DEBUG


class SignInError(ZohofsError):
    """Zoho Accounts would not give us an access token; the message says what to do."""

    errno = _errno.EACCES
    log_level = logging.ERROR


class SignInThrottled(SignInError):
    errno = _errno.EBUSY
    log_level = logging.WARNING


class SignInUnavailable(SignInError):
    """Zoho Accounts could not be asked (network, 5xx): worth asking again later."""

    errno = _errno.EIO
    log_level = logging.WARNING


class DiscoveryError(ZohofsError):
    """The backup URLs API failed, or answered something we refuse to trust."""


class BadArchive(ZohofsError):
    """Inside a zip (``--expand``): what the archive says cannot be true, a member's bytes
    fail their CRC-32, or its compression method is not one zohofs can inflate."""


class UnreadableMember(BadArchive):
    """A member zohofs cannot decode: said once when it is first opened, then quietly."""

    log_level = logging.DEBUG


class RemoteError(ZohofsError):
    """The download host failed us; ``transient`` errors are worth another try."""

    transient: bool = False

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class AccessDenied(RemoteError):
    errno = _errno.EACCES
    log_level = logging.WARNING


class LinkExpired(AccessDenied):
    pass


class RemoteNotFound(RemoteError):
    errno = _errno.ENOENT
    log_level = logging.WARNING


class ServerError(RemoteError):
    transient = True


class Throttled(RemoteError):
    errno = _errno.EBUSY
    log_level = logging.WARNING
    transient = True


class TransportError(RemoteError):
    transient = True


class ReadTimeout(RemoteError):
    """A read, or the probe behind a stat or open, outlived the read deadline."""


class BadAnswer(RemoteError):
    """The server answered something that would make us serve wrong bytes."""


class RemoteChanged(RemoteError):
    errno = _errno.ESTALE
    log_level = logging.WARNING


# Statuses that are not worth repeating even though they are 5xx (RFC 9110: the
# server will not ever do what was asked).
_PERMANENT_5XX = frozenset({501, 505})


def error_for_status(status: int, reason: str, url: str,
                     retry_after: float | None = None) -> RemoteError:
    """The domain error for an HTTP answer that is not a success.

    Zoho's download host puts its error code in the reason phrase
    (``401 INVALID_OAUTHSCOPE``), so the reason is part of the message.
    """
    message = f"HTTP {status} {reason} from {url}".rstrip()
    if status in (401, 403):
        return AccessDenied(message, status=status)
    if status in (404, 410):
        return RemoteNotFound(message, status=status)
    if status == 429:
        return Throttled(message, status=status, retry_after=retry_after)
    if status == 408:
        return TransportError(message, status=status, retry_after=retry_after)
    if status >= 500:
        err = ServerError(message, status=status, retry_after=retry_after)
        err.transient = status not in _PERMANENT_5XX
        return err
    return BadAnswer(message, status=status)


def is_transient(exc: BaseException) -> bool:
    """The one retry predicate: worth trying the same request again."""
    return isinstance(exc, RemoteError) and exc.transient


E = TypeVar("E", bound=BaseException)


def again(error: E) -> E:
    """A new exception like ``error``, for telling a later caller what an earlier one
    met: one object raised again and again grows its traceback with every raise and keeps
    the frames of each alive."""
    fresh = copy.copy(error)
    fresh.__traceback__ = None
    return fresh


def reason(exc: BaseException) -> str:
    """Why a connection failed, in words: the first exception of its chain that says
    something (httpx's ConnectError around a refused certificate says nothing itself)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"certificate verify failed: {seen.verify_message} (for a server with "
                    "a certificate of its own CA, set ca_file)")
        if isinstance(seen, socket.timeout | TimeoutError):
            return "timed out"
        if str(seen):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__
