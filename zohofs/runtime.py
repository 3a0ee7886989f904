"""Assembles the parts of a running zohofs from a Config (no FUSE here: `ls` uses it too)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from zohofs.auth import OAuthTokens, StaticToken, TokenSource
from zohofs.catalog import AccountSource, Catalog
from zohofs.config import Config
from zohofs.diskcache import DiskCache
from zohofs.errors import (
    ConfigError,
    SignInError,
    SignInThrottled,
    SignInUnavailable,
    ZohofsError,
)
from zohofs.fs import ZohoFS
from zohofs.hosts import HostPolicy
from zohofs.logs import redact_url
from zohofs.probes import Prober
from zohofs.remote import RangeReader, RetryPolicy
from zohofs.tokenstore import TokenStore, state_directory
from zohofs.transport import Transport
from zohofs.tree import KernelCache, Tree
from zohofs.zoho import BackupFile, dedupe, parse_link, read_links_file

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    fs: ZohoFS
    catalog: Catalog
    sources: list[AccountSource]


def explicit_links(config: Config) -> list[BackupFile]:
    """The ``--link``/``links`` files, each checked against the host policy."""
    policy = HostPolicy(config.trust_hosts)
    files = []
    for link in config.links:
        policy.check_link(link)
        files.append(parse_link(link))
    return dedupe(files)


def read_links(links: list[str], links_file: str | None) -> tuple[str, ...]:
    return tuple(links + (read_links_file(links_file) if links_file else []))


async def _log_answer(response: httpx.Response) -> None:
    # Sign-in and discovery requests, one line each with -d (httpx's own lines carry URLs
    # with their queries, and are silenced).
    request = response.request
    log.debug("%s %s -> %d %s", request.method, redact_url(str(request.url)),
              response.status_code, response.reason_phrase)


@asynccontextmanager
async def open_runtime(config: Config, kernel: KernelCache | None = None,
                       probe_wait: float = math.inf,
                       disk: DiskCache | None = None) -> AsyncIterator[Runtime]:
    """The parts of a running zohofs; ``kernel`` hears what the kernel must forget
    (none for `ls`, which mounts nothing); a listing waits ``probe_wait`` at most for
    the sizes of new files."""
    static = explicit_links(config)
    if not static and not config.accounts:
        raise ConfigError("nothing to mount: configure a Zoho account (client id, client "
                          "secret, refresh token; see `zohofs login`) or give --link URLs")
    ssl_context = config.ssl_context()
    async with httpx.AsyncClient(verify=ssl_context, timeout=config.timeout,
                                 headers={"User-Agent": "zohofs"},
                                 event_hooks={"response": [_log_answer]}) as client:
        transport = Transport(ssl_context, config.timeout)
        try:
            state = state_directory(os.environ)
            sources = [AccountSource(a, OAuthTokens(
                client, a.accounts_url, a.credentials, name=a.name,
                store=TokenStore(state, a.accounts_url, a.credentials)))
                for a in config.accounts]
            tokens: dict[str, TokenSource] = {s.account.name: s.tokens for s in sources}
            if static:
                tokens[""] = _link_tokens(config, sources)
            reader = RangeReader(transport, HostPolicy(config.trust_hosts),
                                 RetryPolicy(config.retries, config.retry_base_delay),
                                 config.connections, request_deadline=config.timeout)
            # The catalog keeps the tree in step with Zoho's listing; the filesystem asks
            # it again for a name that is not there (yet).
            tree = Tree(expand=config.expand, kernel=kernel)
            prober = Prober(reader, tokens, config.read_timeout)
            catalog = Catalog(tree, prober, client, sources, static,
                              api_version=config.api_version,
                              interval=config.listing_interval, trusted=config.trust_hosts,
                              on_demand_every=config.lookup_refresh_interval,
                              deadline=config.read_timeout, probe_wait=probe_wait,
                              disk=disk)
            fs = ZohoFS(reader, tokens, cache_size=config.cache_size,
                        max_request=config.block_size,
                        max_ahead=config.block_size * config.readahead_blocks,
                        access=config.access, read_deadline=config.read_timeout,
                        kernel=kernel, tree=tree, prober=prober,
                        on_miss=catalog.refresh_for, disk=disk)
            catalog.in_use = fs.blocks.open_files
            yield Runtime(fs, catalog, sources)
        finally:
            transport.close()


def _link_tokens(config: Config, sources: list[AccountSource]) -> TokenSource:
    """Explicit links read with the given access token, else the only account's."""
    if config.access_token:
        return StaticToken(config.access_token)
    if len(sources) == 1:
        return sources[0].tokens
    raise ConfigError("--link needs an access token (--access-token-file or "
                      "$ZOHO_ACCESS_TOKEN), or exactly one configured account")


def fatal_sign_in_errors(errors: list[ZohofsError]) -> list[ZohofsError]:
    """Failures that will not go away by waiting: wrong client, revoked token, no rights."""
    return [e for e in errors if isinstance(e, SignInError)
            and not isinstance(e, SignInThrottled | SignInUnavailable)]
