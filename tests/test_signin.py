"""auth.py and zoho.py discovery against the emulator's accounts and API hosts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from zohofs.auth import Credentials, OAuthTokens, RefreshLimits
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import EmulatedAccount, Emulator
from zohofs.errors import DiscoveryError, SignInError, SignInThrottled
from zohofs.hosts import HostPolicy
from zohofs.tokenstore import TokenStore
from zohofs.zoho import list_backup, parse_listing, trusted_api_url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


def tokens_for(client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
               limits: RefreshLimits | None = None,
               changes: dict[str, str] | None = None) -> OAuthTokens:
    creds = {"client_id": account.client_id, "client_secret": account.client_secret,
             "refresh_token": account.refresh_token, **(changes or {})}
    return OAuthTokens(client, emulator.base_url, Credentials(**creds),
                       limits or RefreshLimits())


def posts(emulator: Emulator) -> int:
    return sum(p == "/oauth/v2/token" for p in emulator.arrived)


async def test_one_refresh_serves_many_callers(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount) -> None:
    tokens = tokens_for(client, emulator, account)
    got: list[str] = []

    async def ask() -> None:
        got.append(await tokens.token())

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask)
    assert len(set(got)) == 1 and got[0] == emulator.issued[0]
    assert posts(emulator) == 1 and tokens.refreshes == 1
    assert tokens.api_domain == emulator.base_url


async def test_short_lived_tokens_are_renewed_before_expiry(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount) -> None:
    emulator.token_lifetime = 1
    tokens = tokens_for(client, emulator, account)
    first = await tokens.token()
    assert await tokens.token() == first
    with trio.fail_after(5):
        while await tokens.token() == first:  # noqa: ASYNC110 (waits for time to pass)
            await trio.sleep(0.05)
    assert tokens.refreshes == 2


async def test_legacy_expiry_fields(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount) -> None:
    emulator.legacy_expiry = True
    emulator.token_lifetime = 3600
    tokens = tokens_for(client, emulator, account)
    await tokens.token()
    await tokens.token()
    assert tokens.refreshes == 1  # 3600 s, not 3600000 s nor 3.6 s


async def test_a_rejected_token_is_renewed_once_not_in_a_loop(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount) -> None:
    tokens = tokens_for(client, emulator, account)
    old = await tokens.token()
    assert await tokens.rejected(old)
    new = await tokens.token()
    assert new != old and tokens.refreshes == 2
    assert await tokens.rejected(old)  # a stale rejection costs nothing
    assert not await tokens.rejected(new)  # the fresh token refused too: not expiry
    assert tokens.refreshes == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"refresh_token": "1000.revoked"}, "invalid_code.*zohofs login"),
    ({"client_id": "1000.WRONG"}, "wrong client id, or wrong data centre"),
    ({"client_secret": "nope"}, "wrong client secret"),
])
async def test_token_errors_say_what_to_do(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
        change: dict[str, str], message: str) -> None:
    tokens = tokens_for(client, emulator, account, changes=change)
    with pytest.raises(SignInError, match=message):
        await tokens.token()
    with pytest.raises(SignInError, match=message):  # remembered: no second request
        await tokens.token()
    assert posts(emulator) == 1


async def test_zoho_throttle_pauses_refreshes(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
        caplog: pytest.LogCaptureFixture) -> None:
    emulator.throttle_limit = 0
    tokens = tokens_for(client, emulator, account)
    for _ in range(3):
        with pytest.raises(SignInThrottled, match="too many requests"):
            await tokens.token()
    assert posts(emulator) == 1
    assert "not asking again for 1200 s" in caplog.text


async def test_local_cap_keeps_far_from_zohos_limit(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount) -> None:
    emulator.token_lifetime = 1
    tokens = tokens_for(client, emulator, account, RefreshLimits(max_refreshes=2))
    seen = set()
    with trio.fail_after(10):
        while True:  # the last token is used to its end, then the cap shows
            try:
                seen.add(await tokens.token())
            except SignInThrottled as exc:
                assert "not asking Zoho" in str(exc)
                break
            await trio.sleep(0.05)
    assert len(seen) == 2 and posts(emulator) == 2


async def test_discovery_lists_the_current_backup(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
        backup: Backup) -> None:
    tokens = tokens_for(client, emulator, account)
    files = await list_backup(client, emulator.base_url, 8, tokens,
                              HostPolicy(frozenset({f"127.0.0.1:{emulator.port}"})), "acc")
    assert sorted(f.name for f in files) == sorted(backup.files)
    assert all(f.zgid == backup.zgid and f.job_id == backup.job_id for f in files)
    assert all(f.expires == emulator.links_expire and f.account == "acc" for f in files)
    emulator.no_backup.add(backup.zgid)
    assert await list_backup(client, emulator.base_url, 8, tokens,
                             HostPolicy(frozenset({f"127.0.0.1:{emulator.port}"}))) == []


async def test_discovery_renews_an_expired_token_once(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount) -> None:
    tokens = tokens_for(client, emulator, account)
    await tokens.token()
    emulator.expire_access_tokens()
    files = await list_backup(client, emulator.base_url, 8, tokens,
                              HostPolicy(frozenset({f"127.0.0.1:{emulator.port}"})))
    assert files and tokens.refreshes == 2


@pytest.mark.parametrize(("reason", "message"), [
    ("NO_PERMISSION", "only CRM administrators"),
    ("OAUTH_SCOPE_MISMATCH", "ZohoCRM.bulk.backup.READ"),
])
async def test_discovery_errors_say_what_to_do(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
        reason: str, message: str) -> None:
    emulator.add_fault("status", status=403 if reason == "NO_PERMISSION" else 401,
                       reason=reason, path="/backup/urls")
    with pytest.raises(SignInError, match=message):
        await list_backup(client, emulator.base_url, 8, tokens_for(client, emulator, account),
                          HostPolicy())


POLICY = HostPolicy(frozenset({"127.0.0.1:9"}), zoho_hosts=frozenset({"download-accl.zoho.eu"}))
GOOD = "https://download-accl.zoho.eu/v2/crm/1/backup/2/Data_001.zip"


def listing(*links: object, expiry: object = "2026-12-01T10:00:00+05:30") -> bytes:
    return json.dumps({"urls": {"data_links": list(links), "attachment_links": [],
                                "expiry_date": expiry}}).encode()


@pytest.mark.parametrize("evil", [
    "https://download-accl.zoho.com/v2/crm/1/backup/2/Data_002.zip",  # another DC
    "https://evil.example/v2/crm/1/backup/2/Data_002.zip",
    "http://download-accl.zoho.eu/v2/crm/1/backup/2/Data_002.zip",
    "https://download-accl.zoho.eu/v2/crm/1/backup/2/..%2f..%2fetc",
    "https://download-accl.zoho.eu/v2/crm/1/backup/2/Data_002.zip%00",
    "https://download-accl.zoho.eu/v2/crm/abc/backup/2/Data_002.zip",
    "https://download-accl.zoho.eu/v2/crm/1/backup/2/passwd",
    42,
])
def test_hostile_links_in_a_listing_are_refused(evil: object) -> None:
    files = parse_listing(listing(GOOD, evil, GOOD), POLICY)
    assert [f.url for f in files] == [GOOD]  # the good one once, the evil one never


@pytest.mark.parametrize(("content", "message"), [
    (b"<html>maintenance</html>", "not JSON"),
    (b"[1, 2]", "no 'urls'"),
    (b" " * (2 << 20), "refused"),
    (listing(GOOD, expiry="next week"), "bad expiry_date"),
    (listing(GOOD, expiry="2026-12-01T10:00:00"), "without a time zone"),
    (json.dumps({"urls": {"data_links": "x"}}).encode(), "not a list"),
])
def test_broken_listings_are_errors(content: bytes, message: str) -> None:
    with pytest.raises(DiscoveryError, match=message):
        parse_listing(content, POLICY)


def test_api_domain_must_be_a_zoho_api_host() -> None:
    assert trusted_api_url("https://www.zohoapis.eu", "x") == "https://www.zohoapis.eu"
    assert trusted_api_url("https://evil.example", "https://www.zohoapis.com") == (
        "https://www.zohoapis.com")
    assert trusted_api_url(None, "fallback") == "fallback"


async def test_processes_with_one_store_share_a_token_and_a_damaged_store_costs_one(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
        tmp_path: Path) -> None:
    credentials = Credentials(account.client_id, account.client_secret, account.refresh_token)

    def with_store() -> OAuthTokens:
        return OAuthTokens(client, emulator.base_url, credentials,
                           store=TokenStore(tmp_path, emulator.base_url, credentials))

    store = TokenStore(tmp_path, emulator.base_url, credentials)
    store.path.write_text("{not json")
    first = await with_store().token()  # the damaged store is not a failure
    assert await with_store().token() == first  # a second process asks nobody
    assert posts(emulator) == 1
    assert json.loads(store.path.read_text())["token"] == first


async def test_an_unusable_store_leaves_tokens_per_process(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("")
    credentials = Credentials(account.client_id, account.client_secret, account.refresh_token)
    tokens = OAuthTokens(client, emulator.base_url, credentials,
                         store=TokenStore(tmp_path / "a-file" / "state", emulator.base_url,
                                          credentials))
    assert await tokens.token()
    assert "cannot keep access tokens in" in caplog.text
