"""--cache-dir on real mounts: what was fetched once is read from disk by later mounts;
a damaged or half-written chunk is fetched again, never served; the directory stays
within its size, private, and one mount's."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import random
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MiB, MountFactory, run_zohofs
from tests.helpers import Mount, data_gets, sha256, started_mounts_add, wait_for
from zohofs import chunkfiles
from zohofs.buffers import BufferPool
from zohofs.diskcache import LAYOUT, OLD_LAYOUTS, DiskCache
from zohofs.emulator.backup import Backup, generate
from zohofs.emulator.server import Emulator
from zohofs.planner import CHUNK

JOB = "757345985/4876876000001594004"
NAME = "Attachments_001.zip"


def chunk_files(cache: Path) -> list[Path]:
    """The files of chunks now, one per version of a file (with its index beside it)."""
    return sorted((cache / LAYOUT).glob("*.chunks"))


def cached_bytes(cache: Path) -> int:
    """What the cache takes on disk now, while the mount may be writing and evicting: the
    blocks of the chunk files (holes take none), and their indexes."""
    total = 0
    for path in [*chunk_files(cache), *(cache / LAYOUT).glob("*.index")]:
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
            total += path.stat().st_blocks * 512
    return total


def copy_through(m: Mount, name: str = NAME) -> bytes:
    return (m.path / JOB / name).read_bytes()


def written(cache: Path, size: int) -> bool:
    """The writer thread has put ``size`` bytes of chunks on disk (it writes behind)."""
    return cached_bytes(cache) >= size


def test_a_remount_reads_from_disk_and_fetches_nothing(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = backup.files[NAME]
    first = mount("--cache-dir", str(cache), name="first")
    assert sha256(copy_through(first)) == sha256(data)
    wait_for(lambda: written(cache, len(data)), 20, "the chunks on disk")
    assert first.stop() == 0
    assert stat.S_IMODE((cache / LAYOUT).stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # made by zohofs: private
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600
               for p in (cache / LAYOUT).iterdir())
    before = len(data_gets(emulator, NAME))
    second = mount("--cache-dir", str(cache), name="second")
    assert sha256(copy_through(second)) == sha256(data)
    assert len(data_gets(emulator, NAME)) == before  # every byte from disk
    status = os.getxattr(second.path, "user.zohofs.status").decode()
    assert '"disk_cache_hits": ' in status and '"disk_cache_hits": 0' not in status


def test_a_copy_faster_than_the_disk_is_kept_whole(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    """128 MiB read at loopback speed, four times what may wait to be written: before,
    what did not fit was skipped, and a remount fetched it again."""
    cache, name = tmp_path / "cache", "Attachments_009.zip"
    data = random.Random(128).randbytes(128 * MiB)
    emulator.add_file(backup.zgid, backup.job_id, name, data)
    first = mount("--cache-dir", str(cache), name="first")
    assert sha256(copy_through(first, name)) == sha256(data)
    wait_for(lambda: written(cache, len(data)), 30, "all 128 MiB on disk")
    assert first.stop() == 0
    before = len(data_gets(emulator, name))
    second = mount("--cache-dir", str(cache), name="second")
    assert sha256(copy_through(second, name)) == sha256(data)
    assert len(data_gets(emulator, name)) == before


@pytest.fixture
def filled(mount: MountFactory, backup: Backup, tmp_path: Path) -> Iterator[Path]:
    cache = tmp_path / "cache"
    m = mount("--cache-dir", str(cache), name="filler")
    copy_through(m)
    wait_for(lambda: written(cache, len(backup.files[NAME])), 20, "the chunks on disk")
    assert m.stop() == 0
    yield cache


def test_damaged_and_half_written_chunks_are_fetched_again(
        filled: Path, mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    [chunks] = chunk_files(filled)
    with open(chunks, "r+b") as f:
        f.seek(3 * CHUNK + 100)
        flipped = f.read(1)[0] ^ 0x01  # a bit flip on the disk
        f.seek(3 * CHUNK + 100)
        f.write(bytes([flipped]))
        f.seek(5 * CHUNK + 1000)
        f.write(bytes(CHUNK - 1000))  # a crash mid-write: a record without all its bytes
    # A killed mount's chunks whose index was never written: nothing says what they are.
    leftover = chunks.with_name("0123456789abcdef-0123456789abcdef.chunks")
    leftover.write_bytes(b"half a chunk")
    before = len(data_gets(emulator, NAME))
    m = mount("--cache-dir", str(filled), name="again")
    m.expect_log("disk cache: dropping the damaged chunk")
    assert sha256(copy_through(m)) == sha256(backup.files[NAME])
    assert len(data_gets(emulator, NAME)) > before  # the damaged ones came from the server
    assert not leftover.exists()
    wait_for(lambda: written(filled, len(backup.files[NAME])), 20, "the chunks rewritten")
    assert m.stop() == 0
    # Sound again: a third mount reads every byte from disk.
    before = len(data_gets(emulator, NAME))
    third = mount("--cache-dir", str(filled), name="third")
    assert sha256(copy_through(third)) == sha256(backup.files[NAME])
    assert len(data_gets(emulator, NAME)) == before


def test_the_directory_stays_within_its_size(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    files = {**backup.files, "Attachments_009.zip": random.Random(9).randbytes(24 * MiB)}
    emulator.add_file(backup.zgid, backup.job_id, "Attachments_009.zip",
                      files["Attachments_009.zip"])
    m = mount("--cache-dir", str(cache), "--cache-dir-size", "16", name="small")
    for name, data in files.items():
        assert copy_through(m, name) == data
        assert cached_bytes(cache) <= 16 * MiB
    assert sum(map(len, files.values())) > 2 * 16 * MiB
    wait_for(lambda: cached_bytes(cache) > 12 * MiB, 20, "the cache to fill")
    assert cached_bytes(cache) <= 16 * MiB


def test_a_second_mount_of_one_directory_is_refused(
        mount: MountFactory, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mount("--cache-dir", str(cache), name="one")
    (tmp_path / "two").mkdir()
    started_mounts_add(tmp_path / "two")  # should it mount, the suite's end unmounts it
    (tmp_path / "token").write_text("t")
    (tmp_path / "token").chmod(0o600)
    refused = run_zohofs("mount", str(tmp_path / "two"), "--cache-dir", str(cache),
                         "--link", "https://download-accl.zoho.com/v2/crm/1/backup/2/Data_001.zip",
                         "--access-token-file", str(tmp_path / "token"))
    assert refused.returncode == 2
    assert "is in use by another zohofs mount" in refused.stderr
    cleared = run_zohofs("cache", "clear", "--cache-dir", str(cache))
    assert cleared.returncode == 2 and "in use by a zohofs mount: unmount it first" in (
        cleared.stderr)


def test_cache_clear_empties_the_directory(filled: Path) -> None:
    assert chunk_files(filled)
    cleared = run_zohofs("cache", "clear", "--cache-dir", str(filled))
    assert cleared.returncode == 0, cleared.stderr
    assert "MiB)" in cleared.stdout and "INFO" not in cleared.stderr
    assert not chunk_files(filled)
    again = run_zohofs("cache", "clear", "--cache-dir", str(filled))
    assert again.returncode == 0 and "nothing to clear" in again.stdout
    mistyped = run_zohofs("cache", "clear", "--cache-dir", str(filled) + "-typo")
    assert mistyped.returncode == 2 and "is not a directory" in mistyped.stderr


def test_a_new_version_on_the_server_never_meets_the_old_chunks(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    m = mount("--cache-dir", str(cache), name="old")
    copy_through(m)
    wait_for(lambda: written(cache, len(backup.files[NAME])), 20, "the chunks on disk")
    assert m.stop() == 0
    new = bytes(reversed(backup.files[NAME]))
    emulator.replace(next(p for p in emulator.files if p.endswith(NAME)), new)
    again = mount("--cache-dir", str(cache), name="new")
    assert sha256(copy_through(again)) == sha256(new)
    # The old version's chunks are retired once the new one is opened.
    wait_for(lambda: len(chunk_files(cache)) == 1, 20, "the old chunks gone")


def test_writing_stops_before_the_disk_is_full(
        mount: MountFactory, backup: Backup, tmp_path: Path) -> None:
    """A filesystem of 8 MiB for a cache allowed 1 GiB: zohofs stops at the margin."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(small)],
                   check=True)
    try:
        m = mount("--cache-dir", str(small / "cache"), "--cache-dir-size", "1G", name="full")
        m.expect_log("disk cache: less than 0.4 MiB free under")
        m.expect_log(r"cache_dir_size \(1024 MiB\) is more than the filesystem under .* "
                     r"holds \(8 MiB\)")
        assert "is more than the filesystem under" in m.log  # said at the start
        for name, data in backup.files.items():
            assert copy_through(m, name) == data  # reads go on, from the server
        wait_for(lambda: "less than 0.4 MiB free" in m.log, 20, "the warning")
        usage = os.statvfs(small)
        assert usage.f_bavail * usage.f_frsize > 0
        assert m.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_an_expanded_folder_is_listed_from_disk_after_a_restart(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = JOB + "/Data_001/Data"
    first = mount("--expand", "--cache-dir", str(cache), name="first")
    listed = sorted(os.listdir(first.path / folder))
    assert "Leads_001.csv" in listed
    wait_for(lambda: bool(chunk_files(cache)), 20, "the index's chunks on disk")
    assert first.stop() == 0
    before = len(data_gets(emulator, "Data_001.zip"))
    again = mount("--expand", "--cache-dir", str(cache), name="again")
    assert sorted(os.listdir(again.path / folder)) == listed
    assert len(data_gets(emulator, "Data_001.zip")) == before  # the central directory too


def test_an_older_layout_is_removed_unless_a_mount_uses_it(tmp_path: Path) -> None:
    # Chunks of the first layout (SHA-256 headers) would otherwise stay, outside the size.
    old = tmp_path / OLD_LAYOUTS[0]
    (old / "v").mkdir(parents=True)
    (old / "v" / "0").write_bytes(b"x" * 1000)
    lock = os.open(old / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an older zohofs mounted with it
        cache = DiskCache(tmp_path, 1 << 20)
        cache.open()
        cache.close()
        assert (old / "v" / "0").exists()
    finally:
        os.close(lock)
    cache = DiskCache(tmp_path, 1 << 20)
    cache.open()
    cache.close()
    assert not old.exists() and (tmp_path / LAYOUT).is_dir()


def test_a_mount_killed_mid_copy_leaves_only_sound_chunks(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    # kill -9 while chunks are being written: a record may be on disk without all its
    # bytes. The next mount reads every byte right, from disk where sound.
    cache, name = tmp_path / "cache", "Attachments_009.zip"
    data = random.Random(99).randbytes(64 * MiB)
    emulator.add_file(backup.zgid, backup.job_id, name, data)
    first = mount("--cache-dir", str(cache), name="killed")
    emulator.rate = 5_000_000  # a connection: the copy takes seconds, the kill lands in it
    copy = subprocess.Popen(["cat", str(first.path / JOB / name)], stdout=subprocess.DEVNULL)
    wait_for(lambda: cached_bytes(cache) > 8 * MiB, 30, "chunks being written")
    first.kill()  # SIGKILL, then the dead mount point unmounted
    copy.wait(30)
    emulator.rate = None
    fetched = len(data_gets(emulator, name))
    again = mount("--cache-dir", str(cache), name="again")
    again.expect_log("disk cache: dropping the damaged chunks")  # if the kill cut one
    assert sha256(copy_through(again, name)) == sha256(data)
    assert len(data_gets(emulator, name)) > fetched  # what the first never had
    wait_for(lambda: written(cache, len(data)), 30, "all of it on disk")
    assert again.stop() == 0
    third = mount("--cache-dir", str(cache), name="third")
    fetched = len(data_gets(emulator, name))
    assert sha256(copy_through(third, name)) == sha256(data)
    assert len(data_gets(emulator, name)) == fetched


def loaded(cache: DiskCache, version: str, first: int, count: int) -> list[bytes] | None:
    pieces = cache.load(version, first, [CHUNK] * count)
    return None if pieces is None else [bytes(p) for p in pieces]


@pytest.mark.parametrize("punch", [True, False])
def test_evicted_chunks_give_their_room_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, punch: bool) -> None:
    # Where the filesystem cannot punch holes, the least recently used version goes
    # whole; either way the files take no more than the size, and what stays is sound.
    if not punch:
        monkeypatch.setattr(chunkfiles.Files, "punch", lambda self, start, stop: errno.EOPNOTSUPP)
    cache = DiskCache(tmp_path, capacity=12 * CHUNK + 256)
    cache.open()
    rng = random.Random(3)
    chunks = {v: [rng.randbytes(CHUNK) for _ in range(8)] for v in ("a-1", "b-1")}
    try:
        for version, pieces in chunks.items():
            cache.store(version, 0, pieces[:4])
            cache.store(version, 4, pieces[4:])
        on_disk = sum(p.stat().st_blocks * 512 for p in (tmp_path / LAYOUT).glob("*.chunks"))
        assert cache.size <= cache.capacity and on_disk <= cache.capacity
        assert loaded(cache, "b-1", 4, 4) == chunks["b-1"][4:]
        assert cache.load("a-1", 0, [CHUNK]) is None  # the oldest went first
        if not punch:
            assert not (tmp_path / LAYOUT / "a-1.chunks").exists()
    finally:
        cache.close()
    reopened = DiskCache(tmp_path, capacity=12 * CHUNK + 256)
    reopened.open()  # what the index says, in the order it was used
    try:
        assert reopened.size == cache.size
        assert loaded(reopened, "b-1", 4, 4) == chunks["b-1"][4:]
    finally:
        reopened.close()


def test_a_backup_no_longer_listed_leaves_the_disk(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    # Zoho keeps one backup: once a newer one replaced it, the old one's chunks are of no
    # use, but not while a file of it is still open (it reads on while its link lasts).
    cache = tmp_path / "cache"
    m = oauth_mount("--cache-dir", str(cache), "--listing-interval", "0.5")
    assert copy_through(m) == backup.files[NAME]
    wait_for(lambda: written(cache, len(backup.files[NAME])), 20, "the chunks on disk")
    [old] = chunk_files(cache)

    def listings() -> int:
        return sum(p.endswith("/backup/urls") for p in emulator.arrived)

    with open(m.path / JOB / NAME, "rb") as still_open:
        emulator.add_backup(generate(seed=9, size=2 * MiB, job_id="4876876000001777001"))
        wait_for(lambda: "4876876000001777001" in os.listdir(m.path / JOB.split("/")[0]),
                 20, "the new backup listed")
        seen = listings()
        wait_for(lambda: listings() >= seen + 2, 20, "two more listings")
        assert old.exists()  # open: kept
        assert still_open.read() == backup.files[NAME]
    wait_for(lambda: not old.exists(), 20, "the old backup's chunks gone")
    assert not old.with_suffix(".index").exists()
    wait_for(lambda: "removed the chunks of 1 replaced backup files" in m.log, 10,
             "the log line")  # written once the files are gone
    assert m.stop() == 0  # before the emulator goes: it lists twice a second


def test_whole_chunks_are_written_past_the_page_cache(tmp_path: Path) -> None:
    # With O_DIRECT from and into the pool's page-aligned buffers: a cold copy that keeps
    # a gigabyte neither copies it into the page cache nor pushes a gigabyte of other
    # programs' cached files out, nor does reading it back. A short last chunk and a
    # caller's unaligned bytes may take the page cache's way; all of them read back right.
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                          text=True, check=True).stdout.strip()
    if kind == "tmpfs":  # accepts O_DIRECT, and keeps everything in the page cache anyway
        pytest.skip("the test's directory is on tmpfs")
    pool = BufferPool(CHUNK, limit=4)
    rng = random.Random(5)
    pieces = []
    for _ in range(3):
        buffer = pool.take()
        buffer[:] = rng.randbytes(CHUNK)
        pieces.append(memoryview(buffer).toreadonly())
    short, unaligned = rng.randbytes(CHUNK // 3), rng.randbytes(CHUNK)
    cache = DiskCache(tmp_path, capacity=64 * CHUNK)
    cache.open()
    try:
        cache.store("a-1", 0, [*pieces, short])
        files = chunkfiles.Files.open(tmp_path / LAYOUT, "a-1", create=False)
        assert files is not None
        direct = files.direct
        files.close()
        if direct is None:
            pytest.skip(f"no direct I/O on this {kind} filesystem")
        cache.store("b-1", 0, [unaligned])
        uncached(tmp_path / LAYOUT / "a-1.chunks", 3)
        back = cache.load("a-1", 0, [CHUNK] * 3 + [len(short)], lambda n: pool.take())
        assert back is not None and [bytes(p) for p in back] == [*map(bytes, pieces), short]
        uncached(tmp_path / LAYOUT / "a-1.chunks", 3)
        assert loaded(cache, "b-1", 0, 1) == [unaligned]
    finally:
        cache.close()


def uncached(path: Path, chunks: int) -> None:
    """None of the first ``chunks`` chunks of the file is in the page cache (mincore(2)
    of a map of it: a probe that reads nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    length = chunks * CHUNK
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        pages = ctypes.create_string_buffer(length // mmap.PAGESIZE)
        try:
            assert libc.mincore(address, length, pages) == 0, ctypes.get_errno()
        finally:
            libc.munmap(address, length)
    finally:
        os.close(fd)
    resident = sum(byte & 1 for byte in pages.raw)
    assert resident == 0, f"{resident} pages of {path.name} in the page cache"


def test_a_filesystem_refusing_direct_io_gets_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Some network and FUSE filesystems open with O_DIRECT, then refuse the I/O with
    # EOPNOTSUPP: the chunks are kept all the same, through the page cache, said once.
    files = chunkfiles.Files.open(tmp_path, "a-1", create=True)
    assert files is not None
    refusing = files.direct = os.open(tmp_path / "a-1.chunks", os.O_RDWR)  # stands in

    def refuse(call: Callable[..., int]) -> Callable[..., int]:
        def wrapped(fd: int, *args: object) -> int:
            if fd == refusing:
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            return call(fd, *args)
        return wrapped

    monkeypatch.setattr(os, "pwritev", refuse(os.pwritev))
    monkeypatch.setattr(os, "preadv", refuse(os.preadv))
    pool = BufferPool(CHUNK, limit=2)
    data = random.Random(7).randbytes(2 * CHUNK)
    pieces = []
    for n in range(2):
        buffer = pool.take()
        buffer[:] = data[n * CHUNK:(n + 1) * CHUNK]
        pieces.append(memoryview(buffer).toreadonly())
    try:
        files.write(0, pieces)
        assert files.refused == errno.EOPNOTSUPP
        back = [memoryview(pool.take()) for _ in range(2)]
        assert files.read(0, back) == 2 * CHUNK and b"".join(back) == data
    finally:
        files.close()


def test_a_size_beyond_the_filesystem_is_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = DiskCache(tmp_path, capacity=1 << 60)
    cache.open()
    cache.close()
    assert "is more than the filesystem under" in caplog.text
    caplog.clear()
    cache = DiskCache(tmp_path, capacity=1 << 20)
    cache.open()
    cache.close()
    assert "more than the filesystem" not in caplog.text
