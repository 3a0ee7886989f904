"""Mount settings: one frozen dataclass, built from defaults, the environment and flags."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field

from zohofs.errors import ConfigError

MiB = 1 << 20
# Measured (README, "Performance"): 8 MiB blocks keep a TLS connection busy long enough to
# reach its full speed while a 256 MiB cache still holds 32 of them.
DEFAULT_BLOCK_SIZE = 8 * MiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 64 * MiB

_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]?)(i?[bB])?$")


def parse_size(text: str, default_unit: int = 1) -> int:
    """``8M``, ``512k``, ``1G`` or a plain number (in ``default_unit``) to bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"not a size: {text!r} (try 8M or 512K)")
    unit = {"": default_unit, "k": 1 << 10, "m": MiB, "g": 1 << 30}[m[2].lower()]
    return int(m[1]) * unit


@dataclass(frozen=True)
class Config:
    mountpoint: str
    links: tuple[str, ...] = ()
    access_token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    trust_hosts: frozenset[str] = frozenset()
    cache_size: int = 256 * MiB
    block_size: int = DEFAULT_BLOCK_SIZE
    readahead_blocks: int = 4
    connections: int = 4
    timeout: float = 30.0
    retries: int = 5
    retry_base_delay: float = 0.25
    direct_io: bool = True
    debug: bool = False
    fuse_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE:
            raise ConfigError(f"--block-size must be between {MIN_BLOCK_SIZE // MiB} MiB and "
                              f"{MAX_BLOCK_SIZE // MiB} MiB, not {self.block_size} bytes")
        if self.cache_size < 2 * self.block_size:
            raise ConfigError(f"--cache-size must hold at least two blocks "
                              f"({2 * self.block_size // MiB} MiB)")
        for name in ("connections", "retries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")
        if self.readahead_blocks < 0 or self.timeout <= 0:
            raise ConfigError("--readahead and --timeout must not be negative")

    def ssl_context(self) -> ssl.SSLContext:
        """Verifying TLS: the system's CAs (``SSL_CERT_FILE`` honoured) plus ``--ca-file``."""
        ctx = ssl.create_default_context()
        if self.ca_file:
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load CA file {self.ca_file}: {exc}") from exc
        return ctx


def read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    return value


def access_token(token_file: str | None) -> str:
    """The access token: ``--access-token-file``, else ``$ZOHO_ACCESS_TOKEN``. Never argv."""
    if token_file:
        return read_secret_file(token_file, "access token")
    token = os.environ.get("ZOHO_ACCESS_TOKEN", "").strip()
    if not token:
        raise ConfigError("no access token: use --access-token-file FILE "
                          "or set ZOHO_ACCESS_TOKEN")
    return token
