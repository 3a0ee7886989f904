"""What a backup is made of, and how to find it: Zoho's backup URLs API."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from zohofs.auth import TokenSource, authorization_header
from zohofs.errors import ConfigError, DiscoveryError, SignInError, reason
from zohofs.hosts import DATA_CENTRES, HostPolicy
from zohofs.logs import redact_url

log = logging.getLogger(__name__)
MAX_LISTING = 1 << 20  # a URL list is a few KiB; anything near this is not one

# https://download-accl.zoho.com/v2/crm/<zgid>/backup/<job-id>/<Name>_<NNN>.zip
_LINK_PATH = re.compile(r"/v2/crm/(?P<zgid>[0-9]+)/backup/(?P<job>[0-9]+)/(?P<name>[^/]+)")
_FILE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*_[0-9]{3,}\.zip")


@dataclass(frozen=True)
class BackupFile:
    """One downloadable part of a backup, as the mount shows it: /<zgid>/<job_id>/<name>."""

    zgid: str
    job_id: str
    name: str
    url: str
    expires: datetime | None = None
    account: str = ""  # which account's token reads it ("" for explicit links)

    @property
    def path(self) -> str:
        return f"{self.zgid}/{self.job_id}/{self.name}"


def parse_link(url: str, expires: datetime | None = None, account: str = "") -> BackupFile:
    """A BackupFile from a download link, refusing anything that is not Zoho's shape.

    The path becomes part of the mounted tree, so hostile names (``..``, ``/``, NUL)
    must never get through.
    """
    url = url.strip()
    if any(c.isspace() or not c.isprintable() for c in url):
        # urlsplit silently drops newlines and tabs; a link carrying any is not Zoho's.
        raise ConfigError(f"refusing a link with spaces or control characters: "
                          f"{redact_url(url)!r}")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        raise ConfigError(f"malformed link: {redact_url(url)!r}") from None
    # fullmatch, not match: "$" would also match before a trailing newline.
    match = _LINK_PATH.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not hostname or match is None:
        raise ConfigError(
            f"not a Zoho backup download link: {redact_url(url)!r} "
            "(expected https://<host>/v2/crm/<zgid>/backup/<job-id>/<Name>_<NNN>.zip)")
    name = unquote(match["name"])
    if not _FILE_NAME.fullmatch(name):
        raise ConfigError(f"refusing backup file name {name!r} in {redact_url(url)!r}: "
                          "not of the form <Name>_<NNN>.zip")
    return BackupFile(match["zgid"], match["job"], name, url, expires, account)


def read_links_file(path: str) -> list[str]:
    """Links from a file: one a line, blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read links file {path}: {exc.strerror}") from exc
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def dedupe(files: list[BackupFile]) -> list[BackupFile]:
    """One entry per path: the same file listed twice is shown once (the first link wins)."""
    seen: dict[str, BackupFile] = {}
    for f in files:
        seen.setdefault(f.path, f)
    return list(seen.values())


# What the backup URLs API's error codes mean for the user.
_API_ERRORS = {
    "OAUTH_SCOPE_MISMATCH": "the refresh token lacks the scope ZohoCRM.bulk.backup.READ: "
                            "make a new one with `zohofs login`",
    "NO_PERMISSION": "this user may not read backups: only CRM administrators can",
    "INVALID_TOKEN": "Zoho refused the access token even after a refresh",
}


def trusted_api_url(api_domain: str | None, fallback: str) -> str:
    """The ``api_domain`` of a token answer if it names a Zoho API host, else ``fallback``.

    The token is sent there, so a hostile or broken answer must not choose any host."""
    if not api_domain:
        return fallback
    try:
        url = httpx.URL(api_domain)
    except (httpx.InvalidURL, TypeError):
        url = None
    if url is not None and url.scheme == "https" and url.host in {
            dc.api for dc in DATA_CENTRES.values()} and url.path in ("", "/"):
        return f"https://{url.host}"
    log.warning("ignoring api_domain %r from the token answer: not a Zoho API host",
                api_domain)
    return fallback


def _error_code(content: bytes) -> str:
    try:
        body = json.loads(content)
        return str(body.get("code", "")) if isinstance(body, dict) else ""
    except (ValueError, RecursionError):
        return ""


async def list_backup(client: httpx.AsyncClient, api_url: str, version: int,
                      tokens: TokenSource, downloads: HostPolicy,
                      account: str = "") -> list[BackupFile]:
    """The files of the org's current backup, from ``/crm/bulk/v{version}/backup/urls``.

    An empty list means Zoho has no backup to download (HTTP 204). Links that are not on
    a download host we trust, or not of Zoho's shape, are refused one by one.
    """
    url = f"{api_url}/crm/bulk/v{version}/backup/urls"

    async def get(token: str) -> tuple[int, bytes, str]:
        """(status, body, Zoho's error code) of one GET."""
        headers = {"Authorization": authorization_header(token), "Accept": "application/json"}
        try:
            async with client.stream("GET", url, headers=headers) as response:
                # The size cap applies while reading, not after a hostile answer is in memory.
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_LISTING:
                        raise DiscoveryError(f"backup URLs answer over {MAX_LISTING} bytes "
                                             "refused (not a URL list)")
        except httpx.HTTPError as exc:
            raise DiscoveryError(f"cannot reach {httpx.URL(url).host}: {reason(exc)}") from None
        status, content = response.status_code, bytes(body)
        return status, content, _error_code(content) if status >= 400 else ""

    token = await tokens.token()
    status, content, code = await get(token)
    # An access token that expired under us is renewed once, then tried again.
    if status == 401 and code == "INVALID_TOKEN" and await tokens.rejected(token):
        status, content, code = await get(await tokens.token())
    if status == 204:
        return []
    if status in (401, 403):
        raise SignInError(f"backup URLs API: {code or status}: "
                          f"{_API_ERRORS.get(code, 'access refused')}")
    if status == 404:
        raise DiscoveryError(f"backup URLs API not found at {url} ({code or 'HTTP 404'}): "
                             "check api_url and api_version")
    if status != 200:
        raise DiscoveryError(f"backup URLs API answered HTTP {status} {code}".rstrip())
    return parse_listing(content, downloads, account)


def parse_listing(content: bytes, downloads: HostPolicy, account: str = "") -> list[BackupFile]:
    """BackupFiles from the body of a backup URLs answer, refusing what is not Zoho's."""
    if len(content) > MAX_LISTING:
        raise DiscoveryError(f"backup URLs answer of {len(content)} bytes refused "
                             "(not a URL list)")
    try:
        body: Any = json.loads(content)
    except (ValueError, RecursionError):
        raise DiscoveryError("backup URLs answer is not JSON (or nested absurdly deep)"
                             ) from None
    urls = body.get("urls") if isinstance(body, dict) else None
    if not isinstance(urls, dict):
        raise DiscoveryError("backup URLs answer has no 'urls' object")
    expires = None
    if urls.get("expiry_date") is not None:
        try:
            expires = datetime.fromisoformat(str(urls["expiry_date"]))
        except ValueError:
            raise DiscoveryError(
                f"backup URLs answer has a bad expiry_date {urls['expiry_date']!r}") from None
        if expires.tzinfo is None:
            raise DiscoveryError("backup URLs answer has an expiry_date without a time zone")
    links: list[Any] = []
    for key in ("data_links", "attachment_links"):
        value = urls.get(key) or []
        if not isinstance(value, list):
            raise DiscoveryError(f"backup URLs answer: {key} is not a list")
        links += value
    files = []
    for link in links:
        try:
            if not isinstance(link, str):
                raise ConfigError(f"not a string: {link!r}")
            downloads.check_link(link)
            files.append(parse_link(link, expires, account))
        except ConfigError as exc:  # its message names the link without its query
            log.warning("refusing a link from the backup URLs API: %s", exc)
    return dedupe(files)
