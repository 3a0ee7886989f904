"""Pure units: the errno table, parsers, link and host rules, the zip generator."""

from __future__ import annotations

import errno
import gc
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from zohofs.answers import parse_content_range, parse_retry_after
from zohofs.auth import token_lifetime
from zohofs.config import MiB, parse_size
from zohofs.emulator.backup import generate
from zohofs.errors import (
    AccessDenied,
    BadAnswer,
    ConfigError,
    RemoteChanged,
    RemoteNotFound,
    ServerError,
    Throttled,
    TransportError,
    error_for_status,
    is_transient,
)
from zohofs.hosts import HostPolicy
from zohofs.memory import Collector
from zohofs.operations import handler
from zohofs.tree import Node, stable_inode
from zohofs.zoho import parse_link, read_links_file

LINK = "https://download-accl.zoho.com/v2/crm/757345985/backup/4876876000001594004/Data_001.zip"


@pytest.mark.parametrize(("status", "cls", "code", "transient"), [
    (401, AccessDenied, errno.EACCES, False),
    (403, AccessDenied, errno.EACCES, False),
    (404, RemoteNotFound, errno.ENOENT, False),
    (429, Throttled, errno.EBUSY, True),
    (500, ServerError, errno.EIO, True),
    (503, ServerError, errno.EIO, True),
    (501, ServerError, errno.EIO, False),
    (408, TransportError, errno.EIO, True),
    (302, BadAnswer, errno.EIO, False),
])
def test_errno_table(status: int, cls: type, code: int, transient: bool) -> None:
    err = error_for_status(status, "REASON", "https://h/x")
    assert type(err) is cls and err.errno == code and is_transient(err) is transient
    assert "REASON" in str(err)


def test_changed_files_are_stale() -> None:
    assert RemoteChanged("x").errno == errno.ESTALE


@given(st.integers(0, 2**40), st.integers(0, 2**30), st.integers(1, 2**20))
def test_content_range_round_trip(first: int, length: int, extra: int) -> None:
    last = first + length
    assert parse_content_range(f"bytes {first}-{last}/{last + extra}") == (
        first, last, last + extra)


@pytest.mark.parametrize("value", [None, "", "bytes 5-4/10", "bytes 0-10/10", "bytes */10",
                                   "items 0-1/2", "bytes 0-1/2, 3-4/5", "bytes -1-2/3"])
def test_bad_content_ranges_are_rejected(value: str | None) -> None:
    assert parse_content_range(value) is None


def test_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


def test_links_parse_into_tree_paths() -> None:
    f = parse_link(LINK)
    assert (f.zgid, f.job_id, f.name) == ("757345985", "4876876000001594004", "Data_001.zip")
    assert f.path == "757345985/4876876000001594004/Data_001.zip"


@pytest.mark.parametrize("link", [
    "https://download-accl.zoho.com/v2/crm/75a/backup/1/Data_001.zip",
    "https://download-accl.zoho.com/v2/crm/1/backup/1/..",
    "https://download-accl.zoho.com/v2/crm/1/backup/1/%2e%2e",
    "https://download-accl.zoho.com/v2/crm/1/backup/1/..%2fData_001.zip",
    "https://download-accl.zoho.com/v2/crm/1/backup/1/Data_001.zip%00",
    "https://download-accl.zoho.com/v2/crm/1/backup/1/Data.zip",
    "https://download-accl.zoho.com/v2/crm/1/backup/1/x/Data_001.zip",
    "ftp://download-accl.zoho.com/v2/crm/1/backup/1/Data_001.zip",
    "not a link",
])
def test_hostile_links_are_refused(link: str) -> None:
    with pytest.raises(ConfigError):
        parse_link(link)


def test_token_goes_only_to_zoho_and_trusted_hosts() -> None:
    policy = HostPolicy(frozenset({"127.0.0.1:8080", "mirror.example.org"}))
    assert policy.may_send_token(LINK)
    assert policy.may_send_token("https://download-accl.zoho.eu/x")
    assert policy.may_send_token("http://127.0.0.1:8080/x")
    assert not policy.may_send_token("http://127.0.0.1:8081/x")
    assert policy.may_send_token("https://mirror.example.org:9443/x")
    assert not policy.may_send_token("http://mirror.example.org/x")  # plain http off loopback
    assert not policy.may_send_token("https://download-accl.zoho.com.evil.net/x")
    with pytest.raises(ConfigError, match=r"evil\.net:443"):
        policy.check_link("https://evil.net/v2/crm/1/backup/2/Data_001.zip")


def test_token_lifetimes_old_and_new() -> None:
    assert token_lifetime({"expires_in": 3600}) == 3600
    # Older servers: seconds in expires_in_sec, milliseconds in expires_in.
    assert token_lifetime({"expires_in_sec": 3600, "expires_in": 3600000}) == 3600
    assert token_lifetime({"expires_in": 3600000}) == 3600
    assert token_lifetime({}) == 3600 and token_lifetime({"expires_in": "soon"}) == 3600


def test_sizes() -> None:
    assert parse_size("8M") == 8 * MiB
    assert parse_size("512k") == 512 * 1024
    assert parse_size("256", default_unit=MiB) == 256 * MiB
    assert parse_size("1.5G") == 3 << 29 and parse_size("2T") == 2 << 40  # disk caches
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_inodes_are_stable_and_distinct() -> None:
    a = stable_inode("1/2/Data_001.zip", [])
    assert a == stable_inode("1/2/Data_001.zip", [])
    assert a > 1 and a != stable_inode("1/2/Data_002.zip", [])
    assert stable_inode("1/2/Data_001.zip", [a]) != a  # a collision still gets its own


def test_generated_backups_are_deterministic_and_realistic() -> None:
    first = generate(seed=5, size=3 * MiB, part_size=MiB)
    assert first.files == generate(seed=5, size=3 * MiB, part_size=MiB).files
    assert first.files != generate(seed=6, size=3 * MiB, part_size=MiB).files
    parts = [n for n in first.files if n.startswith("Attachments_")]
    assert "Data_001.zip" in first.files and len(parts) >= 3
    assert all(len(first.files[n]) <= MiB for n in parts)
    with zipfile.ZipFile(io.BytesIO(first.files["Data_001.zip"])) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert "Data/Leads_001.csv" in names and "Metadata/Modules_001.csv" in names
        leads = zf.read("Data/Leads_001.csv")
        assert leads.startswith(b"\xef\xbb\xbfRecord Id,")
    with zipfile.ZipFile(io.BytesIO(first.files["Attachments_001.zip"])) as zf:
        assert all(n.startswith("Attachments/") for n in zf.namelist())


async def test_handler_turns_every_failure_into_an_errno() -> None:
    @handler
    async def broken() -> None:
        raise RuntimeError("bug")

    @handler
    async def denied() -> None:
        raise AccessDenied("no")

    for fn, code in ((broken, errno.EIO), (denied, errno.EACCES)):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fn()
        assert info.value.errno == code

    @handler
    async def slow() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(0.01) as scope:  # cancellation passes through untouched
        await slow()
    assert scope.cancelled_caught


def test_links_files_skip_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "links"
    other = LINK.replace("Data", "Attachments")
    path.write_text(f"# this week's backup\n\n{LINK}  # data\n   \n{other}\n")
    assert read_links_file(str(path)) == [LINK, other]
    with pytest.raises(ConfigError, match="cannot read links file"):
        read_links_file(str(tmp_path / "missing"))


def test_inode_allocation_does_not_copy_the_taken_set() -> None:
    # Copying every taken inode per new file made a 10 000-link listing quadratic
    # (seconds of a blocked event loop); membership checks are all it needs.
    class MembershipOnly:
        def __contains__(self, ino: object) -> bool:
            return False

        def __iter__(self) -> Iterator[int]:
            raise AssertionError("the taken inodes were copied")

    assert stable_inode("1/2/Data_001.zip", MembershipOnly()) == stable_inode(
        "1/2/Data_001.zip", set())


def test_the_mount_helpers_call_becomes_a_background_mount() -> None:
    from zohofs.cli import from_mount_helper

    line = "rw,config=/etc/zohofs/config.toml,allow_other,_netdev,x-systemd.automount"
    assert from_mount_helper(["zoho", "/zoho", "-o", line]) == [
        "mount", "/zoho", "--background", "-o", line]
    assert from_mount_helper(["zoho", "/zoho"]) == ["mount", "/zoho", "--background"]
    for ours in (["mount", "/zoho"], ["ls"], ["--version"], []):
        assert from_mount_helper(ours) is None
    with pytest.raises(ConfigError, match="SOURCE MOUNTPOINT -o OPTIONS"):
        from_mount_helper(["zoho", "/zoho", "--cache-size", "9"])


def test_an_error_told_again_is_a_new_object_with_the_same_meaning() -> None:
    from zohofs.errors import RemoteError, again

    try:
        raise RemoteError("the server said no", status=503, retry_after=3.0)
    except RemoteError as exc:
        first = exc
    twin = again(first)
    assert twin is not first and type(twin) is RemoteError and str(twin) == str(first)
    assert (twin.status, twin.retry_after, twin.errno) == (503, 3.0, first.errno)
    assert twin.__traceback__ is None and first.__traceback__ is not None


def test_a_buffer_with_a_view_on_it_is_not_handed_out_again() -> None:
    from zohofs.buffers import BufferPool

    pool = BufferPool(16, limit=4)
    buffer = pool.take()
    view = memoryview(buffer)[4:8]  # a chunk's slice still on its way somewhere
    pool.give(memoryview(buffer))
    other = pool.take()
    assert other is not buffer  # kept for later meanwhile
    del view
    assert pool.take() is buffer
    assert pool.take() not in (buffer, other)


def test_nodes_held_by_the_hundred_thousand_leave_full_collections_short() -> None:
    # A full collection follows every object not frozen, with every request of the
    # mount held meanwhile: at half a million nodes that was 0.1 to 0.25 s each.
    collector = Collector()
    held = []
    try:
        for n in range(1, 60_001):
            held.append(Node(n, str(n), 1))
            collector.held(n)
        assert gc.get_freeze_count() >= 50_000  # what the collector skips
        del held[:]
        collector.give_back()  # the kernel forgot them: nothing stays frozen
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
