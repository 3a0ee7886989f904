"""What a backup is made of: files named by Zoho's download links."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import unquote, urlsplit

from zohofs.errors import ConfigError

# https://download-accl.zoho.com/v2/crm/<zgid>/backup/<job-id>/<Name>_<NNN>.zip
_LINK_PATH = re.compile(r"^/v2/crm/(?P<zgid>[0-9]+)/backup/(?P<job>[0-9]+)/(?P<name>[^/]+)$")
_FILE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*_[0-9]{3,}\.zip$")


@dataclass(frozen=True)
class BackupFile:
    """One downloadable part of a backup, as the mount shows it: /<zgid>/<job_id>/<name>."""

    zgid: str
    job_id: str
    name: str
    url: str
    expires: datetime | None = None

    @property
    def path(self) -> str:
        return f"{self.zgid}/{self.job_id}/{self.name}"


def parse_link(url: str, expires: datetime | None = None) -> BackupFile:
    """A BackupFile from a download link, refusing anything that is not Zoho's shape.

    The path becomes part of the mounted tree, so hostile names (``..``, ``/``, NUL)
    must never get through.
    """
    parts = urlsplit(url.strip())
    match = _LINK_PATH.match(parts.path)
    if parts.scheme not in ("http", "https") or not parts.hostname or match is None:
        raise ConfigError(
            f"not a Zoho backup download link: {url!r} "
            "(expected https://<host>/v2/crm/<zgid>/backup/<job-id>/<Name>_<NNN>.zip)")
    name = unquote(match["name"])
    if not _FILE_NAME.match(name):
        raise ConfigError(f"refusing backup file name {name!r} in {url!r}: "
                          "not of the form <Name>_<NNN>.zip")
    return BackupFile(match["zgid"], match["job"], name, url.strip(), expires)


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
