from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Mount, is_mounted, wait_for, zohofs_mounts
from zohofs.emulator.backup import Backup, generate
from zohofs.emulator.server import Emulator

TOKEN = "test-token-5f1c0e"
MiB = 1 << 20


def pytest_sessionstart(session: pytest.Session) -> None:
    # Real-mount tests are the point of this suite: no FUSE means a failed run, not skips.
    if not os.path.exists("/dev/fuse"):
        pytest.exit("/dev/fuse is missing: the real-mount tests cannot run", returncode=1)


@pytest.fixture(scope="session", autouse=True)
def no_mount_left_behind() -> Iterator[None]:
    yield
    leftover = zohofs_mounts()
    for path in leftover:
        subprocess.run(["fusermount3", "-uz", path], capture_output=True, check=False)
    assert not leftover, f"mounts left behind by the suite: {leftover}"


@pytest.fixture(scope="session")
def backup() -> Backup:
    """Data_001 plus three attachment parts, 12 MiB in all."""
    return generate(seed=7, size=12 * MiB, part_size=5 * MiB)


@pytest.fixture
def emulator(backup: Backup) -> Iterator[Emulator]:
    with Emulator(tokens={TOKEN}) as emu:
        emu.add_backup(backup)
        yield emu


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount(tmp_path: Path, emulator: Emulator, token_file: Path) -> Iterator[MountFactory]:
    """Start zohofs on the emulator's links (or ``links=``) with extra CLI ``args``.

    Teardown unmounts with SIGTERM, requires exit 0 and a log with no unexpected
    warnings, and lazily unmounts whatever is left even when the test failed.
    """
    mounts: list[Mount] = []

    def start(*args: str, links: list[str] | None = None, name: str = "mnt",
              env: dict[str, str] | None = None) -> Mount:
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        links = links if links is not None else sorted(
            emulator.base_url + p for p in emulator.files)
        link_args = [a for link in links for a in ("--link", link)]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        m = Mount(path, [*link_args, "--access-token-file", str(token_file),
                         "--trust-host", f"127.0.0.1:{emulator.port}",
                         "--block-size", "1M", "--retry-delay", "0.01", *args],
                  full_env, tmp_path / f"{name}-{len(mounts)}.log")
        mounts.append(m)
        return m

    yield start
    problems = []
    for m in mounts:
        running = m.proc.poll() is None
        code = m.stop()
        if running and code != 0:
            problems.append(f"mount exited with {code}:\n{m.log}")
        elif (bad := m.unexpected_log_lines()):
            problems.append("unexpected log lines:\n" + "\n".join(bad))
        m.kill()  # lazy unmount of anything left, even after a failure
    for m in mounts:
        wait_for(lambda m=m: not is_mounted(m.path), 10, "the unmount")  # type: ignore[misc]
    assert not problems, "\n".join(problems)


def run_zohofs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zohofs", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})
