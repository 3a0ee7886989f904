"""Keeps the tree in step with Zoho: lists every account's backup now and then, and on
demand when someone looks for a name that is not there yet."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import httpx
import trio

from zohofs.auth import OAuthTokens
from zohofs.config import Account
from zohofs.diskcache import DiskCache
from zohofs.errors import DiscoveryError, ZohofsError
from zohofs.hosts import DATA_CENTRES, HostPolicy
from zohofs.probes import Prober
from zohofs.tree import Tree
from zohofs.zoho import BackupFile, list_backup, trusted_api_url

log = logging.getLogger(__name__)

# Names worth a listing call when they are missing: org and job ids are digits, files are
# Zoho's parts. File managers probe `.hidden`, `desktop.ini` and such in every folder.
_MAY_APPEAR = re.compile(r"^(\d+|[A-Za-z][A-Za-z0-9]*_\d{3,}\.zip)$")


@dataclass
class AccountSource:
    account: Account
    tokens: OAuthTokens
    files: list[BackupFile] | None = None  # the last listing that succeeded


class Catalog:
    def __init__(self, tree: Tree, prober: Prober, client: httpx.AsyncClient,
                 sources: Sequence[AccountSource], static: Sequence[BackupFile], *,
                 api_version: int, interval: float, trusted: frozenset[str],
                 on_demand_every: float = 60.0, deadline: float = 60.0,
                 probe_wait: float = math.inf, disk: DiskCache | None = None) -> None:
        self._tree = tree
        self._disk = disk
        # Paths (and their orgs) of the last whole listing, and files of it that another
        # backup of their org replaced since: what the disk cache keeps of them goes.
        self._listed: dict[str, str] | None = None
        self._replaced: set[str] = set()
        # The paths that open handles read (set by the runtime): those are kept until
        # closed, they may still be read from the disk cache.
        self.in_use: Callable[[], Collection[str]] = frozenset
        # The sizes of new files are probed at once; a listing waits ``probe_wait`` for
        # them at most (those not done then are probed on access): a silent download host
        # must not hold up the mount's start, nor lookups of new names.
        self._prober = prober
        self._probe_wait = probe_wait
        self._client = client
        self._sources = list(sources)
        self._static = list(static)
        self._api_version = api_version
        self._interval = interval
        self._trusted = trusted
        self._on_demand_every = on_demand_every
        # One account's listing, sign-in included: a stuck API host must not hold the
        # lock that lookups of missing names wait for.
        self._deadline = deadline
        self._lock = trio.Lock()
        self._next = -math.inf  # when run() lists again
        self._last_on_demand = -math.inf

    async def refresh(self) -> list[ZohofsError]:
        """List every account once (in parallel) and update the tree; returns the failures.

        An account whose listing fails keeps its previous files: a network hiccup must
        not make a backup vanish from under a running copy.
        """
        async with self._lock:
            started = trio.current_time()
            # A listing that fails (or is cut short) is tried again sooner than usual, as
            # often as a missed lookup may ask for one.
            self._next = started + min(self._interval, self._on_demand_every)
            errors: list[ZohofsError] = []
            async with trio.open_nursery() as nursery:
                for source in self._sources:
                    nursery.start_soon(self._list_one, source, errors)
            files = self._static + [f for s in self._sources for f in s.files or []]
            added = self._tree.set_files(files)
            with trio.move_on_after(self._probe_wait):
                await self._prober.probe_all(added)
            if not errors:
                self._next = started + self._interval
                self._note_replaced(files)
            return errors

    def _note_replaced(self, files: Sequence[BackupFile]) -> None:
        """From a whole listing, the files that left it while their org stayed: Zoho
        replaced that backup with a newer one (an org that vanished altogether, or an
        empty answer, retires nothing: it may be a passing fault)."""
        listed = {f.path: f.zgid for f in files}
        if self._listed is not None:
            orgs = set(listed.values())
            self._replaced |= {path for path, zgid in self._listed.items()
                               if path not in listed and zgid in orgs}
        self._listed = listed

    async def _forget_replaced(self) -> None:
        """What the disk cache keeps of replaced backups goes, but what is open."""
        if self._disk is None or not self._replaced:
            return
        in_use = set(self.in_use())
        gone, self._replaced = self._replaced - in_use, self._replaced & in_use
        if gone:
            await trio.to_thread.run_sync(self._disk.forget_files, gone)

    async def _list_one(self, source: AccountSource, errors: list[ZohofsError]) -> None:
        account = source.account
        downloads = HostPolicy(self._trusted,
                               zoho_hosts=frozenset({DATA_CENTRES[account.dc].download}))
        try:
            files = await self._list(source, downloads)
        except ZohofsError as exc:
            log.log(exc.log_level, "%s: cannot list backups: %s", account.name, exc)
            errors.append(exc)
            return
        if not files:
            log.info("%s: Zoho has no backup to download", account.name)
        elif source.files is None or {f.path for f in files} != {f.path for f in source.files}:
            log.info("%s: %d backup files", account.name, len(files))
        source.files = files

    async def _list(self, source: AccountSource, downloads: HostPolicy) -> list[BackupFile]:
        account = source.account
        try:
            with trio.fail_after(self._deadline):
                await source.tokens.token()  # learn api_domain before choosing the API host
                api_url = account.api_url or trusted_api_url(source.tokens.api_domain,
                                                             account.default_api_url)
                return await list_backup(self._client, api_url, self._api_version,
                                         source.tokens, downloads, account.name)
        except trio.TooSlowError:
            raise DiscoveryError(f"no answer within {self._deadline:g} s") from None

    async def refresh_for(self, name: str) -> bool:
        """A lookup missed ``name``: list again if that could help and we have not just
        done so. True when a listing ran."""
        if not self._sources or not _MAY_APPEAR.match(name):
            return False
        if trio.current_time() - self._last_on_demand < self._on_demand_every:
            return False
        self._last_on_demand = trio.current_time()
        await self.refresh()
        return True

    async def run(self) -> None:
        """Refresh every ``interval`` seconds (sooner after a failure), forever; runs in the
        mount's nursery."""
        while True:
            await trio.sleep_until(self._next)
            if trio.current_time() >= self._next:  # an on-demand listing may have moved it
                try:
                    await self.refresh()
                    await self._forget_replaced()  # not under the lock: lookups go on
                except Exception:  # in the top-level nursery: must never end the mount
                    log.exception("unexpected error while refreshing the backup list")
