"""Zoho's data centres and the rule for which hosts may see the access token."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from zohofs.errors import ConfigError
from zohofs.logs import redact_url


@dataclass(frozen=True)
class DataCentre:
    name: str
    accounts: str
    api: str
    download: str


# The download host of some DCs is not confirmed publicly; it is only ever used to decide
# whether a link's host may see the token, and links always name their host themselves.
DATA_CENTRES: dict[str, DataCentre] = {
    dc.name: dc
    for dc in (
        DataCentre("us", "accounts.zoho.com", "www.zohoapis.com", "download-accl.zoho.com"),
        DataCentre("eu", "accounts.zoho.eu", "www.zohoapis.eu", "download-accl.zoho.eu"),
        DataCentre("in", "accounts.zoho.in", "www.zohoapis.in", "download-accl.zoho.in"),
        DataCentre("au", "accounts.zoho.com.au", "www.zohoapis.com.au",
                   "download-accl.zoho.com.au"),
        DataCentre("jp", "accounts.zoho.jp", "www.zohoapis.jp", "download-accl.zoho.jp"),
        DataCentre("cn", "accounts.zoho.com.cn", "www.zohoapis.com.cn",
                   "download-accl.zoho.com.cn"),
        DataCentre("ca", "accounts.zohocloud.ca", "www.zohoapis.ca", "download-accl.zohocloud.ca"),
        DataCentre("sa", "accounts.zoho.sa", "www.zohoapis.sa", "download-accl.zoho.sa"),
    )
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_port(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, with the scheme's default port filled in."""
    try:
        parts = urlsplit(url)
    except ValueError:  # such as a bracketed host that is not an IPv6 address
        raise ConfigError(f"malformed URL: {redact_url(url)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {redact_url(url)}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in URL: {redact_url(url)}") from exc
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts get the token: the download hosts of Zoho's DCs plus those the user named.

    ``trusted`` holds ``host`` or ``host:port`` entries; a bare host matches any port.
    """

    trusted: frozenset[str] = frozenset()
    zoho_hosts: frozenset[str] = frozenset(dc.download for dc in DATA_CENTRES.values())

    def may_send_token(self, url: str) -> bool:
        scheme, host, port = host_port(url)
        if scheme != "https" and not is_loopback(host):
            return False
        return (host in self.zoho_hosts or host in self.trusted
                or f"{host}:{port}" in self.trusted)

    def check_link(self, url: str) -> None:
        """Refuse a link we would not send the token to, saying why."""
        scheme, host, port = host_port(url)
        if scheme != "https" and not is_loopback(host):
            raise ConfigError(f"refusing plain http link {redact_url(url)}: only https is allowed "
                              "(plain http only for loopback test servers)")
        if not self.may_send_token(url):
            raise ConfigError(
                f"refusing link on host {host}:{port}: it is not a Zoho download host; "
                f"add --trust-host {host}:{port} if you really mean it")
