"""`zohofs login`: the one-time Zoho set-up, from a Self Client's grant code to a stored
refresh token."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import trio

from zohofs import config
from zohofs.auth import SCOPES, post_token_request
from zohofs.config import Config
from zohofs.errors import (
    ConfigError,
    SignInError,
    SignInThrottled,
    SignInUnavailable,
    ZohofsError,
)
from zohofs.hosts import DATA_CENTRES


def console_url(accounts_url: str) -> str:
    """Zoho's API console of the same data centre (accounts.zoho.eu -> api-console.zoho.eu)."""
    url = httpx.URL(accounts_url)
    port = f":{url.port}" if url.port else ""
    return f"https://{url.host.replace('accounts.', 'api-console.', 1)}{port}"


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


def config_directory(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "zohofs"


def default_token_path(env: dict[str, str] | None = None) -> Path:
    return config_directory(env) / "refresh-token"


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


def config_text(client_id: str, secret_path: Path | None, token_path: Path, dc: str, *,
                accounts_url: str | None = None, api_url: str | None = None,
                ca_file: str | None = None, trust_hosts: Sequence[str] = ()) -> str:
    """A config file that works as it is: the data centre, the servers and CA it was
    given, the client, where the secrets are."""
    lines = [f'dc = "{dc}"'] if dc != "us" else []
    for key, value in (("accounts_url", accounts_url), ("api_url", api_url),
                       ("ca_file", ca_file)):
        if value:
            lines.append(f"{key} = {_toml(value)}")
    if trust_hosts:
        lines.append(f"trust_hosts = [{', '.join(_toml(h) for h in trust_hosts)}]")
    lines.append(f"client_id = {_toml(client_id)}")
    if secret_path is not None:
        lines.append(f"client_secret_file = {_toml(str(secret_path))}")
    else:
        lines.append('client_secret_file = "/path/to/client-secret"  # the file you gave')
    lines.append(f"refresh_token_file = {_toml(str(token_path))}")
    return "\n".join(lines) + "\n"


def _toml(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def summary(token_path: Path, secret_path: Path | None, config: str,
            config_path: Path, written: bool) -> str:
    saved = f"Saved the refresh token to {token_path}"
    if secret_path is not None:
        saved += f" and the client secret to {secret_path}"
    where = (f"Wrote this config to {config_path} (mode 600):" if written else
             f"Put this in {config_path} (chmod 600):")
    check = (f"zohofs ls --config {config_path}" if written else
             "zohofs ls   (login --write-config FILE writes the config for you)")
    return f"""\
{saved} (mode 600).

{where}

{config}
Then try:  {check}
"""


def ask(prompt: str, read: Callable[[str], str]) -> str:
    try:
        value = read(prompt).strip()
    except EOFError:
        raise ConfigError(f"no {prompt.strip(': ').lower()} entered: standard input is "
                          "closed (give --client-id-file, --client-secret-file and "
                          "--code-file to run without a terminal)") from None
    if not value:
        raise ConfigError(f"nothing entered for: {prompt.strip(': ')}")
    return value


def run(args: argparse.Namespace) -> int:
    """`zohofs login`: ask for what is missing, exchange the code, store and print."""
    _, top, _ = config.read_config_file(args.config, os.environ, args.strict)
    dc = args.dc or os.environ.get("ZOHOFS_DC") or top.get("dc", "us")
    accounts_url = (args.accounts_url or os.environ.get("ZOHOFS_ACCOUNTS_URL")
                    or top.get("accounts_url") or f"https://{DATA_CENTRES[dc].accounts}")
    print(instructions(accounts_url))
    secret_flags = {"client_id": args.client_id_file, "client_secret": args.client_secret_file}
    known = config.find_secrets(config.single_account_sources(secret_flags, os.environ, top),
                                args.strict)
    client_id = known.get("client_id") or ask("Client ID: ", input)
    client_secret = known.get("client_secret") or ask("Client Secret: ", getpass.getpass)
    if args.code_file:
        code = config.read_secret_file(args.code_file, "grant code")
    else:
        code = ask("Grant code: ", input)
    cfg = Config(ca_file=args.ca_file or top.get("ca_file"))

    async def exchange() -> str:
        async with httpx.AsyncClient(verify=cfg.ssl_context(), timeout=cfg.timeout) as client:
            return await exchange_code(client, accounts_url, client_id, client_secret,
                                             code)

    try:
        refresh_token = trio.run(exchange)
    except ZohofsError as exc:
        print(f"zohofs: {exc}", file=sys.stderr)
        # Refused (a wrong code, client or secret): fix it first, as the exit table says.
        refused = isinstance(exc, SignInError) and not isinstance(
            exc, SignInThrottled | SignInUnavailable)
        return 2 if refused else 1
    path = args.output or default_token_path()
    store_secret(path, refresh_token)
    # A secret typed at the prompt is kept too: the mount needs it with every refresh.
    # The config names the file the secret came from, or the one a typed secret is
    # kept in; from the environment there is no file to name.
    secret_path: Path | None = Path(args.client_secret_file) if args.client_secret_file \
        else Path(top["client_secret_file"]) if "client_secret_file" in top else None
    if not known.get("client_secret"):
        secret_path = path.with_name("client-secret")
        store_secret(secret_path, client_secret)
    default_url = f"https://{DATA_CENTRES[dc].accounts}"
    text = config_text(
        client_id, secret_path, path, dc,
        accounts_url=accounts_url if accounts_url != default_url else None,
        api_url=args.api_url or top.get("api_url"), ca_file=cfg.ca_file,
        trust_hosts=args.trust_host or top.get("trust_hosts", ()))
    if args.write_config:
        store_secret(args.write_config, text.rstrip("\n"))
    print(summary(path, secret_path, text,
                        args.write_config or (Path(args.config) if args.config else
                                              config_directory() / "config.toml"),
                        written=bool(args.write_config)))
    return 0
