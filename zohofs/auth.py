"""Where the access token for a request comes from."""

from __future__ import annotations

from typing import Protocol

from zohofs.errors import ConfigError


class TokenSource(Protocol):
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

    async def token(self) -> str:
        return self._token

    async def rejected(self, token: str) -> bool:
        return False

    def __repr__(self) -> str:  # never show the secret, even in a crash dump
        return "StaticToken(<redacted>)"


def authorization_header(token: str) -> str:
    # Zoho wants its own scheme here, whatever ``token_type`` the token answer names.
    return f"Zoho-oauthtoken {token}"
