"""Real mounts that sign in with a refresh token and discover backups by themselves."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import MiB, MountFactory, common_args, run_zohofs, write_config
from tests.helpers import (
    Mount,
    file_sha256,
    ids,
    is_mounted,
    reads_as,
    sha256,
    started_mounts_add,
    wait_for,
)
from zohofs.emulator.backup import Backup, generate
from zohofs.emulator.server import EmulatedAccount, Emulator

ZGID = "757345985"
JOB = f"{ZGID}/4876876000001594004"
NEW_JOB = "4876876000001777001"


def listings(emulator: Emulator) -> int:
    return sum(p.endswith("/backup/urls") for p in emulator.arrived)


def open_errno(path: Path) -> int:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_discovery_builds_the_tree_and_rsync_copies_it(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    m = oauth_mount()
    assert ids(m.path) == [ZGID]
    assert sorted(os.listdir(m.path / JOB)) == sorted(backup.files)
    subprocess.run(["rsync", "-a", f"{m.path}/", f"{tmp_path / 'copy'}/"], check=True)
    for name, data in backup.files.items():
        assert file_sha256(tmp_path / "copy" / JOB / name) == sha256(data)
    assert len(emulator.issued) == 1  # one access token for the whole multi-file copy
    assert listings(emulator) == 1


def test_tokens_expiring_under_a_copy_are_renewed_transparently(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path) -> None:
    emulator.token_lifetime = 3
    m = oauth_mount("--connections", "1")
    started = datetime.now(UTC)
    # About 4 s at this rate, so the first token dies while the copy runs.
    subprocess.run(["rsync", "-a", "--bwlimit=3000", f"{m.path}/", f"{tmp_path / 'copy'}/"],
                   check=True)
    seconds = (datetime.now(UTC) - started).total_seconds()
    for name, data in backup.files.items():
        assert file_sha256(tmp_path / "copy" / JOB / name) == sha256(data)
    assert 2 <= len(emulator.issued) <= seconds / 3 + 2  # at most one per token lifetime


def test_an_expired_token_is_renewed_once_and_the_read_retried(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = oauth_mount("--readahead", "0")  # the rest of the file is fetched after the expiry
    m.expect_log(r"HTTP 401 INVALID_OAUTHSCOPE")
    name = "Attachments_001.zip"
    with open(m.path / JOB / name, "rb", buffering=0) as f:
        first = f.read(2 * MiB)
        emulator.expire_access_tokens()
        rest = f.read()
    assert first + rest == backup.files[name]
    assert len(emulator.issued) == 2


def test_zoho_throttling_fails_reads_clearly(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = oauth_mount()
    m.expect_log("too many requests|HTTP 401|not asking again")
    emulator.throttle_limit = 0
    emulator.expire_access_tokens()
    with pytest.raises(OSError) as info:
        (m.path / JOB / "Attachments_002.zip").read_bytes()
    assert info.value.errno == errno.EBUSY
    assert "too many requests" in m.log
    # It does not ask again while paused: one refused refresh, whatever the reads.
    with pytest.raises(OSError):
        (m.path / JOB / "Attachments_003.zip").read_bytes()
    assert sum(p == "/oauth/v2/token" for p in emulator.arrived) == 2


def test_an_accounts_outage_while_the_token_is_valid_keeps_reads_going(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    emulator.token_lifetime = 12  # renewed from 1.2 s before it expires
    m = oauth_mount()
    m.expect_log("cannot reach Zoho Accounts|HTTP 503")
    expires = emulator.access_tokens[emulator.issued[0]][1]  # the emulator's monotonic clock
    emulator.add_fault("status", status=503, reason="SERVICE_UNAVAILABLE",
                       path="/oauth/v2/token", count=None)
    wait_for(lambda: time.monotonic() >= expires - 1.1, 20, "the token to be due for renewal")
    # Accounts is down and the token still valid: reads go on with it (each file below
    # is fetched for the first time, so each read needs the token).
    for name in ("Attachments_001.zip", "Attachments_002.zip"):
        assert (m.path / JOB / name).read_bytes() == backup.files[name]
    token_posts = sum(p == "/oauth/v2/token" for p in emulator.arrived)
    assert token_posts == 2  # sign-in, then one failed renewal: no post per read
    # Accounts is back: once the token has expired and the pause (10 s) is over, the mount
    # renews by itself, no restart needed.
    emulator.faults.clear()
    wait_for(lambda: time.monotonic() >= expires, 20, "the old token to expire")
    wait_for(lambda: reads_as(m.path / JOB / "Attachments_003.zip",
                              backup.files["Attachments_003.zip"]), 30, "a renewed token")
    assert len(emulator.issued) == 2


def test_a_revoked_refresh_token_gives_eacces_and_says_why(
        oauth_mount: MountFactory, emulator: Emulator, account: EmulatedAccount) -> None:
    m = oauth_mount()
    m.expect_log("invalid_code|HTTP 401|not asking again")
    del emulator.accounts[account.refresh_token]
    emulator.expire_access_tokens()
    assert open_errno(m.path / JOB / "Attachments_001.zip") == 0  # probed at mount
    with pytest.raises(OSError) as info:
        (m.path / JOB / "Attachments_001.zip").read_bytes()
    assert info.value.errno == errno.EACCES
    assert "zohofs login" in m.log


@pytest.mark.parametrize(("change", "message"), [
    ("refresh_token", "invalid_code"),
    ("client_id", "wrong client id, or wrong data centre"),
    ("client_secret", "wrong client secret"),
])
def test_bad_credentials_stop_the_mount_with_a_clear_message(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path,
        change: str, message: str) -> None:
    wrong = dataclasses.replace(account)
    setattr(wrong, change, "1000.wrong")  # in the config only: the emulator keeps the truth
    cfg = write_config(tmp_path / "c.toml", emulator, wrong)
    (tmp_path / "m").mkdir()
    try:
        result = run_zohofs("mount", str(tmp_path / "m"), "--config", str(cfg),
                            *common_args(emulator), timeout=30)
    finally:  # should the mount wrongly come up, do not leave it behind
        subprocess.run(["fusermount3", "-uz", str(tmp_path / "m")], capture_output=True,
                       check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_no_backup_gives_an_empty_mount(
        oauth_mount: MountFactory, emulator: Emulator) -> None:
    emulator.no_backup.add(ZGID)
    m = oauth_mount()
    assert os.listdir(m.path) == []
    assert "no backup to download" in m.log


def test_a_new_backup_appears_on_lookup_and_the_old_one_leaves(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = oauth_mount(env={"ZOHOFS_LOOKUP_REFRESH_INTERVAL": "3600"})
    old = m.path / JOB / "Data_001.zip"
    with open(old, "rb", buffering=0) as still_open:
        new = generate(seed=9, size=2 * MiB, job_id=NEW_JOB)
        emulator.add_backup(new)
        # A lookup of the new job id lists again, once.
        assert sorted(os.listdir(m.path / ZGID / NEW_JOB)) == sorted(new.files)
        assert listings(emulator) == 2
        assert ids(m.path / ZGID) == [NEW_JOB]
        # The kernel forgets the old entries too, not only when their cache time runs out.
        wait_for(lambda: not (m.path / JOB).exists(), 10, "the old backup to leave")
        # An open file of the backup that left keeps reading.
        assert still_open.read() == backup.files["Data_001.zip"]
    # What file managers look up in every folder costs no listing at all; ids that could
    # be backups cost at most one listing a minute (here: an hour).
    for name in (".hidden", ".Trash-0", "autorun.inf", "desktop.ini", "123", "999",
                 "Data_042.zip"):
        assert open_errno(m.path / ZGID / name) == errno.ENOENT
    assert listings(emulator) == 2
    with open(m.path / ZGID / NEW_JOB / "Data_001.zip", "rb") as f:
        assert f.read() == new.files["Data_001.zip"]


def test_the_listing_is_refreshed_periodically(
        oauth_mount: MountFactory, emulator: Emulator) -> None:
    m = oauth_mount("--listing-interval", "0.5")
    emulator.add_backup(generate(seed=9, size=2 * MiB, job_id=NEW_JOB))
    wait_for(lambda: ids(m.path / ZGID) == [NEW_JOB], 15, "the new backup")


def test_expired_links_give_eacces_and_say_so(
        oauth_mount: MountFactory, emulator: Emulator) -> None:
    emulator.links_expire = datetime.now(UTC) + timedelta(seconds=2)
    m = oauth_mount()
    m.expect_log("expired on")
    path = m.path / JOB / "Data_001.zip"
    wait_for(lambda: open_errno(path) == errno.EACCES, 15, "the links to expire")
    assert f"expired on {emulator.links_expire.astimezone().isoformat()[:10]}" in m.log


def test_hostile_links_from_the_api_are_refused(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    good = emulator.listing(ZGID)["urls"]
    assert isinstance(good, dict)
    evil = [f"{emulator.base_url}/v2/crm/{ZGID}/backup/1/..%2F..%2Fshadow",
            f"https://attacker.example/v2/crm/{ZGID}/backup/1/Data_001.zip",
            f"{emulator.base_url}/v2/crm/x1/backup/1/Data_001.zip"]
    body = {"urls": {**good, "data_links": good["data_links"] * 2 + evil}}
    emulator.listing_override = (200, json.dumps(body).encode())
    m = oauth_mount()
    m.expect_log("refusing a link")
    assert sorted(os.listdir(m.path / JOB)) == sorted(backup.files)
    assert m.log.count("refusing a link") == 3


def test_secrets_never_reach_the_log(
        oauth_mount: MountFactory, emulator: Emulator, account: EmulatedAccount) -> None:
    m = oauth_mount("--debug")
    m.expect_log("HTTP 401")
    (m.path / JOB / "Data_001.zip").read_bytes()
    emulator.expire_access_tokens()
    (m.path / JOB / "Attachments_001.zip").read_bytes()
    log = m.log
    assert "Data_001.zip" in log and len(emulator.issued) == 2
    # -d shows sign-in and discovery too, one line per request.
    assert re.search(r"POST http://127\.0\.0\.1:\d+/oauth/v2/token -> 200 OK", log)
    assert re.search(r"GET http://127\.0\.0\.1:\d+/crm/bulk/v\d+/backup/urls -> 200 OK", log)
    for secret in (account.client_id, account.client_secret, account.refresh_token,
                   *emulator.issued):
        assert secret not in log


def test_ls_lists_without_mounting(emulator: Emulator, account: EmulatedAccount,
                                   backup: Backup, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    trust = ("--trust-host", f"127.0.0.1:{emulator.port}")
    result = run_zohofs("ls", "--config", str(cfg), *trust)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert sorted(r[:4] for r in rows) == sorted(
        [ZGID, backup.job_id, name, str(len(data))] for name, data in backup.files.items())
    assert {datetime.fromisoformat(r[4]) for r in rows} == {emulator.links_expire}
    del emulator.accounts[account.refresh_token]
    emulator.expire_access_tokens()  # else the next run uses the token the first one left
    result = run_zohofs("ls", "--config", str(cfg), *trust)
    # As `mount` does: exit status 2, the reason once, no log lines around it.
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("zohofs login") == 1 and "ERROR" not in result.stderr


def test_ls_fails_when_there_is_nothing_to_list(
        emulator: Emulator, account: EmulatedAccount, backup: Backup, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    trust = ("--trust-host", f"127.0.0.1:{emulator.port}")
    emulator.no_backup.add(backup.zgid)
    result = run_zohofs("ls", "--config", str(cfg), *trust)
    assert result.returncode == 1 and "no backup files" in result.stderr


def test_ls_runs_mounts_and_restarts_share_one_access_token(
        oauth_mount: MountFactory, emulator: Emulator, account: EmulatedAccount,
        backup: Backup, tmp_path: Path, private_token_store: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    trust = ("--trust-host", f"127.0.0.1:{emulator.port}")
    for _ in range(20):  # set-up by trial and error, a cron check
        result = run_zohofs("ls", "--config", str(cfg), *trust)
        assert result.returncode == 0, result.stderr
    for i in range(3):  # a mount, and two restarts
        m = oauth_mount(name=f"mnt{i}")
        assert ids(m.path) == [ZGID]
        assert (m.path / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]
        assert m.stop() == 0
    assert sum(p == "/oauth/v2/token" for p in emulator.arrived) == 1
    [store] = private_token_store.glob("tokens-*.json")
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert account.refresh_token not in store.read_text()
    assert account.client_secret not in store.read_text()


def test_a_lock_out_one_process_met_holds_every_process_back(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path) -> None:
    emulator.throttle_limit = 0  # Zoho has locked this client out
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    trust = ("--trust-host", f"127.0.0.1:{emulator.port}")
    first = run_zohofs("ls", "--config", str(cfg), *trust)
    assert first.returncode != 0 and "too many requests" in first.stderr
    assert "will not ask again before" in first.stderr
    posts = sum(p == "/oauth/v2/token" for p in emulator.arrived)
    second = run_zohofs("ls", "--config", str(cfg), *trust)
    assert second.returncode == first.returncode
    assert "will not ask again before" in second.stderr and "too many requests" in second.stderr
    assert sum(p == "/oauth/v2/token" for p in emulator.arrived) == posts  # not asked again


def test_a_mount_started_during_a_lock_out_serves_once_it_lifts(
        oauth_mount: MountFactory, emulator: Emulator, account: EmulatedAccount,
        backup: Backup, private_token_store: Path) -> None:
    emulator.throttle_limit = 0  # Zoho has locked this client out
    m = oauth_mount(extra="lookup_refresh_interval = 0.5")
    m.expect_log(r"too many requests.*will not ask again before")
    wait_for(lambda: "will not ask again before" in m.log, 10, "the lock-out logged")
    assert os.listdir(m.path) == []  # up and answering, with nothing to show yet
    # Zoho lifts the lock-out; its end is reached here by moving the shared store's
    # "not before" into the past rather than by waiting the 20 minutes.
    emulator.throttle_limit = 10
    [store] = private_token_store.glob("tokens-*.json")
    shared = json.loads(store.read_text())
    assert shared["paused_until"] > time.time()
    store.write_text(json.dumps({**shared, "paused_until": time.time() - 1}))
    wait_for(lambda: ids(m.path) == [ZGID], 20, "the tree after the lock-out")
    assert (m.path / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]
    assert len(emulator.issued) == 1


def test_login_stores_the_refresh_token_privately(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path) -> None:
    for name, value in (("id", account.client_id), ("secret", account.client_secret),
                        ("code", emulator.add_grant_code(account))):
        (tmp_path / name).write_text(value + "\n")
        (tmp_path / name).chmod(0o600)
    out = tmp_path / "conf" / "refresh-token"
    args = ["login", "--accounts-url", emulator.base_url, "--client-id-file",
            str(tmp_path / "id"), "--client-secret-file", str(tmp_path / "secret"),
            "--code-file", str(tmp_path / "code"), "--output", str(out)]
    result = run_zohofs(*args)
    assert result.returncode == 0, result.stderr
    assert "ZohoCRM.bulk.backup.READ,ZohoFiles.files.ALL" in result.stdout
    assert str(out) in result.stdout
    assert out.read_text().strip() == account.refresh_token
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # A code works once.
    result = run_zohofs(*args)
    assert result.returncode == 2 and "grant code" in result.stderr


def test_explicit_links_still_work_next_to_an_account(
        mount_process: MountFactory, emulator: Emulator, account: EmulatedAccount,
        backup: Backup, tmp_path: Path) -> None:
    # A link the user kept from an older backup, read with the account's token.
    older = generate(seed=4, size=MiB, job_id="4876876000001000001")
    links = emulator.add_backup(older)
    emulator.current_job[ZGID] = backup.job_id
    cfg = write_config(tmp_path / "c.toml", emulator, account)
    m: Mount = mount_process("--config", str(cfg), "--link", links[0], *common_args(emulator))
    assert sorted(ids(m.path / ZGID)) == [older.job_id, backup.job_id]
    name = links[0].rsplit("/", 1)[1]
    assert (m.path / ZGID / older.job_id / name).read_bytes() == older.files[name]
    assert len(emulator.issued) == 1


def test_several_accounts_in_one_mount(
        mount_process: MountFactory, emulator: Emulator, account: EmulatedAccount,
        backup: Backup, tmp_path: Path) -> None:
    sister = generate(seed=11, size=2 * MiB, zgid="800123", job_id="5000000000000000001")
    emulator.add_backup(sister)
    second = emulator.add_account(sister.zgid)
    tables = "".join(f"""
[[account]]
name = "{name}"
client_id = "{a.client_id}"
client_secret = "{a.client_secret}"
refresh_token = "{a.refresh_token}"
""" for name, a in (("main", account), ("sister", second)))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'accounts_url = "{emulator.base_url}"\napi_url = "{emulator.base_url}"\n'
                   + tables)
    cfg.chmod(0o600)
    m = mount_process("--config", str(cfg), *common_args(emulator))
    assert sorted(ids(m.path)) == sorted([ZGID, sister.zgid])
    assert os.readlink(m.path / "by-name" / "main") == f"../{ZGID}"
    assert os.readlink(m.path / "by-name" / "sister") == f"../{sister.zgid}"
    # Each org's files are read with that org's own token (the emulator checks).
    assert (m.path / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]
    assert (m.path / sister.zgid / sister.job_id / "Data_001.zip").read_bytes() == (
        sister.files["Data_001.zip"])
    assert len(emulator.issued) == 2


def test_a_failed_listing_at_start_leaves_a_live_mount_that_catches_up(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    emulator.add_fault("status", status=500, reason="INTERNAL_ERROR", path="/backup/urls")
    # The regular listing is an hour away: only the early retry can bring the backup.
    m = oauth_mount("--listing-interval", "3600", env={"ZOHOFS_LOOKUP_REFRESH_INTERVAL": "1"})
    m.expect_log("cannot list backups")
    assert "cannot list backups" in m.log
    wait_for(lambda: ids(m.path) == [ZGID], 15, "the next listing")
    assert (m.path / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]


def test_an_absurdly_nested_listing_leaves_the_mount_up(
        oauth_mount: MountFactory, emulator: Emulator) -> None:
    emulator.listing_override = (200, b'{"urls":' * 50_000)
    m = oauth_mount()
    m.expect_log("cannot list backups")
    assert "nested absurdly deep" in m.log
    assert os.listdir(m.path) == []
    assert "Traceback" not in m.log


def test_links_with_a_non_ascii_query_are_read_and_newlines_refused(
        mount: MountFactory, emulator: Emulator, backup: Backup, tmp_path: Path,
        token_file: Path) -> None:
    links = sorted(emulator.base_url + p + "?n=D\u00e4ta" for p in emulator.files)
    m = mount(links=links)
    name = "Data_001.zip"
    assert (m.path / JOB / name).read_bytes() == backup.files[name]
    bad = next(iter(emulator.files))
    (tmp_path / "m2").mkdir()
    result = run_zohofs("mount", str(tmp_path / "m2"), "--link",
                        emulator.base_url + bad + "%0A", "--access-token-file", str(token_file),
                        *common_args(emulator))
    assert result.returncode == 2 and "<Name>_<NNN>.zip" in result.stderr


def test_a_stuck_api_host_does_not_hang_lookups(
        oauth_mount: MountFactory, emulator: Emulator, backup: Backup) -> None:
    m = oauth_mount("--read-timeout", "2")
    m.expect_log("cannot list backups: no answer within 2 s")
    emulator.add_fault("silent", path="/backup/urls", count=None)
    # A missing id-shaped name asks for a listing; the API host never answers it.
    started = datetime.now(UTC)
    assert open_errno(m.path / ZGID / "4876876000009999999") == errno.ENOENT
    assert (datetime.now(UTC) - started).total_seconds() < 2 + 8
    assert "no answer within 2 s" in m.log
    assert (m.path / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]


def mount_by_fstab(emulator: Emulator, account: EmulatedAccount, tmp_path: Path,
                   options: str = "") -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`mount --fstab` of a zohofs line for ``account``; the mount point and the result."""
    cfg = write_config(tmp_path / "c.toml", emulator, account,
                       f'trust_hosts = ["127.0.0.1:{emulator.port}"]')
    mnt = tmp_path / "backups"
    mnt.mkdir()
    started_mounts_add(mnt)
    # mount(8) runs helpers with a fixed PATH: a zohofs in a virtualenv is named in the
    # source field (type fuse); installed system-wide, the type is fuse.zohofs.
    program = Path(sys.executable).parent / "zohofs"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{program}#zoho {mnt} fuse config={cfg}{options} 0 0\n")
    return mnt, subprocess.run(["mount", "--fstab", str(fstab), str(mnt)],
                               capture_output=True, text=True, timeout=60)


def test_an_fstab_line_mounts_in_the_background_and_umount_ends_it(
        emulator: Emulator, account: EmulatedAccount, backup: Backup, tmp_path: Path) -> None:
    mnt, result = mount_by_fstab(emulator, account, tmp_path,
                                 ",_netdev,nofail,allow_other,x-systemd.mount-timeout=60")
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)  # live when mount(8) returns: no waiting
        assert (mnt / JOB / "Data_001.zip").read_bytes() == backup.files["Data_001.zip"]
        assert "allow_other" in next(line for line in Path("/proc/mounts").read_text()
                                     .splitlines() if line.split()[1] == str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
    wait_for(lambda: not is_mounted(mnt), 10, "the unmount")


def test_an_fstab_mount_that_cannot_start_fails_mount_with_the_reason(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path) -> None:
    wrong = dataclasses.replace(account, client_secret="1000.wrong")
    try:
        mnt, result = mount_by_fstab(emulator, wrong, tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "backups")], capture_output=True,
                       check=False)
    assert result.returncode != 0
    assert "wrong client secret" in result.stderr
    assert not is_mounted(mnt)


def test_login_at_the_prompt_prints_a_config_that_works(
        emulator: Emulator, account: EmulatedAccount, tmp_path: Path) -> None:
    out = tmp_path / "conf" / "refresh-token"
    typed = f"{account.client_id}\n{account.client_secret}\n{emulator.add_grant_code(account)}\n"
    result = subprocess.run(
        [sys.executable, "-m", "zohofs", "login", "--accounts-url", emulator.base_url,
         "--output", str(out)], input=typed, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    secret = tmp_path / "conf" / "client-secret"
    assert secret.read_text().strip() == account.client_secret
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    offered = result.stdout.split("(chmod 600):\n", 1)[1].split("Then try", 1)[0]
    cfg = tmp_path / "offered.toml"
    cfg.write_text(offered + f'api_url = "{emulator.base_url}"\n')
    cfg.chmod(0o600)
    listed = run_zohofs("ls", "--config", str(cfg), "--trust-host", f"127.0.0.1:{emulator.port}")
    assert listed.returncode == 0, listed.stderr


def test_login_with_stdin_closed_says_what_to_do(
        emulator: Emulator, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zohofs", "login", "--accounts-url", emulator.base_url,
         "--output", str(tmp_path / "t")], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "standard input is closed" in result.stderr and "--code-file" in result.stderr
