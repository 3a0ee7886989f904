"""zohofs's scoreboard: every access pattern, side by side with curl and rclone mount.

One run, one machine, one server: nginx (Debian's, HTTPS with a throw-away CA, loopback)
serves a 1 GiB zip and some other parts; a second nginx port caps each connection at
20 MB/s; the built-in emulator adds first-byte latency. Each figure is measured for
zohofs, for rclone mount (what users pick today) and, where it means something, for curl
(no filesystem: the ceiling). GETs and bytes come from the servers' logs, CPU and peak RSS
from /proc. Results are printed and written to docs/benchmarks.md with a chart
(docs/benchmarks.png). No pass/fail: these machines are shared and noisy; compare the
ratios within one run.

Usage: python bench/scoreboard.py [--size-mib 1024] [--quick]
Needs nginx, rclone, curl and unzip (installed with apt when missing), matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from zohofs.emulator.server import Emulator

MiB = 1 << 20
JOB = "v2/crm/1/backup/2"
CAP = 20_000_000  # bytes per second per connection in the capped runs
LATENCY = 0.03
MEMBER = "Data/Leads_001.csv"
BIG_CSV = "Data/Notes_001.csv"  # ~10 MB, deflated: scenario h
STORED = "Attachments/0001.bin"  # 16 MiB, stored: scenario i
READERS = 8
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def need(*commands_and_packages: tuple[str, str]) -> None:
    missing = [pkg for cmd, pkg in commands_and_packages if not shutil.which(cmd)]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# -- what is measured --------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    tool: str
    values: dict[str, float | str] = field(default_factory=dict)


@dataclass
class Proc:
    """A mount process, for its CPU seconds and peak RSS."""

    pid: int

    def cpu(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")


class AccessLog:
    """nginx's access log, read from a mark: one line per request, its bytes sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mark = 0

    def mark(self) -> None:
        self._mark = self.path.stat().st_size if self.path.exists() else 0

    def since(self) -> tuple[int, int]:
        """(GETs, body bytes) since the mark, probes of one byte excluded."""
        with open(self.path, "rb") as f:
            f.seek(self._mark)
            lines = f.read().decode().splitlines()
        sent = [int(line.split()[2]) for line in lines if line.startswith("GET")]
        data = [n for n in sent if n > 1]
        return len(data), sum(data)


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with open("/proc/mounts") as f:
            if any(line.split()[1] == str(path) for line in f):
                return
        if proc.poll() is not None:
            raise SystemExit(f"the mount at {path} exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"{path} not mounted after {deadline} s")


@contextlib.contextmanager
def mounted(argv: list[str], path: Path) -> Iterator[Proc]:
    path.mkdir(exist_ok=True)
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(path, proc)
        yield Proc(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def random_reads(path: Path, offsets: list[int], buffered: bool) -> list[float]:
    latencies = []
    with open(path, "rb", buffering=-1 if buffered else 0) as f:
        for offset in offsets:
            start = time.perf_counter()
            if buffered:
                f.seek(offset)
                f.read(128 * 1024)
            else:
                os.pread(f.fileno(), 128 * 1024, offset)
            latencies.append(time.perf_counter() - start)
    return latencies


def parallel_cats(paths: list[Path]) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(["cat", str(p)], stdout=subprocess.DEVNULL) for p in paths]
    for p in procs:
        p.wait()
    return time.perf_counter() - start


# -- the bench ---------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, size_mib: int, quick: bool) -> None:
        self.work = work
        self.size = size_mib * MiB
        self.part = max(16, size_mib // READERS) * MiB
        self.capped_size = (64 if quick else 256) * MiB
        self.rows: list[Row] = []
        self.root = work / "www"
        self.log = AccessLog(work / "access.log")
        self.ca = trustme.CA()
        self.ca_file = work / "ca.pem"
        # Ports nothing else uses now (fixed ones failed when something else had them).
        self.port, self.capped_port = free_port(), free_port()

    # setting up

    def make_files(self) -> None:
        folder = self.root / JOB
        folder.mkdir(parents=True)
        rng = random.Random(1)
        self.csv = b"".join(b"%d,Lead %d,%s,%s\n" % (i, i, rng.randbytes(8).hex().encode(),
                                                      b"open" if i % 3 else b"won")
                            for i in range(60000))
        self.big_csv = b"".join(b"%d,Note %d,%s,%s\n" % (i, i, rng.randbytes(12).hex().encode(),
                                                          rng.choice([b"call", b"demo", b"quote"]))
                                for i in range(220000))
        with zipfile.ZipFile(folder / "Data_001.zip", "w") as z:
            half = max(1, (self.size - 2 * MiB) // (32 * MiB) // 2)
            for i in range(2 * half):
                if i == half:  # the small member sits in the middle of the part
                    z.writestr(MEMBER, self.csv, compress_type=zipfile.ZIP_DEFLATED)
                    z.writestr(BIG_CSV, self.big_csv, compress_type=zipfile.ZIP_DEFLATED)
                z.writestr(f"Attachments/{i:04}.bin", os.urandom(16 * MiB))
                z.writestr(f"Attachments/{i:04}b.bin", os.urandom(16 * MiB))
            self.compressed = z.getinfo(MEMBER).compress_size
            self.stored = z.getinfo(STORED).compress_size
        self.size = (folder / "Data_001.zip").stat().st_size
        for i in range(1, READERS + 1):
            (folder / f"Attachments_{i:03}.zip").write_bytes(os.urandom(self.part))
        (folder / "Attachments_099.zip").write_bytes(os.urandom(self.capped_size))

    @contextlib.contextmanager
    def nginx(self) -> Iterator[None]:
        cert = self.ca.issue_cert("127.0.0.1")
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.work / "server.pem"))
        w = self.work
        servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port} ssl; {limit}
    ssl_certificate {w}/server.pem; ssl_certificate_key {w}/server.pem;
    root {self.root}; autoindex on;
  }}""" for port, limit in ((self.port, ""), (self.capped_port, f"limit_rate {CAP};")))
        (w / "nginx.conf").write_text(f"""
daemon off; worker_processes 2; pid {w}/nginx.pid; error_log {w}/error.log;
events {{ worker_connections 512; }}
http {{
  log_format bench '$request_method $status $body_bytes_sent "$http_range"';
  access_log {w}/access.log bench; sendfile on; keepalive_requests 100000;{servers}
}}
""")
        nginx = subprocess.Popen(["nginx", "-c", str(w / "nginx.conf"), "-p", str(w)])
        try:
            deadline = time.monotonic() + 10
            while subprocess.run(["curl", "-sf", "-o", "/dev/null", "--cacert",
                                  str(self.ca_file), self.url("Attachments_001.zip")],
                                 check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise SystemExit("nginx did not start")
                time.sleep(0.1)
            yield
        finally:
            nginx.terminate()
            nginx.wait()

    def url(self, name: str, port: int | None = None) -> str:
        return f"https://127.0.0.1:{port or self.port}/{JOB}/{name}"

    def zohofs(self, links: list[str], *extra: str, ca: Path | None = None,
               name: str = "mnt-zohofs") -> contextlib.AbstractContextManager[Proc]:
        token = self.work / "token"
        token.write_text("bench-token")
        token.chmod(0o600)
        hosts = {link.split("/")[2] for link in links}
        argv = [sys.executable, "-m", "zohofs", "mount", str(self.work / name),
                "--access-token-file", str(token), "--ca-file", str(ca or self.ca_file),
                *[a for h in hosts for a in ("--trust-host", h)],
                *[a for link in links for a in ("--link", link)], *extra]
        return mounted(argv, self.work / name)

    def rclone(self, port: int | None = None,
               *extra: str) -> contextlib.AbstractContextManager[Proc]:
        path = self.work / "mnt-rclone"
        return mounted(["rclone", "mount", ":http:", str(path), "--http-url",
                        f"https://127.0.0.1:{port or self.port}", "--ca-cert",
                        str(self.ca_file), "--read-only", *extra], path)

    def zpath(self, name: str) -> Path:
        return self.work / "mnt-zohofs" / "1" / "2" / name

    def rpath(self, name: str) -> Path:
        return self.work / "mnt-rclone" / JOB / name

    def add(self, scenario: str, tool: str, **values: float | str) -> None:
        self.rows.append(Row(scenario, tool, values))
        shown = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in values.items())
        print(f"{scenario:28} {tool:22} {shown}", flush=True)

    # the scenarios

    def cold_copy(self) -> None:
        """(a): cold cat of the 1 GiB part; throughput, CPU per GiB, peak RSS."""
        gib = self.size / (1 << 30)
        wall, cpu = timed(["curl", "-sf", "--cacert", str(self.ca_file), "-o", "/dev/null",
                           self.url("Data_001.zip")])
        self.add("a cold 1 GiB", "curl", gbps=self.size / wall / 1e9, cpu_per_gib=cpu / gib)
        for tool, extra in (("zohofs", ()), ("zohofs --page-cache", ("--page-cache",))):
            with self.zohofs([self.url("Data_001.zip")], *extra) as proc:
                os.stat(self.zpath("Data_001.zip"))
                cpu0 = proc.cpu()
                self.log.mark()
                wall, _ = timed(["cat", str(self.zpath("Data_001.zip"))])
                gets, sent = self.log.since()
                self.add("a cold 1 GiB", tool, gbps=self.size / wall / 1e9,
                         cpu_per_gib=(proc.cpu() - cpu0) / gib, peak_rss_mib=proc.peak_rss_mib(),
                         gets=float(gets), fetched_ratio=sent / self.size)
        with self.rclone() as proc:
            os.stat(self.rpath("Data_001.zip"))
            cpu0 = proc.cpu()
            wall, _ = timed(["cat", str(self.rpath("Data_001.zip"))])
            self.add("a cold 1 GiB", "rclone mount", gbps=self.size / wall / 1e9,
                     cpu_per_gib=(proc.cpu() - cpu0) / gib, peak_rss_mib=proc.peak_rss_mib())

    def disk(self) -> None:
        """(g): the disk cache. A cold copy with it on (it writes behind), a re-read after
        a remount (from the device), and the same whole-part question twice through a
        memory cache smaller than the part (bytes fetched the second time, and the speed
        once the page cache holds the chunk file); the disk's own speed, and rclone with
        its VFS cache on disk, remounted the same way, beside it."""
        link = [self.url("Data_001.zip")]
        disk = self.work / "zohofs-disk"
        args = ("--cache-dir", str(disk), "--cache-dir-size", f"{self.size // MiB + 64}M",
                "--cache-size", "64")
        with self.zohofs(link, "--cache-size", "64"):  # the same copy without, to compare
            os.stat(self.zpath("Data_001.zip"))
            wall, _ = timed(["cat", str(self.zpath("Data_001.zip"))])
            self.add("g cold 1 GiB, disk cache on", "zohofs, no disk cache",
                     gbps=self.size / wall / 1e9)
        for first in (True, False):
            with self.zohofs(link, *args):
                os.stat(self.zpath("Data_001.zip"))
                self.log.mark()
                wall, _ = timed(["cat", str(self.zpath("Data_001.zip"))])
                gets, sent = self.log.since()
                self.add("g cold 1 GiB, disk cache on" if first else "g re-read after a remount",
                         "zohofs --cache-dir", gbps=self.size / wall / 1e9, gets=float(gets),
                         mb_fetched=sent / 1e6)
                if not first:  # the same question again, within one mount
                    self.log.mark()
                    wall, _ = timed(["cat", str(self.zpath("Data_001.zip"))])
                    gets, sent = self.log.since()
                    self.add("g the question again, 64 MiB of memory", "zohofs --cache-dir",
                             gbps=self.size / wall / 1e9, gets=float(gets),
                             mb_fetched=sent / 1e6)
        # What the disk itself gives: its chunk file read with O_DIRECT (past the page
        # cache, as the re-read after a remount finds it: chunks are written directly).
        chunks = max(disk.rglob("*.chunks"), key=lambda p: p.stat().st_size)
        wall, _ = timed(["dd", f"if={chunks}", "of=/dev/null", "bs=8M", "iflag=direct",
                         "status=none"])
        self.add("g re-read after a remount", "dd iflag=direct of the chunk file",
                 gbps=self.size / wall / 1e9)
        # Over a link of 20 MB/s per connection, as Zoho's are: does writing to disk slow
        # a cold copy when the network, not the machine, is the limit?
        capped = [self.url("Attachments_099.zip", self.capped_port)]
        for extra in ((), ("--cache-dir", str(self.work / "zohofs-disk-capped"))):
            with self.zohofs(capped, "--cache-size", "64", *extra):
                os.stat(self.zpath("Attachments_099.zip"))
                wall, _ = timed(["cat", str(self.zpath("Attachments_099.zip"))])
                self.add("g cold, capped nginx", "zohofs --cache-dir" if extra
                         else "zohofs, no disk cache", gbps=self.capped_size / wall / 1e9)
        rclone_args = ("--vfs-cache-mode", "full", "--vfs-cache-max-size",
                       f"{self.size // MiB + 64}M", "--cache-dir", str(self.work / "rclone-disk"))
        for first in (True, False):
            with self.rclone(None, *rclone_args):
                self.log.mark()
                wall, _ = timed(["cat", str(self.rpath("Data_001.zip"))])
                gets, sent = self.log.since()
                self.add("g cold 1 GiB, disk cache on" if first else "g re-read after a remount",
                         "rclone mount --vfs-cache-mode full", gbps=self.size / wall / 1e9,
                         gets=float(gets), mb_fetched=sent / 1e6)

    def capped(self) -> None:
        """(b): 20 MB/s per connection, from nginx; and from the emulator with latency."""
        name = "Attachments_099.zip"
        wall, _ = timed(["curl", "-sf", "--cacert", str(self.ca_file), "-o", "/dev/null",
                         self.url(name, self.capped_port)])
        self.add("b capped nginx", "curl", gbps=self.capped_size / wall / 1e9)
        with self.zohofs([self.url(name, self.capped_port)]):
            wall, _ = timed(["cat", str(self.zpath(name))])
            self.add("b capped nginx", "zohofs", gbps=self.capped_size / wall / 1e9)
        with self.rclone(self.capped_port):
            wall, _ = timed(["cat", str(self.rpath(name))])
            self.add("b capped nginx", "rclone mount", gbps=self.capped_size / wall / 1e9)
        with Emulator(tls=True, tokens={"bench-token"}) as emulator:
            emulator.add_file("1", "2", name, (self.root / JOB / name).read_bytes())
            emulator.latency, emulator.rate = LATENCY, CAP
            assert emulator.ca_path is not None
            link = f"{emulator.base_url}/{JOB}/{name}"
            wall, _ = timed(["curl", "-sf", "--cacert", emulator.ca_path, "-o", "/dev/null",
                             "-H", "Authorization: Zoho-oauthtoken bench-token", link])
            self.add("b capped emulator +30ms", "curl", gbps=self.capped_size / wall / 1e9)
            with self.zohofs([link], ca=Path(emulator.ca_path)):
                wall, _ = timed(["cat", str(self.zpath(name))])
                self.add("b capped emulator +30ms", "zohofs",
                         gbps=self.capped_size / wall / 1e9)
            with self.zohofs([link], ca=Path(emulator.ca_path)):  # cold again
                os.stat(self.zpath(name))
                offsets = random.Random(3).sample(range(self.capped_size - 128 * 1024), 30)
                latencies = random_reads(self.zpath(name), offsets, buffered=False)
            self.add("b random pread +30ms", "zohofs",
                     median_ms=statistics.median(latencies) * 1e3)

    def random(self) -> None:
        """(c): 100 random 128 KiB reads, through Python's buffered open() and pread."""
        offsets = random.Random(2).sample(range(self.size - 128 * 1024), 100)
        for buffered in (True, False):
            scenario = f"c random {'buffered' if buffered else 'pread'}"
            for tool, mount, path in (("zohofs", self._zohofs_big, self.zpath),
                                      ("rclone mount", self.rclone, self.rpath)):
                with mount():
                    os.stat(path("Data_001.zip"))
                    self.log.mark()
                    latencies = sorted(random_reads(path("Data_001.zip"), offsets, buffered))
                    gets, sent = self.log.since()
                self.add(scenario, tool, gets_per_read=gets / 100, mb_per_read=sent / 100 / 1e6,
                         median_ms=statistics.median(latencies) * 1e3,
                         p90_ms=latencies[89] * 1e3)

    def _zohofs_big(self) -> contextlib.AbstractContextManager[Proc]:
        return self.zohofs([self.url("Data_001.zip")])

    def unzip(self) -> None:
        """(d): unzip -l, and extracting one small member, of the 1 GiB part."""
        for tool, mount, path in (("zohofs", self._zohofs_big, self.zpath),
                                  ("rclone mount", self.rclone, self.rpath)):
            with mount():
                os.stat(path("Data_001.zip"))
                for what, argv in (("d unzip -l", ["unzip", "-l"]),
                                   ("d unzip one member", ["unzip", "-p"])):
                    self.log.mark()
                    args = [*argv, str(path("Data_001.zip"))]
                    wall, _ = timed(args + ([MEMBER] if argv[1] == "-p" else []))
                    gets, sent = self.log.since()
                    self.add(what, tool, gets=float(gets), mb=sent / 1e6, seconds=wall)
        print(f"(the member is {self.compressed / 1e6:.2f} MB compressed)")

    def stopping(self) -> None:
        """(i): readers that stop where their interest ends: eight `dd` readers of distinct
        eighths of the 1 GiB part at once; then, in a new mount, `unzip -p` of one 16 MiB
        stored member of it (after `unzip -l`, as a user finds it)."""
        big = "Data_001.zip"
        region = self.size // READERS // MiB
        for tool, mount, path in (("zohofs", self._zohofs_big, self.zpath),
                                  ("rclone mount", self.rclone, self.rpath)):
            with mount():
                os.stat(path(big))
                self.log.mark()
                readers = [subprocess.Popen(
                    ["dd", f"if={path(big)}", "of=/dev/null", "bs=1M", f"skip={i * region}",
                     f"count={region}", "status=none"]) for i in range(READERS)]
                assert all(r.wait() == 0 for r in readers)
                gets, sent = self.log.since()
                self.add("i 8 dd readers, an eighth each", tool,
                         fetched_ratio=sent / (READERS * region * MiB), gets=float(gets))
            with mount():
                subprocess.run(["unzip", "-l", str(path(big))], stdout=subprocess.DEVNULL,
                               check=True)
                self.log.mark()
                timed(["unzip", "-p", str(path(big)), STORED])
                gets, sent = self.log.since()
                self.add("i unzip -p of a 16 MiB member", tool, gets=float(gets),
                         mb_past_member=(sent - self.stored) / 1e6)

    def expand(self) -> None:
        """(h): one 10 MB CSV out of the 1 GiB part through --expand, against what a user
        does without it (curl the part, then unzip -p); random reads inside it."""
        part = self.work / "part.zip"
        self.log.mark()
        download, _ = timed(["curl", "-sf", "--cacert", str(self.ca_file), "-o", str(part),
                             self.url("Data_001.zip")])
        extract, _ = timed(["unzip", "-p", str(part), BIG_CSV])
        gets, sent = self.log.since()
        part.unlink()
        scenario = f"h one {len(self.big_csv) / 1e6:.0f} MB CSV"
        self.add(scenario, "curl + unzip -p", seconds=download + extract, mb=sent / 1e6,
                 gets=float(gets))
        link = [self.url("Data_001.zip")]
        csv = self.zpath("Data_001") / BIG_CSV
        with self.zohofs(link, "--expand") as proc:
            os.stat(self.zpath("Data_001.zip"))
            self.log.mark()
            wall, _ = timed(["cat", str(csv)])
            gets, sent = self.log.since()
            self.add(scenario, "zohofs --expand", seconds=wall, mb=sent / 1e6,
                     gets=float(gets), peak_rss_mib=proc.peak_rss_mib())
        # Random reads, cold, with a cache that holds the inflated CSV and with one too
        # small for it: then each read inflates from the nearest checkpoint.
        for tool, extra in (("zohofs --expand", ()),
                            ("zohofs --expand, 4 MiB cache",
                             ("--cache-size", "4", "--block-size", "1M"))):
            with self.zohofs(link, "--expand", *extra):
                root = self.work / "mnt-zohofs"
                os.stat(csv)
                before = json.loads(os.getxattr(root, "user.zohofs.status"))["bytes_inflated"]
                offsets = random.Random(4).sample(range(len(self.big_csv) - 128 * 1024), 30)
                latencies = sorted(random_reads(csv, offsets, buffered=False))
                after = json.loads(os.getxattr(root, "user.zohofs.status"))["bytes_inflated"]
                self.add("h random pread in the CSV", tool,
                         median_ms=statistics.median(latencies) * 1e3,
                         p90_ms=latencies[26] * 1e3,
                         mb_inflated_per_read=(after - before) / 30 / 1e6)

    def readers(self) -> None:
        """(e): eight sequential readers at once, one part each."""
        names = [f"Attachments_{i:03}.zip" for i in range(1, READERS + 1)]
        total = READERS * self.part
        with self.zohofs([self.url(n) for n in names]) as proc:
            for n in names:
                os.stat(self.zpath(n))
            self.log.mark()
            wall = parallel_cats([self.zpath(n) for n in names])
            gets, sent = self.log.since()
            self.add("e 8 readers", "zohofs", gbps=total / wall / 1e9, fetched_ratio=sent / total,
                     gets=float(gets), peak_rss_mib=proc.peak_rss_mib())
        with self.rclone():
            for n in names:
                os.stat(self.rpath(n))
            self.log.mark()
            wall = parallel_cats([self.rpath(n) for n in names])
            gets, sent = self.log.since()
            self.add("e 8 readers", "rclone mount", gbps=total / wall / 1e9,
                     fetched_ratio=sent / total, gets=float(gets))

    def warm(self) -> None:
        """(f): the second read of a file, each tool with a cache that holds it (zohofs's
        block cache, the page cache, rclone's VFS cache on disk) and rclone with its
        defaults (no cache of file contents) as well."""
        cache = str(self.size // MiB + 64)
        link = [self.url("Data_001.zip")]
        mounts: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Proc]],
                           Callable[[str], Path]]] = [
            (f"zohofs --cache-size {cache}",
             lambda: self.zohofs(link, "--cache-size", cache), self.zpath),
            ("zohofs --page-cache", lambda: self.zohofs(link, "--page-cache"), self.zpath),
            ("rclone mount --vfs-cache-mode full",
             lambda: self.rclone(None, "--vfs-cache-mode", "full", "--vfs-cache-max-size",
                                 f"{cache}M", "--cache-dir", str(self.work / "rclone-cache")),
             self.rpath),
            ("rclone mount", self.rclone, self.rpath)]
        for tool, mount, path in mounts:
            with mount():
                timed(["cat", str(path("Data_001.zip"))])
                wall, _ = timed(["cat", str(path("Data_001.zip"))])
                self.add("f warm re-read", tool, gbps=self.size / wall / 1e9)


def write_report(bench: Bench, out: Path) -> None:
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`bench/scoreboard.py`); numbers from one run on one "
             "machine, all tools against the same servers in the same run. Compare ratios "
             "within the table, not with other machines.", "",
             f"Machine: {os.cpu_count()} cores, Linux; run {time.strftime('%Y-%m-%d')}. "
             "gbps: GB/s read by the client; cpu_per_gib: CPU seconds of the mount process "
             "(of curl itself for curl) per GiB; peak_rss_mib: the mount process's peak RSS; "
             "gets and bytes fetched from the server's log.", ""]
    scenarios: dict[str, list[Row]] = {}
    for row in bench.rows:
        scenarios.setdefault(row.scenario, []).append(row)
    for scenario, rows in scenarios.items():
        rclone = next((r for r in rows if r.tool == "rclone mount"), None)
        for r in rows:  # the ratio people ask for first
            if rclone and r is not rclone and isinstance(r.values.get("gbps"), float):
                r.values["x_rclone"] = float(r.values["gbps"]) / float(rclone.values["gbps"])
        keys = list(dict.fromkeys(k for r in rows for k in r.values))
        lines += [f"### {scenario}", "", "| tool | " + " | ".join(keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for r in rows:
            cells = [f"{r.values[k]:.3g}" if isinstance(r.values.get(k), float)
                     else str(r.values.get(k, "")) for k in keys]
            lines.append(f"| {r.tool} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![throughput and latency](benchmarks.png)", ""]
    out.write_text("\n".join(lines))
    chart(bench.rows, out.with_suffix(".png"))


def tool_colours(tools: list[str]) -> dict[str, str]:
    """One colour per tool in every panel: zohofs's modes in blues, rclone's in oranges,
    curl grey."""
    families = {"zohofs": ["#1f4e9c", "#4a86e8", "#9fc5f8", "#0b2a5c", "#3d6fb6", "#6fa8dc",
                           "#c9daf8", "#2b3f6b"],
                "rclone": ["#e69138", "#f6b26b", "#b45f06"], "curl": ["#777777", "#aaaaaa"]}
    colours: dict[str, str] = {}
    for tool in dict.fromkeys(tools):
        family = next((f for f in families if tool.startswith(f)), "curl")
        taken = sum(1 for t in colours if t.startswith(family))
        colours[tool] = families[family][taken % len(families[family])]
    return colours


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for axis, metric, title in ((left, "gbps", "throughput, GB/s (higher is better)"),
                                (right, "median_ms", "median random read, ms (lower is better)")):
        chosen = [r for r in rows if isinstance(r.values.get(metric), float)
                  and not r.scenario.startswith("b random")]  # zohofs alone: no bar to compare
        scenarios = list(dict.fromkeys(r.scenario for r in chosen))
        tools = list(dict.fromkeys(r.tool for r in chosen))
        width = 0.8 / max(1, len(tools))
        colours = tool_colours([r.tool for r in rows])
        for t, tool in enumerate(tools):
            xs, ys = [], []
            for s, scenario in enumerate(scenarios):
                for r in chosen:
                    if r.scenario == scenario and r.tool == tool:
                        xs.append(s + t * width)
                        ys.append(float(r.values[metric]))
            axis.bar(xs, ys, width, label=tool, color=colours[tool])
        axis.set_xticks([s + width * (len(tools) - 1) / 2 for s in range(len(scenarios))])
        axis.set_xticklabels(scenarios, rotation=20, ha="right", fontsize=8)
        axis.set_title(title)
        axis.legend(fontsize=8)
        if metric == "gbps":  # 20 MB/s and 5 GB/s on one chart
            axis.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big part")
    parser.add_argument("--quick", action="store_true", help="smaller capped runs")
    parser.add_argument("--only", default="", help="comma-separated scenarios: a to i")
    parser.add_argument("--report", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    need(("nginx", "nginx"), ("rclone", "rclone"), ("curl", "curl"), ("unzip", "unzip"))
    work = Path(tempfile.mkdtemp(prefix="zohofs-bench-"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user
    bench = Bench(work, args.size_mib, args.quick)
    steps: dict[str, Callable[[], None]] = {
        "a": bench.cold_copy, "b": bench.capped, "c": bench.random, "d": bench.unzip,
        "e": bench.readers, "f": bench.warm, "g": bench.disk, "h": bench.expand,
        "i": bench.stopping}
    only = [s for s in args.only.split(",") if s] or list(steps)
    try:
        bench.make_files()
        with bench.nginx():
            for key in only:
                steps[key]()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.only:
        write_report(bench, args.report)
        print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
