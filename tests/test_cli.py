"""The commands a user types first: `zohofs emulator` and `zohofs demo`, as processes."""

from __future__ import annotations

import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_zohofs
from tests.helpers import is_mounted, wait_for


def test_emulator_prints_its_url_first_and_serves(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "zohofs", "emulator", "--size", "2M",
                             "--token", "cli-token"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base), base
        lines = [proc.stdout.readline().strip() for _ in range(5)]
        assert lines[0].startswith("account: zgid=757345985 client_id=")
        # Grant codes, so that `zohofs login` can be rehearsed against it (a mistake
        # costs one, as with Zoho).
        for line in lines[1:4]:
            assert re.fullmatch(r"grant-code: zgid=757345985 code=\S+", line), line
        link = next(line[len("link: "):] for line in lines if line.startswith("link: "))
        request = urllib.request.Request(link, headers={
            "Authorization": "Zoho-oauthtoken cli-token", "Range": "bytes=0-3"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 206 and answer.read() == b"PK\x03\x04"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize("expand", [False, True], ids=["plain", "expand"])
def test_demo_shows_the_tree_and_unmounts_on_ctrl_c(tmp_path: Path, expand: bool,
                                                    private_token_store: Path) -> None:
    mnt = tmp_path / "zoho-demo"
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zohofs", "demo", str(mnt),
                                 "--size", "6M", "--part-size", "2M",
                                 *(["--expand"] if expand else
                                   ["--cache-dir", str(tmp_path / "cache")])],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(lambda: "Press Ctrl-C" in log.read_text(), 60, "the demo's tree")
            text = log.read_text()
            assert "757345985/" in text and "Attachments_003.zip" in text
            job = mnt / "757345985" / "4876876000001594004"
            assert "Data_001.zip" in os.listdir(job)
            # With --expand the folders are listed, not walked into.
            assert ("Data_001/  (what Data_001.zip holds)" in text) == expand
            assert "    Leads_001.csv" not in text
            assert (job / "Data_001" / "Data" / "Leads_001.csv").exists() == expand
            if not expand:  # --cache-dir: what was read is kept on disk
                (job / "Data_001.zip").read_bytes()
                wait_for(lambda: any((tmp_path / "cache").rglob("*.chunks")), 20,
                         "the chunks on disk")
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(20)
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    assert code == 0, log.read_text()
    assert not is_mounted(mnt)
    # The demo's tokens are the emulator's: nothing of them stays in the state directory.
    assert not list((private_token_store).glob("tokens-*"))


def test_emulator_serves_a_data_dir_over_tls(tmp_path: Path) -> None:
    job = tmp_path / "data" / "v2" / "crm" / "42" / "backup" / "7"
    job.mkdir(parents=True)
    (job / "Data_001.zip").write_bytes(b"0123456789" * 1000)
    proc = subprocess.Popen([sys.executable, "-m", "zohofs", "emulator", "--tls",
                             "--ca-out", str(tmp_path / "ca.pem"), "--data-dir",
                             str(tmp_path / "data")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert base.startswith("https://127.0.0.1:")
        assert proc.stdout.readline().strip() == f"ca-file: {tmp_path / 'ca.pem'}"
        lines = [proc.stdout.readline().strip() for _ in range(5)]  # account, codes, link
        assert f"link: {base}/v2/crm/42/backup/7/Data_001.zip" in lines
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        request = urllib.request.Request(f"{base}/v2/crm/42/backup/7/Data_001.zip", headers={
            "Authorization": "Zoho-oauthtoken emulator-token", "Range": "bytes=9995-"})
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            assert answer.headers["Content-Range"] == "bytes 9995-9999/10000"
            assert answer.read() == b"56789"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_every_command_and_flag_says_what_it_is_for() -> None:
    import argparse

    from zohofs.cli import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    undocumented = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in commands.choices.items() for action in sub._actions
        if action.option_strings and not action.help]
    assert undocumented == []
    assert all(choice.help for choice in commands._choices_actions)


def zohofs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zohofs", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "XDG_CONFIG_HOME": str(cwd)})


def test_configuration_mistakes_name_the_key_and_the_source(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("connections = 0\n")
    bad = zohofs("ls", "--config", str(config), "--link", "https://x.invalid/a", cwd=tmp_path)
    assert bad.returncode == 2
    assert (f"zohofs: error: config file {config}: bad value for 'connections': must be at "
            "least 1, not 0") in bad.stderr
    flag = zohofs("mount", str(tmp_path / "nowhere"), "--block-size", "100M", "--link",
                  "https://x.invalid/a", cwd=tmp_path)
    assert flag.returncode == 2
    assert ("command line: bad value for 'block_size': must be between 1 MiB and 64 MiB, "
            "not 100 MiB") in flag.stderr
    config.write_bytes(b"timeout = 5\n# caf\xe9\n")
    latin1 = zohofs("ls", "--config", str(config), cwd=tmp_path)
    assert latin1.returncode == 2 and "is not UTF-8 text" in latin1.stderr
    for result in (bad, flag, latin1):
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    # The unit names the installed path; here the same unit runs this checkout's zohofs.
    unit = (Path(__file__).parents[1] / "systemd" / "zohofs.service").read_text()
    zohofs_bin = Path(sys.executable).parent / "zohofs"
    assert "/usr/local/bin/zohofs" in unit and zohofs_bin.exists()
    (tmp_path / "zohofs.service").write_text(unit.replace("/usr/local/bin/zohofs",
                                                          str(zohofs_bin)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "zohofs.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def emulator_lines(proc: subprocess.Popen[str]) -> dict[str, list[str]]:
    """What `zohofs emulator` prints before it serves, by the word before the colon."""
    assert proc.stdout is not None
    found: dict[str, list[str]] = {"url": [proc.stdout.readline().strip()]}
    while "config" not in found:
        key, _, value = proc.stdout.readline().strip().partition(": ")
        found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def tls_emulator() -> Iterator[dict[str, list[str]]]:
    proc = subprocess.Popen([sys.executable, "-m", "zohofs", "emulator", "--tls", "--size",
                             "2M"], stdout=subprocess.PIPE, text=True)
    try:
        yield emulator_lines(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_the_config_the_emulator_prints_works_as_printed(
        tls_emulator: dict[str, list[str]]) -> None:
    [config] = tls_emulator["config"]
    listed = run_zohofs("ls", "--config", config)
    assert listed.returncode == 0, listed.stderr
    assert "Data_001.zip" in listed.stdout


def test_login_writes_the_config_it_prints_and_it_works(
        tls_emulator: dict[str, list[str]], tmp_path: Path) -> None:
    url, [ca] = tls_emulator["url"][0], tls_emulator["ca-file"]
    account = dict(field.split("=", 1) for field in tls_emulator["account"][0].split())
    codes = [line.split("code=")[1] for line in tls_emulator["grant-code"]]
    secrets = {}
    for name, value in (("id", account["client_id"]), ("secret", "1000.wrong"),
                        ("code", codes[0])):
        secrets[name] = tmp_path / name
        secrets[name].write_text(value)
        secrets[name].chmod(0o600)
    args = ["login", "--accounts-url", url, "--ca-file", ca, "--api-url", url,
            "--trust-host", url.split("//")[1], "--client-id-file", str(secrets["id"]),
            "--client-secret-file", str(secrets["secret"]), "--code-file",
            str(secrets["code"]), "--output", str(tmp_path / "conf" / "refresh-token"),
            "--write-config", str(tmp_path / "conf" / "config.toml")]
    wrong = run_zohofs(*args)
    assert wrong.returncode == 2 and "wrong client secret" in wrong.stderr, wrong.stderr
    secrets["secret"].write_text(account["client_secret"])
    secrets["code"].write_text(codes[1])  # the first was spent, as Zoho's would be
    done = run_zohofs(*args)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "conf" / "config.toml"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert written.read_text().strip() in done.stdout  # what it printed is what it wrote
    listed = run_zohofs("ls", "--config", str(written))
    assert listed.returncode == 0, listed.stderr


def test_an_untrusted_certificate_is_named_as_such(
        tls_emulator: dict[str, list[str]], tmp_path: Path) -> None:
    [config] = tls_emulator["config"]
    untrusting = tmp_path / "c.toml"
    untrusting.write_text("\n".join(line for line in Path(config).read_text().splitlines()
                                    if not line.startswith("ca_file")))
    untrusting.chmod(0o600)
    listed = run_zohofs("ls", "--config", str(untrusting))
    assert listed.returncode != 0
    assert "certificate verify failed" in listed.stderr and "ca_file" in listed.stderr, (
        listed.stderr)
