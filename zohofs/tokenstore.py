"""Access tokens kept on disk, shared by every zohofs process of the user.

Zoho issues at most 10 access tokens per refresh token per 10 minutes, counted across every
process that asks. Each `zohofs ls`, mount or restart asking for its own token adds up
quickly, so the current token, its expiry, the times of recent requests and a lock-out
reported by Zoho live in one small file per client id and accounts host, read and written
under a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from zohofs.errors import SignInUnavailable
from zohofs.privatedir import UnsafeDirectory, private_directory

log = logging.getLogger(__name__)

# Another process may hold the lock while it asks Zoho (one request, its deadline).
LOCK_DEADLINE = 60.0


class Credentials(Protocol):
    """What names a store: auth.Credentials has these."""

    @property
    def client_id(self) -> str: ...
    @property
    def client_secret(self) -> str: ...
    @property
    def refresh_token(self) -> str: ...


class StoreUnusable(Exception):
    """The directory cannot hold the store (read-only, not ours): tokens stay per process."""


@dataclass
class SharedTokens:
    """What every process knows; times are wall-clock seconds (processes share no other)."""

    token: str | None = None
    issued_at: float = 0.0
    expires_at: float = 0.0
    api_domain: str | None = None
    requests: list[float] = field(default_factory=list)  # token requests Zoho answered
    paused_until: float = 0.0  # Zoho locked the client out until then
    pause_reason: str = ""


def state_directory(env: Mapping[str, str]) -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the XDG state directory; for root without
    one, /var/lib/zohofs, the service's own, so that root's `zohofs ls` and the service
    share their tokens."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "zohofs"
    if os.geteuid() == 0:
        return Path("/var/lib/zohofs")
    return Path.home() / ".local" / "state" / "zohofs"


class TokenStore:
    """The shared state of one set of credentials at one accounts host, in ``directory``.

    The file is named by a digest of the accounts host, client id, client secret and
    refresh token (none of them is stored): a token obtained with other credentials is
    never used, so a wrong secret or refresh token fails at once whatever the store holds.
    Zoho counts its limit per refresh token, and so does the store."""

    def __init__(self, directory: Path, accounts_url: str, credentials: Credentials) -> None:
        identity = "\0".join((accounts_url, credentials.client_id, credentials.client_secret,
                               credentials.refresh_token))
        key = hashlib.sha256(identity.encode()).hexdigest()[:32]
        self.path = directory / f"tokens-{key}.json"
        self._lock_path = directory / f"tokens-{key}.lock"
        self._directory = directory

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[SharedTokens]:
        """The shared state, for this process alone until the block ends; written back
        (atomically, mode 0600) when the block changed it."""
        try:
            # Tokens are secrets, and the file is rewritten (by root often): never in a
            # directory another user could change or put a link in.
            directory = private_directory(self._directory, "the token store's directory")
            self.path, self._lock_path = (directory / self.path.name,
                                          directory / self._lock_path.name)
            fd = os.open(self._lock_path,
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except UnsafeDirectory as exc:
            raise self._unusable(str(exc)) from None
        except OSError as exc:
            raise self._unusable(f"cannot keep access tokens in {self._directory}: "
                                 f"{exc.strerror or exc}") from None
        try:
            await self._lock(fd)
            shared = self._read()
            before = asdict(shared)
            try:
                yield shared
            finally:  # a refusal from Zoho is news for the others too
                if asdict(shared) != before:
                    self._write(shared)
        finally:
            os.close(fd)  # releases the lock too

    @staticmethod
    def _unusable(why: str) -> StoreUnusable:
        # Said here, not by the caller: `zohofs ls` shows this, and not sign-in's lines.
        log.warning("%s; this process keeps its tokens to itself", why)
        return StoreUnusable(why)

    async def _lock(self, fd: int) -> None:
        # Polled: a blocking flock in a thread could not be abandoned on a deadline.
        with trio.move_on_after(LOCK_DEADLINE) as scope:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    await trio.sleep(0.05)
        if scope.cancelled_caught:
            raise SignInUnavailable(f"another zohofs process has held {self._lock_path} for "
                                    f"{LOCK_DEADLINE:g} s")

    def _read(self) -> SharedTokens:
        try:
            raw = json.loads(self.path.read_text())
            shared = SharedTokens(**{k: raw[k] for k in asdict(SharedTokens()) if k in raw})
            if not isinstance(shared.requests, list):
                raise TypeError("requests is not a list")
            shared.requests = [float(t) for t in shared.requests]
            return shared
        except FileNotFoundError:
            return SharedTokens()
        except (OSError, ValueError, TypeError) as exc:
            # A damaged file costs one token request, never a failure.
            log.warning("ignoring the unreadable token store %s: %s", self.path, exc)
            return SharedTokens()

    def _write(self, shared: SharedTokens) -> None:
        shared.requests = [t for t in shared.requests if t > time.time() - 3600]
        temporary = None
        try:
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.stem}.",
                                             suffix=".tmp")
            with os.fdopen(fd, "w") as f:  # mkstemp: a new file (O_EXCL), mode 0600
                json.dump(asdict(shared), f)
            os.replace(temporary, self.path)
        except OSError as exc:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            log.warning("cannot write the token store %s: %s", self.path, exc.strerror or exc)
