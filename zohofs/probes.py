"""What the server says of a file: its size and validators, probed once per version and
shared by every caller (``Range: bytes=0-0``, through remote.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import trio

from zohofs.answers import RemoteInfo
from zohofs.auth import TokenSource
from zohofs.deadline import deadline
from zohofs.errors import LinkExpired, ZohofsError, again
from zohofs.logs import redact_url
from zohofs.remote import RangeReader
from zohofs.tree import Failure, Node
from zohofs.zoho import BackupFile

log = logging.getLogger(__name__)


def validated(info: RemoteInfo) -> bool:
    return info.etag is not None or info.last_modified is not None


def check_expiry(file: BackupFile) -> None:
    """Fail with EACCES once the link is past the expiry date the listing gave."""
    if file.expires is not None and datetime.now(UTC) >= file.expires:
        # In local time: the date a reader of this machine's log expects.
        when = file.expires.astimezone().isoformat(timespec="seconds")
        raise LinkExpired(f"{file.path}: the download link expired on {when}; Zoho offers "
                          "a backup's links for 7 days only")


class Prober:
    def __init__(self, reader: RangeReader, tokens: Mapping[str, TokenSource],
                 read_deadline: float) -> None:
        self._reader = reader
        self._tokens = tokens
        self._read_deadline = read_deadline

    async def probe(self, node: Node) -> RemoteInfo:
        """The file's size and validators: known ones, else one probe however many
        callers ask; a recent failure is shared rather than asked again."""
        assert node.file is not None
        node.probe_lock = node.probe_lock or trio.Lock()
        async with node.probe_lock:
            if node.info is not None and not node.stale:
                return node.info
            if node.failure is not None and node.failure.recent():
                raise again(node.failure.error)
            try:
                check_expiry(node.file)
                with deadline(self._read_deadline, node.file.path, "probing its size"):
                    info = await self._reader.probe(node.file.url,
                                                    self._tokens[node.file.account])
            except ZohofsError as exc:
                node.failure = Failure(exc)
                raise
            first = node.info is None
            node.info, node.stale, node.failure = info, False, None
            if first and not validated(info):
                log.warning("%s: the server sends neither ETag nor Last-Modified: a change "
                            "of the file on the server cannot be detected; each open reads "
                            "it afresh", node.file.path)
            log.debug("%s: %d bytes (%s)", node.file.path, node.info.size,
                      redact_url(node.file.url))
            return node.info

    async def for_open(self, node: Node) -> RemoteInfo:
        """What a new handle reads: for a file without validators nothing pins the
        version, so its size is learnt afresh."""
        if node.info is not None and not validated(node.info):
            node.stale = True
        info = await self.probe(node)
        assert node.file is not None
        check_expiry(node.file)
        return info

    async def probe_all(self, nodes: Iterable[Node]) -> None:
        """Probe at once; failures are logged, kept and retried on access."""
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(self._probe_quietly, node)

    async def _probe_quietly(self, node: Node) -> None:
        try:
            await self.probe(node)
        except ZohofsError as exc:
            log.log(exc.log_level, "%s: %s", node.file.path if node.file else node.name, exc)
