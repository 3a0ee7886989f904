"""Mount settings: one frozen dataclass built from defaults, a TOML file, the environment
and flags, in that order of precedence (flags win).

Secrets (client id, client secret, refresh token, access token) never come from argv. For
the single-account case they come from, in order: files named by flags, systemd
credentials (``$CREDENTIALS_DIRECTORY/zoho-client-id`` ...), environment variables
(``ZOHO_CLIENT_ID`` ...), the config file. Several accounts are ``[[account]]`` tables.
"""

from __future__ import annotations

import logging
import math
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zohofs.access import Access, parse_group, parse_octal, parse_user
from zohofs.auth import Credentials
from zohofs.errors import ConfigError
from zohofs.hosts import DATA_CENTRES
from zohofs.mountopts import fuse_option

log = logging.getLogger(__name__)

MiB = 1 << 20
# Measured (README, "Performance"): 8 MiB blocks keep a TLS connection busy long enough to
# reach its full speed while a 256 MiB cache still holds 32 of them.
DEFAULT_BLOCK_SIZE = 8 * MiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 64 * MiB
SECRETS = ("client_id", "client_secret", "refresh_token")

_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]?)(i?[bB])?$")


def parse_size(text: str | int, default_unit: int = 1) -> int:
    """``8M``, ``512k``, ``1G`` or a plain number (in ``default_unit``) to bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text * default_unit
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ConfigError(f"not a size: {text!r} (try 8M or 512K)")
    unit = {"": default_unit, "k": 1 << 10, "m": MiB, "g": 1 << 30}[m[2].lower()]
    return int(m[1]) * unit


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


# -- the schema ----------------------------------------------------------------------------

def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected an integer")
    return int(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                     "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError("expected true or false")


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(v.strip() for v in value if v.strip())


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: Any) -> str:
    level = _string(value).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level


def _fuse_options(value: Any) -> tuple[str, ...]:
    return tuple(fuse_option(o) for o in _strings(value))


def _dc(value: Any) -> str:
    dc = _string(value).lower()
    if dc not in DATA_CENTRES:
        raise ValueError(f"unknown data centre (one of {', '.join(DATA_CENTRES)})")
    return dc


def _url(value: Any) -> str:
    url = _string(value).rstrip("/")
    if not re.match(r"^https?://[^/\s]+$", url):
        raise ValueError("expected a base URL such as https://accounts.zoho.eu")
    return url


def _ranged(parse: Callable[[Any], Any], low: float, high: float = math.inf, *,
            above: bool = False, unit: str = "") -> Callable[[Any], Any]:
    """``parse`` then a range check (``above``: more than ``low``, not equal to it), so a
    bad value is reported with its key and source."""
    def shown(n: float) -> str:
        return f"{n / MiB:g} MiB" if unit == "MiB" else f"{n:g}"

    def check(value: Any) -> Any:
        parsed = parse(value)
        if parsed < low or parsed > high or (above and parsed == low):
            bound = (f"between {shown(low)} and {shown(high)}" if high != math.inf
                     else f"more than {shown(low)}" if above else f"at least {shown(low)}")
            raise ValueError(f"must be {bound}, not {shown(parsed)}")
        return parsed
    return check


SETTINGS: dict[str, Callable[[Any], Any]] = {
    "dc": _dc, "accounts_url": _url, "api_url": _url, "api_version": _ranged(_integer, 1),
    "listing_interval": _ranged(_number, 0, above=True),
    "lookup_refresh_interval": _ranged(_number, 0),
    "cache_size": _ranged(lambda v: parse_size(v, MiB), 2 * MIN_BLOCK_SIZE, unit="MiB"),
    "block_size": _ranged(parse_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, unit="MiB"),
    "readahead": _ranged(_integer, 0), "connections": _ranged(_integer, 1),
    "timeout": _ranged(_number, 0, above=True), "read_timeout": _ranged(_number, 0, above=True),
    "retries": _ranged(_integer, 1), "retry_delay": _ranged(_number, 0),
    "page_cache": _boolean, "expand": _boolean,
    "ca_file": _string, "trust_hosts": _strings, "fuse_options": _fuse_options, "links": _strings,
    "links_file": _string,
    "uid": parse_user, "gid": parse_group, "umask": parse_octal, "file_mode": parse_octal,
    "dir_mode": parse_octal, "log_file": _string, "log_level": _log_level,
}
CREDENTIAL_KEYS = {k: _string for s in SECRETS for k in (s, f"{s}_file")}
ACCOUNT_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _string, "dc": _dc, "accounts_url": _url, "api_url": _url, **CREDENTIAL_KEYS}


def _validate(table: Mapping[str, Any], schema: Mapping[str, Callable[[Any], Any]],
              where: str) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(schema))})")
        try:
            out[key] = schema[key](value)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{where}: bad value for {key!r}: {exc}") from None
    return out


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
    top = _validate(file, {**SETTINGS, **CREDENTIAL_KEYS}, where)
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
    for key in SETTINGS:  # ZOHOFS_CACHE_SIZE=512 and friends
        value = env.get(f"ZOHOFS_{key.upper()}")
        if value is not None and value != "":
            settings.update(_validate({key: value}, SETTINGS, f"$ZOHOFS_{key.upper()}"))
    settings.update(_validate({k: v for k, v in flags.items() if v is not None}, SETTINGS,
                              "command line"))

    accounts: list[Account] = []
    if raw_accounts:
        if any(secret_flags.values()):
            raise ConfigError(f"{where} has [[account]] tables: give each account's secrets "
                              "there, not with --client-id-file and friends")
        for i, table in enumerate(raw_accounts, 1):
            checked = _validate(table, ACCOUNT_KEYS, f"{where}, account {i}")
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
