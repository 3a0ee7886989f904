"""Throughput of zohofs against the alternatives, measured in one run on one server.

A random file behind nginx (Range-capable, HTTPS with a throw-away CA, loopback) is read
cold with ``cat`` through: curl (no filesystem: the ceiling), zohofs (direct I/O, the
default), zohofs --page-cache, and rclone mount (http backend). Reported as seconds, GB/s and the
ratio to rclone; no pass/fail, since these machines are shared and noisy.

Usage: python bench/throughput.py [--size-mib 1024] [--plain-http] [--keep]
Needs nginx and rclone (installed with apt when missing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

REL = "v2/crm/1/backup/2/Data_001.zip"


def need(*commands_and_packages: tuple[str, str]) -> None:
    missing = [pkg for cmd, pkg in commands_and_packages if not shutil.which(cmd)]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with open("/proc/mounts") as f:
            if any(line.split()[1] == str(path) for line in f):
                return
        if proc.poll() is not None:
            raise SystemExit(f"mount exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"{path} not mounted after {deadline}s")


def timed_cat(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def unmount(path: Path, proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--plain-http", action="store_true")
    parser.add_argument("--block-size", default="8M")
    args = parser.parse_args()
    need(("nginx", "nginx"), ("rclone", "rclone"), ("curl", "curl"))

    work = Path(tempfile.mkdtemp(prefix="zohofs-bench-"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user
    root = work / "www"
    (root / REL).parent.mkdir(parents=True)
    size = args.size_mib << 20
    with open(root / REL, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256((root / REL).read_bytes()).hexdigest()

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
    scheme = "http" if args.plain_http else "https"
    listen = "127.0.0.1:18443" + ("" if args.plain_http else " ssl")
    (work / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log {work}/access.log; sendfile on; keepalive_requests 100000;
  server {{
    listen {listen};
    ssl_certificate {work}/server.pem; ssl_certificate_key {work}/server.pem;
    root {root}; autoindex on;
  }}
}}
""")
    nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)])
    base = f"{scheme}://127.0.0.1:18443"
    url = f"{base}/{REL}"
    results: dict[str, float] = {}
    try:
        time.sleep(0.5)
        (work / "token").write_text("bench-token")
        (work / "token").chmod(0o600)
        start = time.perf_counter()
        subprocess.run(["curl", "-sf", "--cacert", str(work / "ca.pem"), "-o", "/dev/null", url],
                       check=True)
        results["curl (no filesystem)"] = time.perf_counter() - start

        for label, extra in (("zohofs", []), ("zohofs --page-cache", ["--page-cache"])):
            mnt = work / "mnt-zohofs"
            mnt.mkdir(exist_ok=True)
            (work / "access.log").write_text("")
            proc = subprocess.Popen(
                [sys.executable, "-m", "zohofs", "mount", str(mnt), "--link", url,
                 "--access-token-file", str(work / "token"), "--trust-host", "127.0.0.1:18443",
                 "--ca-file", str(work / "ca.pem"), "--block-size", args.block_size, *extra])
            try:
                wait_mounted(mnt, proc)
                target = mnt / "1" / "2" / "Data_001.zip"
                results[label] = timed_cat(target)
                gets = (work / "access.log").read_text().count('"GET ')
                print(f"{label}: {gets} GETs for {size >> 20} MiB", flush=True)
                if not extra:
                    subprocess.run(["cp", str(target), str(work / "copy")], check=True)
                    ok = hashlib.sha256((work / "copy").read_bytes()).hexdigest() == digest
                    print(f"zohofs: cp copy is byte-identical: {ok}", flush=True)
                    (work / "copy").unlink()
            finally:
                unmount(mnt, proc)

        mnt = work / "mnt-rclone"
        mnt.mkdir()
        proc = subprocess.Popen(["rclone", "mount", ":http:", str(mnt), "--http-url", base,
                                 "--ca-cert", str(work / "ca.pem"), "--read-only"],
                                stderr=subprocess.DEVNULL)
        try:
            wait_mounted(mnt, proc)
            results["rclone mount"] = timed_cat(mnt / REL)
        finally:
            unmount(mnt, proc)
    finally:
        nginx.terminate()
        nginx.wait()
        shutil.rmtree(work, ignore_errors=True)

    rclone = results.get("rclone mount")
    print(f"\ncold cat of {size >> 20} MiB over {scheme} from nginx on loopback")
    print(f"{'reader':24} {'seconds':>8} {'GB/s':>6} {'vs rclone':>10}")
    for label, seconds in results.items():
        ratio = f"{rclone / seconds:.2f}x" if rclone else "-"
        print(f"{label:24} {seconds:8.2f} {size / seconds / 1e9:6.2f} {ratio:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
