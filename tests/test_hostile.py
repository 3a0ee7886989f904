"""Hostile input: every parser of what a server or a user hands zohofs, fed anything.

Nothing but zohofs's own errors may come out (the FUSE layer and the command line turn
those into errnos and messages); anything else would end the mount or print a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TOKEN
from zohofs import config
from zohofs.answers import (
    parse_content_range,
    parse_http_date,
    parse_length,
    parse_retry_after,
)
from zohofs.auth import (
    Credentials,
    OAuthTokens,
    RefreshLimits,
    StaticToken,
    describe_token_error,
    token_lifetime,
)
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import EmulatedAccount, Emulator
from zohofs.errors import BadAnswer, ConfigError, DiscoveryError, SignInError, ZohofsError
from zohofs.hosts import HostPolicy
from zohofs.remote import RangeReader, RetryPolicy
from zohofs.transport import Transport
from zohofs.zoho import MAX_LISTING, list_backup, parse_link, parse_listing

HOSTILE = settings(max_examples=300, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])
header_text = st.one_of(st.text(max_size=60), st.from_regex(r"bytes \d{1,25}-\d{1,25}/\d{1,25}"),
                        st.from_regex(r"bytes \*/\d{1,5}"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)


@HOSTILE
@given(value=st.one_of(st.none(), header_text))
def test_content_range_parser(value: str | None) -> None:
    parsed = parse_content_range(value)
    if parsed is not None:
        first, last, total = parsed
        assert 0 <= first <= last and (total is None or last < total)
        assert value is not None and value.isascii()


@HOSTILE
@given(value=st.one_of(st.none(), st.text(max_size=40),
                       st.from_regex(r"[0-9\u0660-\u0669\u00b2]{1,8}", fullmatch=True),
                       st.datetimes().map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT"))))
def test_retry_after_length_and_date_parsers(value: str | None) -> None:
    delay = parse_retry_after(value)
    assert delay is None or (delay >= 0 and math.isfinite(delay))
    length = parse_length(value)
    assert length is None or (value is not None and value.strip().isascii() and length >= 0)
    parse_http_date(value)


@HOSTILE
@given(url=st.one_of(
    st.text(max_size=120),
    st.builds(lambda host, zgid, job, name, tail: f"https://{host}/v2/crm/{zgid}/backup/{job}/"
              f"{name}{tail}",
              st.sampled_from(["download-accl.zoho.com", "[::1", "h:99999", "x@y", ""]),
              st.from_regex(r"[0-9]{1,4}", fullmatch=True) | st.text(max_size=5),
              st.from_regex(r"[0-9]{1,4}", fullmatch=True),
              st.sampled_from(["Data_001.zip", "..", "Data_001.zip%0A", "a%2Fb_001.zip",
                               "Data_001.zip%00", "D\u00e4ta_001.zip"]),
              st.sampled_from(["", "?token=x", "#frag", "/", "\n"]))))
def test_link_and_host_checks(url: str) -> None:
    policy = HostPolicy(frozenset({"127.0.0.1"}))
    try:
        f = parse_link(url)
    except ConfigError:
        pass
    else:
        assert f.name.isascii() and f.name.endswith(".zip") and "/" not in f.name
        assert "\n" not in f.name and "\0" not in f.name and not f.name.startswith(".")
    for check in (policy.check_link, policy.may_send_token):
        with contextlib.suppress(ConfigError):
            check(url)


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_link("https://download-accl.zoho.com/v2/crm/1/backup/2/Data_001.zip%0A")
    with pytest.raises(ConfigError):
        parse_link("https://download-accl.zoho.com/v2/crm/1/backup/2\n/Data_001.zip")


@HOSTILE
@given(body=json_values)
def test_listing_parser_with_any_json(body: object) -> None:
    policy = HostPolicy(frozenset({"127.0.0.1"}))
    for content in (json.dumps(body).encode(), json.dumps({"urls": body}).encode()):
        try:
            files = parse_listing(content, policy)
        except DiscoveryError:
            continue
        assert all(f.url.startswith(("https://", "http://127.0.0.1")) for f in files)


def test_listing_parser_with_absurd_answers() -> None:
    policy = HostPolicy()
    for content in (b"[" * 200_000, b'{"urls":' * 100_000, b"\xff\xfe", b"",
                    b" " * (MAX_LISTING + 1)):
        with pytest.raises(DiscoveryError):
            parse_listing(content, policy)


def test_refused_links_are_logged_without_their_query(caplog: pytest.LogCaptureFixture) -> None:
    link = "https://files.example.net/v2/crm/1/backup/2/Data_001.zip?auth=SECRET123"
    with caplog.at_level(logging.WARNING):
        assert parse_listing(json.dumps({"urls": {"data_links": [link]}}).encode(),
                             HostPolicy()) == []
    assert "refusing" in caplog.text and "SECRET123" not in caplog.text


@HOSTILE
@given(body=st.dictionaries(st.sampled_from(["error", "error_description", "status",
                                             "expires_in", "expires_in_sec"]),
                            json_values, max_size=5))
def test_token_answer_helpers(body: dict[str, object]) -> None:
    assert isinstance(describe_token_error(body, "accounts.example"), SignInError)
    lifetime = token_lifetime(body)
    assert lifetime > 0


_KEYS = [*sorted(config.SETTINGS), "client_id", "refresh_token", "unknown_key"]


@HOSTILE
@given(entries=st.dictionaries(
    st.sampled_from(_KEYS),
    st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.text(max_size=20),
              st.floats(allow_nan=True), st.lists(st.text(max_size=8), max_size=3)),
    max_size=6), junk=st.sampled_from(["", "\ufeff", "[[account]]\nname = 1\n", "= ="]))
def test_any_config_file_gives_a_config_or_a_clear_error(
        tmp_path: Path, entries: dict[str, object], junk: str) -> None:
    path = tmp_path / "config.toml"
    lines = []
    for key, value in entries.items():
        if isinstance(value, float) and not math.isfinite(value):
            rendered = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        else:
            rendered = json.dumps(value)
        lines.append(f"{key} = {rendered}")
    path.write_text(junk + "\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    try:
        settings_, accounts = config.build({}, {}, {}, str(path))
        cfg = config.Config.from_settings(settings_, accounts=accounts)
    except ConfigError:
        return
    for name in ("timeout", "read_timeout", "listing_interval", "retry_base_delay"):
        assert math.isfinite(getattr(cfg, name)), name


def test_a_config_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'timeout = "\xff\xfe"\n')
    with pytest.raises(ConfigError):
        config.build({}, {}, {}, str(path))


# -- hostile servers, tier 2 (the emulator in this process) --------------------------------

NAME = "Attachments_001.zip"


@pytest.fixture
def url(emulator: Emulator) -> str:
    return next(emulator.base_url + p for p in emulator.files if p.endswith(NAME))


def reader_for(emulator: Emulator) -> RangeReader:
    return RangeReader(Transport(ssl.create_default_context(), timeout=5),
                       HostPolicy(frozenset({f"127.0.0.1:{emulator.port}"})),
                       RetryPolicy(attempts=2, base_delay=0.01), request_deadline=5)


async def test_a_redirect_to_plain_http_is_refused(emulator: Emulator, url: str) -> None:
    reader = reader_for(emulator)
    info = await reader.probe(url, StaticToken(TOKEN))
    emulator.add_fault("status", status=302, reason="Found", path=NAME,
                       headers={"Location": "http://files.example.net/Data_001.zip"})
    with pytest.raises(BadAnswer, match="plain http"):
        await reader.fetch(url, 0, 100, info, StaticToken(TOKEN))


async def test_a_link_with_a_non_ascii_query_is_read(
        emulator: Emulator, backup: Backup, url: str) -> None:
    reader = reader_for(emulator)
    odd = url + "?name=D\u00e4ta&x=\u65e5"
    info = await reader.probe(odd, StaticToken(TOKEN))
    assert b"".join(await reader.fetch(odd, 10, 100, info, StaticToken(TOKEN))) == \
        backup.files[NAME][10:110]
    assert "%C3%A4" in emulator.requests[-1].path


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


async def test_an_oversized_listing_is_refused_while_reading(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount) -> None:
    tokens = OAuthTokens(client, emulator.base_url, Credentials(
        account.client_id, account.client_secret, account.refresh_token))
    for body in (b" " * (MAX_LISTING + 10), b"[" * 100_000):
        emulator.listing_override = (200, body)
        with pytest.raises(DiscoveryError):
            await list_backup(client, emulator.base_url, 8, tokens,
                              HostPolicy(frozenset({"127.0.0.1"})))


async def test_an_accounts_outage_keeps_the_valid_token_and_spends_no_budget(
        client: httpx.AsyncClient, emulator: Emulator, account: EmulatedAccount,
        mock_clock: trio.testing.MockClock) -> None:
    emulator.token_lifetime = 100
    tokens = OAuthTokens(client, emulator.base_url, Credentials(
        account.client_id, account.client_secret, account.refresh_token),
        RefreshLimits(max_refreshes=2))
    first = await tokens.token()
    emulator.add_fault("status", status=503, reason="SERVICE_UNAVAILABLE",
                       path="/oauth/v2/token", count=None)
    mock_clock.jump(95)  # due for renewal, not yet expired
    for _ in range(5):
        assert await tokens.token() == first  # Accounts is down: the old token serves
    posted = sum(p == "/oauth/v2/token" for p in emulator.arrived)
    assert posted == 2  # one refresh then a pause, not one per caller
    mock_clock.jump(10)  # the token expired; the pause too: one more try, EIO meanwhile
    with pytest.raises(ZohofsError) as info:
        await tokens.token()
    assert info.value.errno == errno.EIO
    emulator.faults.clear()
    mock_clock.jump(60)  # Accounts is back: failed attempts spent none of the budget (2)
    assert await tokens.token() != first
