"""The commands a user types first: `zohofs emulator` and `zohofs demo`, as processes."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.helpers import is_mounted, wait_for


def test_emulator_prints_its_url_first_and_serves(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "zohofs", "emulator", "--size", "2M",
                             "--token", "cli-token"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base), base
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines[0].startswith("account: zgid=757345985 client_id=")
        # A grant code, so that `zohofs login` can be rehearsed against it.
        assert re.fullmatch(r"grant-code: zgid=757345985 code=\S+", lines[1]), lines[1]
        link = next(line[len("link: "):] for line in lines if line.startswith("link: "))
        request = urllib.request.Request(link, headers={
            "Authorization": "Zoho-oauthtoken cli-token", "Range": "bytes=0-3"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 206 and answer.read() == b"PK\x03\x04"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_demo_shows_the_tree_and_unmounts_on_ctrl_c(tmp_path: Path) -> None:
    mnt = tmp_path / "zoho-demo"
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zohofs", "demo", str(mnt),
                                 "--size", "6M", "--part-size", "2M"],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(lambda: "Press Ctrl-C" in log.read_text(), 60, "the demo's tree")
            text = log.read_text()
            assert "757345985/" in text and "Attachments_003.zip" in text
            assert "Data_001.zip" in os.listdir(mnt / "757345985" / "4876876000001594004")
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(20)
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    assert code == 0, log.read_text()
    assert not is_mounted(mnt)


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
        lines = [proc.stdout.readline().strip() for _ in range(3)]  # account, code, link
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
