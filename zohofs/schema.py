"""The settings zohofs knows, and how each value is read: one parser per key, so that a
bad value is reported with its key and where it came from (config.py puts them
together)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from zohofs.access import parse_group, parse_octal, parse_user
from zohofs.errors import ConfigError
from zohofs.hosts import DATA_CENTRES
from zohofs.mountopts import fuse_option

MiB = 1 << 20
# Measured (README, "Performance"): 8 MiB blocks keep a TLS connection busy long enough to
# reach its full speed while a 256 MiB cache still holds 32 of them.
DEFAULT_BLOCK_SIZE = 8 * MiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 64 * MiB
SECRETS = ("client_id", "client_secret", "refresh_token")

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?$")


def parse_size(text: str | int, default_unit: int = 1) -> int:
    """``8M``, ``512k``, ``1.5G``, ``2T`` or a plain number (in ``default_unit``) to
    bytes (binary units: ``M`` is MiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text * default_unit
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ConfigError(f"not a size: {text!r} (a number, then K, M, G or T: 64M, 1.5G)")
    unit = {"": default_unit, "k": 1 << 10, "m": MiB, "g": 1 << 30, "t": 1 << 40}[m[2].lower()]
    return int(Decimal(m[1]) * unit)


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
    "cache_dir": _string,
    "cache_dir_size": _ranged(lambda v: parse_size(v, MiB), 16 * MiB, unit="MiB"),
}
CREDENTIAL_KEYS = {k: _string for s in SECRETS for k in (s, f"{s}_file")}
def _account_name(value: Any) -> str:
    name = _string(value)
    if "/" in name or name in (".", "..") or len(name.encode()) > 255 or "\0" in name:
        raise ValueError("a name for a folder: no '/', not '.' or '..', at most 255 bytes")
    return name


ACCOUNT_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _account_name, "dc": _dc, "accounts_url": _url, "api_url": _url, **CREDENTIAL_KEYS}


def validate(table: Mapping[str, Any], schema: Mapping[str, Callable[[Any], Any]],
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
