"""`zohofs login`: the one-time Zoho set-up, from a Self Client's grant code to a stored
refresh token."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx

from zohofs.auth import SCOPES, post_token_request
from zohofs.errors import ConfigError, SignInError


def console_url(accounts_url: str) -> str:
    """Zoho's API console of the same data centre (accounts.zoho.eu -> api-console.zoho.eu)."""
    host = httpx.URL(accounts_url).host
    return f"https://{host.replace('accounts.', 'api-console.', 1)}"


def instructions(accounts_url: str) -> str:
    return f"""\
One-time set-up of zohofs for your Zoho CRM org (you must be a CRM administrator):

 1. Open {console_url(accounts_url)} and choose ADD CLIENT -> Self Client
    (or open the Self Client you already have). Note its Client ID and Client Secret.
 2. In the Self Client, Generate Code with exactly these scopes:
        {SCOPES}
    any time duration, any description. Copy the code it shows: it is valid for
    only a few minutes, and only once.
 3. Give that code to zohofs below; it exchanges it for a long-lived refresh token.
"""


def default_token_path(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "zohofs" / "refresh-token"


async def exchange_code(client: httpx.AsyncClient, accounts_url: str, client_id: str,
                        client_secret: str, code: str) -> str:
    """The refresh token for a grant code (``grant_type=authorization_code``)."""
    try:
        body = await post_token_request(client, accounts_url, {
            "grant_type": "authorization_code", "client_id": client_id,
            "client_secret": client_secret, "code": code.strip()})
    except SignInError as exc:
        if "invalid_code" in str(exc):
            raise SignInError("Zoho refused the grant code: it is wrong, already used or "
                              "expired (codes live a few minutes); generate a new one") from None
        raise
    token = body.get("refresh_token")
    if not isinstance(token, str) or not token:
        raise SignInError("Zoho's answer has no refresh token: was the code generated with "
                          f"the scopes {SCOPES}?")
    return token


def store_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` with mode 0600, atomically, never readable by others
    even for an instant."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write {tmp}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def summary(path: Path, client_id_hint: str) -> str:
    return f"""\
Saved the refresh token to {path} (mode 600).

The mount finds it when you give it, with the client id and secret, in any of these ways:
  * flags:       zohofs mount /zoho --refresh-token-file {path} \\
                     --client-id-file FILE --client-secret-file FILE
  * environment: ZOHO_CLIENT_ID, ZOHO_CLIENT_SECRET, ZOHO_REFRESH_TOKEN
  * config file  (~/.config/zohofs/config.toml, chmod 600):
        client_id = "{client_id_hint}"
        client_secret_file = "/path/to/client-secret"
        refresh_token_file = "{path}"
Then try:  zohofs ls
"""


def ask(prompt: str, read: Callable[[str], str]) -> str:
    value = read(prompt).strip()
    if not value:
        raise ConfigError(f"nothing entered for: {prompt.strip(': ')}")
    return value
