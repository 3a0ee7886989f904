"""Mount settings: one frozen dataclass built from defaults, a TOML file, the environment
and flags, in that order of precedence (flags win).

Secrets (client id, client secret, refresh token, access token) never come from argv. For
the single-account case they come from, in order: files named by flags, systemd
credentials (``$CREDENTIALS_DIRECTORY/zoho-client-id`` ...), environment variables
(``ZOHO_CLIENT_ID`` ...), the config file. Several accounts are ``[[account]]`` tables.
"""

from __future__ import annotations

import difflib
import logging
import os
import ssl
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zohofs.access import Access
from zohofs.auth import Credentials
from zohofs.errors import ConfigError
from zohofs.hosts import DATA_CENTRES
from zohofs.schema import ACCOUNT_KEYS as ACCOUNT_KEYS
from zohofs.schema import CREDENTIAL_KEYS as CREDENTIAL_KEYS
from zohofs.schema import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE
from zohofs.schema import LOG_LEVELS as LOG_LEVELS
from zohofs.schema import SECRETS as SECRETS
from zohofs.schema import SETTINGS as SETTINGS
from zohofs.schema import MiB as MiB
from zohofs.schema import parse_size as parse_size
from zohofs.schema import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Account:
    """One Zoho org to discover backups for."""

    name: str
    dc: str
    accounts_url: str
    api_url: str | None  # None: the api_domain of the token answer, else the DC's
    credentials: Credentials

    @property
    def default_api_url(self) -> str:
        return self.api_url or f"https://{DATA_CENTRES[self.dc].api}"


@dataclass(frozen=True)
class Config:
    mountpoint: str = ""
    accounts: tuple[Account, ...] = ()
    links: tuple[str, ...] = ()
    access_token: str | None = field(default=None, repr=False)
    api_version: int = 8
    listing_interval: float = 600.0
    lookup_refresh_interval: float = 60.0  # at most one listing per this for missed names
    ca_file: str | None = None
    trust_hosts: frozenset[str] = frozenset()
    cache_size: int = 256 * MiB
    block_size: int = DEFAULT_BLOCK_SIZE
    readahead_blocks: int = 4
    connections: int = 4
    timeout: float = 30.0  # one HTTP request, start to end of its body
    read_timeout: float = 60.0  # one read() or stat(), retries included
    retries: int = 5
    retry_base_delay: float = 0.25
    direct_io: bool = True
    expand: bool = False  # show each X.zip's members under X/ as well
    debug: bool = False
    fuse_options: tuple[str, ...] = ()
    # Who may read (access.py); None: the mounting user's uid and gid, the default umask.
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    file_mode: int | None = None
    dir_mode: int | None = None
    log_file: str | None = None
    log_level: str | None = None  # None: info, or debug with --debug
    cache_dir: str | None = None  # chunks kept on disk there (diskcache.py); None: none
    cache_dir_size: int = 10 << 30

    @property
    def access(self) -> Access:
        return Access.from_settings(uid=self.uid, gid=self.gid, umask=self.umask,
                                    file_mode=self.file_mode, dir_mode=self.dir_mode)

    def __post_init__(self) -> None:
        # Each setting's own range is checked where it is read (SETTINGS), so the message
        # names its key and source; only what spans two settings is left to check here.
        if self.cache_size < 2 * self.block_size:
            raise ConfigError(f"cache_size ({self.cache_size / MiB:g} MiB) must hold at least "
                              f"two blocks of block_size ({self.block_size / MiB:g} MiB): "
                              "raise cache_size or lower block_size")

    def ssl_context(self) -> ssl.SSLContext:
        """Verifying TLS: the system's CAs (``SSL_CERT_FILE`` honoured) plus ``ca_file``."""
        ctx = ssl.create_default_context()
        if self.ca_file:
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load CA file {self.ca_file}: {exc}") from exc
        return ctx


    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **fields: Any) -> Config:
        """A Config from merged settings (the keys of SETTINGS) plus explicit fields."""
        renamed = {"readahead": "readahead_blocks", "retry_delay": "retry_base_delay"}
        values: dict[str, Any] = {}
        for key, value in settings.items():
            if key in ("links", "links_file"):
                continue
            if key == "page_cache":
                values["direct_io"] = not value
            elif key == "trust_hosts":
                values[key] = frozenset(h.lower() for h in value)
            elif key not in ("dc", "accounts_url", "api_url"):  # per account
                values[renamed.get(key, key)] = value
        return cls(**values, **fields)


# -- reading files -------------------------------------------------------------------------

def _check_private(path: str, what: str, strict: bool) -> None:
    """Secrets readable by others get a warning, or are refused with --strict."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        message = (f"{what} {path} is readable by group or others (mode "
                   f"{stat.S_IMODE(mode):o}): chmod 600 {path}")
        if strict:
            raise ConfigError(message + " (refused because of --strict)")
        log.warning("%s", message)


def read_secret_file(path: str, what: str, strict: bool = False) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    _check_private(path, f"{what} file", strict)
    return value


def access_token(token_file: str | None, env: Mapping[str, str],
                 strict: bool = False) -> str | None:
    """The access token of the explicit-link mode: ``--access-token-file``, else
    ``$ZOHO_ACCESS_TOKEN``."""
    if token_file:
        return read_secret_file(token_file, "access token", strict)
    return env.get("ZOHO_ACCESS_TOKEN", "").strip() or None


def default_config_path(env: Mapping[str, str]) -> Path | None:
    xdg = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "zohofs" / "config.toml"
    for candidate in (xdg, Path("/etc/zohofs/config.toml")):
        if candidate.is_file():
            return candidate
    return None


def load_toml(path: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: editors on some systems start the file with a byte-order mark.
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): save "
                          "it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


# -- putting it together -------------------------------------------------------------------

def find_secrets(sources: list[Mapping[str, str]], strict: bool) -> dict[str, str]:
    """Each secret from the first source that has it; ``*_file`` entries are read."""
    found: dict[str, str] = {}
    for source in sources:
        for secret in SECRETS:
            if secret in found:
                continue
            if source.get(f"{secret}_file"):
                found[secret] = read_secret_file(source[f"{secret}_file"],
                                                 secret.replace("_", " "), strict)
            elif source.get(secret):
                found[secret] = source[secret].strip()
    return found


def _credentials(sources: list[Mapping[str, str]], where: str,
                 strict: bool) -> Credentials | None:
    found = find_secrets(sources, strict)
    if not found:
        return None
    missing = [s for s in SECRETS if s not in found]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} missing (have "
                          f"{', '.join(s for s in SECRETS if s in found)})")
    return Credentials(found["client_id"], found["client_secret"], found["refresh_token"])


def single_account_sources(secret_flags: Mapping[str, str | None], env: Mapping[str, str],
                           top: Mapping[str, Any]) -> list[Mapping[str, str]]:
    """Where one account's secrets may be, first match wins: flags naming files, systemd
    credentials, environment variables, the config file."""
    sources: list[Mapping[str, str]] = [
        {f"{s}_file": v for s, v in secret_flags.items() if v}]
    if env.get("CREDENTIALS_DIRECTORY"):  # systemd's LoadCredential=
        creds_dir = Path(env["CREDENTIALS_DIRECTORY"])
        systemd = {s: creds_dir / ("zoho-" + s.replace("_", "-")) for s in SECRETS}
        sources.append({f"{s}_file": str(p) for s, p in systemd.items() if p.exists()})
    sources.append({s: env[f"ZOHO_{s.upper()}"] for s in SECRETS
                    if env.get(f"ZOHO_{s.upper()}")})
    sources.append({k: v for k, v in top.items() if k in CREDENTIAL_KEYS})
    return sources


def _account(table: Mapping[str, Any], defaults: Mapping[str, Any], name: str,
             credentials: Credentials) -> Account:
    dc = table.get("dc", defaults.get("dc", "us"))
    return Account(
        name=table.get("name", name), dc=dc,
        accounts_url=table.get("accounts_url") or defaults.get("accounts_url")
        or f"https://{DATA_CENTRES[dc].accounts}",
        api_url=table.get("api_url") or defaults.get("api_url"),
        credentials=credentials)


def read_config_file(config_path: str | None, env: Mapping[str, str], strict: bool,
                     ) -> tuple[Path | None, dict[str, Any], list[dict[str, Any]]]:
    """(path, validated top-level keys, raw [[account]] tables) of the config file."""
    path = Path(config_path) if config_path else default_config_path(env)
    file: dict[str, Any] = load_toml(path) if path else {}
    where = f"config file {path}"
    raw_accounts = file.pop("account", [])
    if not isinstance(raw_accounts, list) or not all(isinstance(a, dict) for a in raw_accounts):
        raise ConfigError(f"{where}: 'account' must be [[account]] tables")
    top = validate(file, {**SETTINGS, **CREDENTIAL_KEYS}, where)
    if path and (any(top.get(s) for s in SECRETS)
                 or any(a.get(s) for a in raw_accounts for s in SECRETS)):
        _check_private(str(path), "config file with secrets", strict)
    return path, top, raw_accounts


def build(flags: Mapping[str, Any], secret_flags: Mapping[str, str | None],
          env: Mapping[str, str], config_path: str | None, strict: bool = False,
          ) -> tuple[dict[str, Any], tuple[Account, ...]]:
    """Settings (merged by precedence) and accounts, from every source.

    ``flags`` holds only the settings given on the command line; ``secret_flags`` the
    ``--client-id-file`` style flags.
    """
    path, top, raw_accounts = read_config_file(config_path, env, strict)
    where = f"config file {path}"
    settings = {k: v for k, v in top.items() if k in SETTINGS}
    for name in env:  # a misspelt variable would be ignored without a word
        key = name[len("ZOHOFS_"):].lower()
        if name.startswith("ZOHOFS_") and key not in SETTINGS:
            near = difflib.get_close_matches(key, SETTINGS, n=1)
            log.warning("ignoring $%s: not a zohofs setting%s", name,
                        f" (did you mean $ZOHOFS_{near[0].upper()}?)" if near else "")
    for key in SETTINGS:  # ZOHOFS_CACHE_SIZE=512 and friends
        value = env.get(f"ZOHOFS_{key.upper()}")
        if value is not None and value != "":
            settings.update(validate({key: value}, SETTINGS, f"$ZOHOFS_{key.upper()}"))
    settings.update(validate({k: v for k, v in flags.items() if v is not None}, SETTINGS,
                              "command line"))

    accounts: list[Account] = []
    if raw_accounts:
        if any(secret_flags.values()):
            raise ConfigError(f"{where} has [[account]] tables: give each account's secrets "
                              "there, not with --client-id-file and friends")
        for i, table in enumerate(raw_accounts, 1):
            checked = validate(table, ACCOUNT_KEYS, f"{where}, account {i}")
            creds = _credentials([checked], f"{where}, account {i}", strict)
            if creds is None:
                raise ConfigError(f"{where}, account {i}: no client_id/client_secret/"
                                  "refresh_token")
            accounts.append(_account(checked, settings, f"account{i}", creds))
        names = [a.name for a in accounts]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: account names must differ: {names}")
    else:
        sources = single_account_sources(secret_flags, env, top)
        creds = _credentials(sources, "sign-in", strict)
        if creds is not None:
            accounts.append(_account({}, settings, "default", creds))
    return settings, tuple(accounts)
