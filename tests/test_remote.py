"""remote.py and fs.py against the emulator in this process, no kernel involved."""

from __future__ import annotations

import dataclasses
import os
import ssl
import stat
import types
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zohofs.tree
from tests.conftest import TOKEN
from tests.helpers import wait_for
from zohofs.auth import StaticToken
from zohofs.config import MiB
from zohofs.emulator.backup import Backup
from zohofs.emulator.server import Emulator
from zohofs.errors import (
    AccessDenied,
    BadAnswer,
    RemoteChanged,
    ServerError,
    TransportError,
)
from zohofs.fs import GOOD_TIMEOUT, ZohoFS
from zohofs.hosts import HostPolicy
from zohofs.planner import CHUNK
from zohofs.remote import RangeReader, RetryPolicy
from zohofs.transport import Transport
from zohofs.tree import ROOT_INODE
from zohofs.zoho import parse_link

NAME = "Attachments_001.zip"


TOKENS = StaticToken(TOKEN)


def reader_for(emulator: Emulator, ctx: ssl.SSLContext | None = None,
               attempts: int = 3) -> RangeReader:
    transport = Transport(ctx or ssl.create_default_context(), timeout=10)
    return RangeReader(transport, HostPolicy(frozenset({f"127.0.0.1:{emulator.port}"})),
                       RetryPolicy(attempts=attempts, base_delay=0.01))


def fs_for(emulator: Emulator, url: str, ahead: int, attempts: int = 3,
           expand: bool = False) -> ZohoFS:
    fs = ZohoFS(reader_for(emulator, attempts=attempts), {"": TOKENS}, cache_size=64 * MiB,
                max_request=MiB, max_ahead=ahead, expand=expand)
    fs.add_files([parse_link(url)])
    return fs


@pytest.fixture
def url(emulator: Emulator) -> str:
    return next(emulator.base_url + p for p in emulator.files if p.endswith(NAME))


async def test_probe_and_fetch(emulator: Emulator, backup: Backup, url: str) -> None:
    reader = reader_for(emulator)
    info = await reader.probe(url, TOKENS)
    data = backup.files[NAME]
    assert info.size == len(data) and info.ranges and info.etag
    assert b"".join(await reader.fetch(url, 1000, 5000, info, TOKENS)) == data[1000:6000]
    assert b"".join(await reader.fetch(url, len(data) - 7, 7, info, TOKENS)) == data[-7:]
    ranges = [r.headers["Range"] for r in emulator.gets(NAME)]
    assert ranges == ["bytes=0-0", "bytes=1000-5999", f"bytes={len(data) - 7}-{len(data) - 1}"]
    sent = emulator.gets(NAME)[-1].headers
    assert sent["Authorization"] == f"Zoho-oauthtoken {TOKEN}"
    assert sent["Accept-Encoding"] == "identity" and sent["If-Match"] == info.etag


async def test_the_kernel_may_keep_what_an_archive_index_says(emulator: Emulator,
                                                              url: str) -> None:
    """Folders and members of an expanded archive are known from its index: their
    attributes and names are given with the full timeout, not 0 (which made every stat
    of a member a round trip to the mount)."""
    fs = fs_for(emulator, url, ahead=MiB, expand=True)
    file = parse_link(url)
    ino = ROOT_INODE
    for name in [*file.path.split("/")[:-1], NAME[:-4]]:
        ino = (await fs.lookup(ino, name)).ino
    seen = 0
    folders = [ino]
    while folders:
        folder = folders.pop()
        await fs.opendir(folder)
        for name, attr, _ in list(fs.readdir(folder, 0)):
            assert attr.timeout == GOOD_TIMEOUT, name
            assert (await fs.lookup(folder, name)).timeout == GOOD_TIMEOUT, name
            seen += 1
            if stat.S_ISDIR(attr.mode):
                folders.append(attr.ino)
    assert seen > 2


async def test_a_path_that_comes_back_keeps_its_inode_among_collisions(
        emulator: Emulator, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    class SameHash:  # every path hashes alike: each new one takes the next free number
        def __init__(self, data: bytes, digest_size: int) -> None:
            pass

        def digest(self) -> bytes:
            return (12345).to_bytes(8, "big")

    monkeypatch.setattr(zohofs.tree, "hashlib", types.SimpleNamespace(blake2b=SameHash))
    fs = fs_for(emulator, url, ahead=MiB)
    base = parse_link(url)
    a, b, c = (dataclasses.replace(base, name=n) for n in ("A.zip", "B.zip", "C.zip"))

    async def inodes() -> dict[str, int]:
        job = ROOT_INODE
        for name in (base.zgid, base.job_id):
            job = (await fs.lookup(job, name)).ino
        return {name: ino for name, _, ino in fs.readdir(job, 0)}

    await fs.set_files([a, b, c])
    first = await inodes()
    assert len(set(first.values())) == 3
    await fs.set_files([a, c])
    assert await inodes() == {k: v for k, v in first.items() if k != "B.zip"}
    await fs.set_files([c, b, a])
    assert await inodes() == first


async def test_pieces_are_the_range_cut_at_the_piece_size(
        emulator: Emulator, backup: Backup, url: str) -> None:
    reader = reader_for(emulator)
    info = await reader.probe(url, TOKENS)
    pieces = await reader.fetch(url, 100, 3 * CHUNK + 5, info, TOKENS, piece=CHUNK)
    assert [len(p) for p in pieces] == [CHUNK, CHUNK, CHUNK, 5]
    assert b"".join(pieces) == backup.files[NAME][100:100 + 3 * CHUNK + 5]


async def test_the_emulator_shapes_answers_like_the_internet(
        emulator: Emulator, url: str) -> None:
    # Lower bounds only: a busy machine can make the emulator slower, never faster.
    reader = reader_for(emulator)
    info = await reader.probe(url, TOKENS)
    emulator.latency, emulator.rate = 0.2, 2_000_000
    start = trio.current_time()
    await reader.fetch(url, 0, 1_000_000, info, TOKENS)
    assert trio.current_time() - start >= 0.2 + 0.5 * 0.95
    # The emulator counts a write once it returns: the client may have the bytes first.
    wait_for(lambda: emulator.body_bytes >= 1_000_000, 10, "the emulator's count")


async def test_transient_errors_are_retried_with_retry_after(
        emulator: Emulator, backup: Backup, url: str) -> None:
    reader = reader_for(emulator, attempts=4)
    info = await reader.probe(url, TOKENS)
    emulator.add_fault("status", status=429, reason="TOO_MANY", headers={"Retry-After": "0"})
    emulator.add_fault("reset", path=NAME)
    emulator.add_fault("status", status=502, reason="BAD_GATEWAY")
    assert b"".join(await reader.fetch(url, 0, MiB, info, TOKENS)) == backup.files[NAME][:MiB]
    assert len(emulator.arrived) == 5  # probe, three faults, success


async def test_retries_are_bounded(emulator: Emulator, url: str) -> None:
    reader = reader_for(emulator, attempts=3)
    info = await reader.probe(url, TOKENS)
    emulator.add_fault("status", status=500, count=None)
    with pytest.raises(ServerError):
        await reader.fetch(url, 0, 10, info, TOKENS)
    assert len(emulator.arrived) == 1 + 3


@pytest.mark.parametrize(("kind", "error"), [("wrong_range", BadAnswer),
                                             ("ignore_range", BadAnswer)])
async def test_untrustworthy_answers_fail_without_retry(
        emulator: Emulator, url: str, kind: str, error: type[Exception]) -> None:
    reader = reader_for(emulator)
    info = await reader.probe(url, TOKENS)
    emulator.add_fault(kind, count=None)
    with pytest.raises(error):
        await reader.fetch(url, MiB, 4096, info, TOKENS)
    assert len(emulator.arrived) == 2


async def test_a_server_ignoring_range_is_detected_at_probe(
        emulator: Emulator, backup: Backup, url: str) -> None:
    emulator.add_fault("ignore_range")
    info = await reader_for(emulator).probe(url, TOKENS)
    assert not info.ranges and info.size == len(backup.files[NAME])


async def test_a_replaced_file_is_stale(emulator: Emulator, url: str) -> None:
    reader = reader_for(emulator)
    info = await reader.probe(url, TOKENS)
    emulator.replace(url, b"new content")
    with pytest.raises(RemoteChanged):
        await reader.fetch(url, 0, 4, info, TOKENS)


async def test_a_bad_token_is_access_denied(emulator: Emulator, url: str) -> None:
    emulator.tokens = {"another"}
    with pytest.raises(AccessDenied, match="INVALID_OAUTHSCOPE"):
        await reader_for(emulator).probe(url, TOKENS)


@pytest.fixture
def tls_emulator(backup: Backup, tmp_path: object) -> Iterator[Emulator]:
    with Emulator(tls=True, tokens={TOKEN}, ca_path=f"{tmp_path}/ca.pem") as emu:
        emu.add_backup(backup)
        yield emu


def test_an_emulator_leaves_no_ca_file_behind() -> None:
    # Each makes a file of its own (two at once in one process never share one), and
    # takes it away at the end: a day of test runs left a hundred in /tmp.
    with Emulator(tls=True) as first, Emulator(tls=True) as second:
        made = [first.ca_path, second.ca_path]
        assert made[0] != made[1] and all(p and os.path.exists(p) for p in made)
    assert not any(p and os.path.exists(p) for p in made)


async def test_tls_is_verified(tls_emulator: Emulator, backup: Backup) -> None:
    url = next(tls_emulator.base_url + p for p in tls_emulator.files if p.endswith(NAME))
    assert url.startswith("https://")
    trusted = ssl.create_default_context(cafile=tls_emulator.ca_path)
    info = await reader_for(tls_emulator, trusted).probe(url, TOKENS)
    assert info.size == len(backup.files[NAME])
    with pytest.raises(TransportError, match="not trusted") as exc:
        await reader_for(tls_emulator).probe(url, TOKENS)
    assert not exc.value.transient
    assert len(tls_emulator.requests) == 1  # the untrusted server never saw a request


async def test_concurrent_reads_of_a_block_cost_one_get(
        emulator: Emulator, backup: Backup, url: str) -> None:
    fs = fs_for(emulator, url, ahead=0)
    await fs.probe_all()
    node = fs.files[0]
    handles = [(await fs.open(node.ino, 0))[0] for _ in range(8)]
    results: list[bytes] = []

    async def read(fh: int) -> None:
        results.append(b"".join(await fs.read(fh, MiB + 10, 2 * MiB)))

    async with trio.open_nursery() as nursery:
        for fh in handles:
            nursery.start_soon(read, fh)
    data = backup.files[NAME]
    assert results == [data[MiB + 10:3 * MiB + 10]] * 8
    # One GET per request-sized run of the chunks the read touches, whatever the readers.
    ranges = [r.headers["Range"] for r in emulator.gets(NAME)][1:]
    assert sorted(ranges) == [f"bytes={MiB}-{2 * MiB - 1}", f"bytes={2 * MiB}-{3 * MiB - 1}",
                              f"bytes={3 * MiB}-{3 * MiB + CHUNK - 1}"]


async def test_sequential_reads_prefetch_ahead(
        emulator: Emulator, backup: Backup, url: str) -> None:
    fs = fs_for(emulator, url, ahead=2 * MiB)
    await fs.probe_all()
    fh, _ = await fs.open(fs.files[0].ino, 0)
    async with trio.open_nursery() as nursery:
        fs.start(nursery)
        assert b"".join(await fs.read(fh, 0, 4096)) == backup.files[NAME][:4096]
    # The nursery waited for the prefetch: the chunks after the first were fetched
    # although nobody read them.
    assert any(r.headers["Range"].startswith(f"bytes={CHUNK}-") for r in emulator.gets(NAME))


async def test_a_failed_probe_is_retried_on_access(emulator: Emulator, url: str) -> None:
    fs = fs_for(emulator, url, ahead=0, attempts=1)
    fault = emulator.add_fault("status", status=503, count=None)
    await fs.probe_all()
    node = fs.files[0]
    assert next(fs.readdir(node.parent, 0))[0] == NAME  # still listed
    with pytest.raises(ServerError):
        await fs.getattr(node.ino)
    emulator.faults.remove(fault)
    with trio.fail_after(10):  # the failure is remembered for a moment, then probed again
        while True:
            try:
                assert (await fs.getattr(node.ino)).size > 0
                break
            except ServerError:
                await trio.sleep(0.05)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reads=st.lists(st.tuples(st.integers(0, 5 * MiB), st.integers(0, 3 * MiB)),
                      min_size=1, max_size=8))
async def test_any_read_returns_the_servers_bytes(
        emulator: Emulator, backup: Backup, url: str, reads: list[tuple[int, int]]) -> None:
    # A small cache, so that reads also meet evicted blocks and blocks fetched ahead.
    fs = ZohoFS(reader_for(emulator), {"": TOKENS}, cache_size=3 * MiB, max_request=MiB,
                max_ahead=2 * MiB)
    fs.add_files([parse_link(url)])
    data = backup.files[NAME]
    async with trio.open_nursery() as nursery:
        fs.start(nursery)
        fh, _ = await fs.open(fs.files[0].ino, os.O_RDONLY)
        for offset, size in reads:
            assert b"".join(await fs.read(fh, offset, size)) == data[offset:offset + size]
