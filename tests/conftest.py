from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Mount, is_mounted, started_mounts, wait_for
from zohofs.emulator.backup import Backup, generate
from zohofs.emulator.server import EmulatedAccount, Emulator

TOKEN = "test-token-5f1c0e"
MiB = 1 << 20


def pytest_sessionstart(session: pytest.Session) -> None:
    # Real-mount tests are the point of this suite: no FUSE means a failed run, not skips.
    if not os.path.exists("/dev/fuse"):
        pytest.exit("/dev/fuse is missing: the real-mount tests cannot run", returncode=1)


@pytest.fixture(scope="session", autouse=True)
def no_mount_left_behind() -> Iterator[None]:
    """Only the mount points this suite made are checked and cleaned: a machine may have
    other zohofs mounts (a production /zoho) that are none of its business."""
    yield
    leftover = [str(p) for p in started_mounts() if is_mounted(p)]
    for path in leftover:
        subprocess.run(["fusermount3", "-uz", path], capture_output=True, check=False)
    assert not leftover, f"mounts left behind by the suite: {leftover}"


@pytest.fixture(autouse=True)
def private_token_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's zohofs processes share access tokens with each other only: not with
    other tests, nor with the user's own zohofs."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "zohofs"


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
def mount_process(tmp_path: Path) -> Iterator[MountFactory]:
    """Start ``zohofs mount <tmp>/<name> *args``.

    Teardown unmounts with SIGTERM, requires exit 0 and a log with no unexpected
    warnings, and lazily unmounts whatever is left even when the test failed.
    """
    mounts: list[Mount] = []

    def start(*args: str, name: str = "mnt", env: dict[str, str] | None = None,
              where: Path | None = None) -> Mount:
        path = (where or tmp_path) / name
        # Not mkdir(exist_ok=True): its check stats the path, which fails with ENOTCONN
        # on a dead mount left there on purpose (the kernel may not have its attributes).
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        m = Mount(path, list(args), full_env, tmp_path / f"{name}-{len(mounts)}.log")
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


def common_args(emulator: Emulator) -> list[str]:
    return ["--trust-host", f"127.0.0.1:{emulator.port}", "--block-size", "1M",
            "--retry-delay", "0.01"]


@pytest.fixture
def mount(mount_process: MountFactory, emulator: Emulator,
          token_file: Path) -> MountFactory:
    """zohofs on explicit links (the emulator's, or ``links=``) with an access token."""

    def start(*args: str, links: list[str] | None = None, name: str = "mnt",
              env: dict[str, str] | None = None, where: Path | None = None) -> Mount:
        links = links if links is not None else sorted(
            emulator.base_url + p for p in emulator.files)
        link_args = [a for link in links for a in ("--link", link)]
        return mount_process(*link_args, "--access-token-file", str(token_file),
                             *common_args(emulator), *args, name=name, env=env,
                             where=where)

    return start


@pytest.fixture
def account(emulator: Emulator, backup: Backup) -> EmulatedAccount:
    return emulator.add_account(backup.zgid)


def write_config(path: Path, emulator: Emulator, account: EmulatedAccount,
                 extra: str = "") -> Path:
    path.write_text(f"""
accounts_url = "{emulator.base_url}"
api_url = "{emulator.base_url}"
client_id = "{account.client_id}"
client_secret = "{account.client_secret}"
refresh_token = "{account.refresh_token}"
{extra}
""")
    path.chmod(0o600)
    return path


@pytest.fixture
def oauth_mount(mount_process: MountFactory, emulator: Emulator, account: EmulatedAccount,
                tmp_path: Path) -> MountFactory:
    """zohofs signing in with a refresh token and discovering backups, from a config file."""

    def start(*args: str, name: str = "mnt", extra: str = "",
              env: dict[str, str] | None = None) -> Mount:
        cfg = write_config(tmp_path / f"{name}.toml", emulator, account, extra)
        return mount_process("--config", str(cfg), *common_args(emulator), *args,
                             name=name, env=env)

    return start


def run_zohofs(*args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zohofs", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
