"""Access tokens: handed over by the user, or obtained with a refresh token from Zoho Accounts.

Zoho issues at most 10 access tokens per refresh token per 10 minutes and locks a client
out for 15-30 minutes beyond that, so a token is kept for its whole lifetime, renewed
shortly before it expires or once after an expired-token 401, and never in a loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio

from zohofs.errors import (
    ConfigError,
    SignInError,
    SignInThrottled,
    SignInUnavailable,
    TransportError,
    again,
    reason,
)
from zohofs.tokenstore import SharedTokens, StoreUnusable, TokenStore

log = logging.getLogger(__name__)

SCOPES = "ZohoCRM.bulk.backup.READ,ZohoFiles.files.ALL"
MAX_ANSWER = 64 * 1024


class TokenSource(Protocol):
    refreshes: int  # new tokens this process obtained

    async def token(self) -> str:
        """A currently valid access token (may wait for a refresh)."""
        ...

    async def rejected(self, token: str) -> bool:
        """The server refused ``token``: True when a fresh one is worth a retry."""
        ...


class StaticToken:
    """An access token the user handed us (``--access-token-file``, ``ZOHO_ACCESS_TOKEN``).

    It cannot be renewed, so a rejection is final.
    """

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            raise ConfigError("the access token is empty or contains whitespace")
        self._token = token
        self.refreshes = 0

    async def token(self) -> str:
        return self._token

    async def rejected(self, token: str) -> bool:
        return False

    def __repr__(self) -> str:  # never show the secret, even in a crash dump
        return "StaticToken(<redacted>)"


def authorization_header(token: str) -> str:
    # Zoho wants its own scheme here, whatever ``token_type`` the token answer names.
    return f"Zoho-oauthtoken {token}"


@dataclass(frozen=True)
class Credentials:
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)


@dataclass(frozen=True)
class RefreshLimits:
    """How hard zohofs may lean on Zoho Accounts (defaults stay well under Zoho's 10/10 min)."""

    max_refreshes: int = 5
    window: float = 600.0
    throttle_pause: float = 1200.0  # Zoho's lock-out lasts 15-30 minutes
    failure_pause: float = 60.0  # a refused refresh token is not asked about again sooner
    margin: float = 300.0  # renew this long before expiry (less for short-lived tokens)
    outage_pause: float = 10.0  # Accounts unreachable: first pause, doubling per failure
    max_outage_pause: float = 300.0


_ERROR_ADVICE = {
    "invalid_code": "the refresh token is invalid, expired or revoked: make a new one with "
                    "`zohofs login`",
    "invalid_client": "Zoho does not know this client id: wrong client id, or wrong data "
                      "centre (check --dc / dc in the config)",
    "invalid_client_secret": "wrong client secret for this client id",
    "invalid_redirect_uri": "the client is not a Self Client: create one in the API console",
}


def describe_token_error(body: dict[str, Any], accounts_host: str) -> SignInError:
    """A SignInError saying what a token answer's ``error`` means and what to do."""
    error = str(body.get("error", "unknown error"))
    description = str(body.get("error_description", ""))
    if error == "Access Denied" or "too many requests" in description.lower() or (
            body.get("status") == "failure" and error not in _ERROR_ADVICE):
        return SignInThrottled(f"Zoho Accounts ({accounts_host}) refused a new access token: "
                               f"too many requests ({description or error})")
    advice = _ERROR_ADVICE.get(error, description or "see Zoho's OAuth documentation")
    return SignInError(f"Zoho Accounts ({accounts_host}) said {error!r}: {advice}")


async def post_token_request(client: httpx.AsyncClient, accounts_url: str,
                             form: dict[str, str]) -> dict[str, Any]:
    """POST to ``/oauth/v2/token`` and return the JSON answer, checked for errors.

    Zoho answers most failures with HTTP 200 and an ``error`` key, so the body decides.
    """
    host = httpx.URL(accounts_url).host
    try:
        response = await client.post(f"{accounts_url.rstrip('/')}/oauth/v2/token", data=form)
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot reach Zoho Accounts ({host}): {reason(exc)}") from None
    if response.status_code >= 500:
        raise TransportError(f"Zoho Accounts ({host}) answered HTTP {response.status_code}",
                             status=response.status_code)
    try:
        if len(response.content) > MAX_ANSWER:
            raise ValueError("oversized")
        body = response.json()
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        raise SignInError(f"Zoho Accounts ({host}) answered HTTP {response.status_code} "
                          "with something that is not a token answer") from None
    if "error" in body or ("access_token" not in body and "refresh_token" not in body):
        raise describe_token_error(body, host)
    return body


def token_lifetime(body: dict[str, Any]) -> float:
    """Seconds an access token lives. Older servers send ``expires_in_sec`` and then
    ``expires_in`` in milliseconds."""
    for key in ("expires_in_sec", "expires_in"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value) / 1000 if key == "expires_in" and value > 86400 else float(value)
    return 3600.0


class OAuthTokens:
    """Access tokens from a refresh token, one refresh in flight, throttle-aware."""

    def __init__(self, client: httpx.AsyncClient, accounts_url: str, credentials: Credentials,
                 limits: RefreshLimits = RefreshLimits(), name: str = "",
                 store: TokenStore | None = None) -> None:
        self._client = client
        self._accounts_url = accounts_url
        self._host = httpx.URL(accounts_url).host
        self._credentials = credentials
        self._limits = limits
        self._name = name or self._host
        self._lock = trio.Lock()
        self._token: str | None = None
        self._renew_at = -math.inf
        self._expires_at = -math.inf
        self._after_rejection = False
        self._recent: deque[float] = deque()
        self._paused_until = -math.inf
        self._pause_error: SignInError | None = None
        self._outages = 0  # failures in a row to reach Zoho Accounts
        self.api_domain: str | None = None
        self.refreshes = 0
        self._store = store

    def __repr__(self) -> str:
        return f"OAuthTokens({self._name!r}, <redacted>)"

    async def token(self) -> str:
        now = trio.current_time()
        if self._token is not None and now < self._renew_at:
            return self._token
        async with self._lock:  # everyone else waits for the one refresh in flight
            now = trio.current_time()
            if self._token is None or now >= self._renew_at:
                await self._refresh(now)
            assert self._token is not None
            return self._token

    async def rejected(self, token: str) -> bool:
        async with self._lock:
            if token != self._token:
                return True  # already replaced while the request was out
            if self._after_rejection:
                # A token fresh from a refresh was refused too: the cause is not expiry
                # (scope, permissions), and refreshing again would only burn the budget.
                return False
            self._renew_at = -math.inf
            await self._refresh(trio.current_time(), after_rejection=True)
            return True

    async def _refresh(self, now: float, after_rejection: bool = False) -> None:
        if self._store is not None:
            try:
                async with self._store.locked() as shared:
                    await self._refresh_shared(shared, now, after_rejection)
                return
            except StoreUnusable:  # said in the log by the store
                self._store = None
        await self._ask(now, after_rejection, None)

    async def _refresh_shared(self, shared: SharedTokens, now: float,
                              after_rejection: bool) -> None:
        """Refresh with what other zohofs processes did: use their token while it is
        good, count their requests, respect a lock-out one of them met."""
        wall = time.time()
        rejected = self._token if after_rejection else None
        if shared.token and shared.token != rejected:
            lifetime = shared.expires_at - shared.issued_at
            left = shared.expires_at - wall
            if left > min(self._limits.margin, lifetime / 10):
                self._use(shared.token, now, left, lifetime, shared.api_domain)
                self._after_rejection = False
                log.debug("%s: using the access token another zohofs process obtained",
                          self._name)
                return
        self._recent = deque(sorted(now - (wall - t) for t in shared.requests
                                    if wall - t < self._limits.window))
        if shared.paused_until > wall:
            usable = self._token is not None and now < self._expires_at and not after_rejection
            self._pause(now, shared.paused_until - wall,
                        SignInThrottled(shared.pause_reason), usable)
            return
        if isinstance(self._pause_error, SignInThrottled):
            # The store is the authority on a lock-out: once it has passed there (or an
            # administrator removed the store after fixing the cause), this process asks
            # again too, within the budget the shared requests above leave.
            self._paused_until = -math.inf
        await self._ask(now, after_rejection, shared)

    async def _ask(self, now: float, after_rejection: bool,
                   shared: SharedTokens | None) -> None:
        """Ask Zoho Accounts for a new access token, within the limits."""
        # While Zoho will not be asked, a token that has not yet expired is still used.
        usable = self._token is not None and now < self._expires_at and not after_rejection
        if now < self._paused_until:
            if usable:
                return
            assert self._pause_error is not None
            raise again(self._pause_error)
        while self._recent and self._recent[0] < now - self._limits.window:
            self._recent.popleft()
        if len(self._recent) >= self._limits.max_refreshes:
            self._pause(now, self._recent[0] + self._limits.window - now, SignInThrottled(
                f"{self._name}: {len(self._recent)} access tokens in "
                f"{self._limits.window / 60:.0f} minutes; not asking Zoho for more until the "
                "window passes (Zoho locks out clients that ask too often)"), usable)
            return
        self._recent.append(now)
        wall = time.time()
        form = {"grant_type": "refresh_token", "client_id": self._credentials.client_id,
                "client_secret": self._credentials.client_secret,
                "refresh_token": self._credentials.refresh_token}
        try:
            body = await post_token_request(self._client, self._accounts_url, form)
            token = body.get("access_token")
            if not isinstance(token, str) or not token or any(c.isspace() for c in token):
                raise SignInError(f"{self._name}: Zoho Accounts answered without a usable "
                                  "access token")
        except TransportError as exc:
            # Zoho Accounts is down or unreachable: no token was issued, so this attempt
            # does not count against the budget, and the next waits longer (while the
            # current token, if still valid, goes on being used).
            self._recent.pop()
            pause = min(self._limits.max_outage_pause,
                        self._limits.outage_pause * 2 ** self._outages)
            self._outages += 1
            self._pause(now, pause, SignInUnavailable(f"{self._name}: {exc}"), usable)
            return
        except SignInThrottled as exc:
            until = wall + self._limits.throttle_pause
            locked_out = SignInThrottled(
                f"{exc}; zohofs will not ask again before "
                f"{time.strftime('%H:%M', time.localtime(until))} (Zoho locks a client out "
                "for 15-30 minutes after 10 access tokens in 10 minutes; the zohofs "
                "processes of this user share one token, so look for other machines or "
                "programs using this refresh token)")
            if shared is not None:
                shared.requests.append(wall)
                shared.paused_until, shared.pause_reason = until, str(locked_out)
            self._pause(now, self._limits.throttle_pause, locked_out, usable)
            return
        except SignInError as exc:
            if shared is not None:
                shared.requests.append(wall)
            self._pause(now, self._limits.failure_pause, exc, usable)
            return
        lifetime = token_lifetime(body)
        self._outages = 0
        api_domain = body.get("api_domain")
        self._use(token, now, lifetime, lifetime,
                  api_domain if isinstance(api_domain, str) else None)
        self._after_rejection = after_rejection
        self.refreshes += 1
        if shared is not None:
            shared.requests.append(wall)
            shared.token, shared.issued_at, shared.expires_at = token, wall, wall + lifetime
            shared.api_domain = self.api_domain
        log.info("%s: new access token, valid for %d s", self._name, lifetime)

    def _use(self, token: str, now: float, left: float, lifetime: float,
             api_domain: str | None) -> None:
        self._token = token
        self._expires_at = now + left
        self._renew_at = self._expires_at - min(self._limits.margin, lifetime / 10)
        if api_domain:
            self.api_domain = api_domain

    def _pause(self, now: float, seconds: float, error: SignInError, usable: bool) -> None:
        """Stop asking Zoho for ``seconds``; callers get ``error`` meanwhile (raised now
        unless the current token is still ``usable``)."""
        self._paused_until = now + seconds
        self._pause_error = error
        log.log(error.log_level, "%s (not asking again for %d s)", error, seconds)
        if not usable:
            raise error
