"""The emulated download host: Range, validators, Zoho's errors, a request log and faults.

Runs in a background thread so that tests can script faults and read the log in-process
while a mount in another process talks to it over a real socket.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import hashlib
import json
import logging
import mmap
import os
import random
import re
import secrets
import select
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from zohofs.emulator.backup import Backup

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_FILE_PATH = re.compile(r"^/v2/crm/(\d+)/backup/(\d+)/([^/]+)$")
_API_PATH = re.compile(r"^/crm/bulk/v\d+/backup(/urls|/history|)$")
# The emulated backups "completed" at this time; links expire 7 days later.
DEFAULT_LAST_MODIFIED = 1795230900.0  # 2026-11-21T03:15:00Z


@dataclass
class ServedFile:
    data: bytes | mmap.mmap
    etag: str
    last_modified: float
    validators: bool = True  # False: send neither ETag nor Last-Modified


FAULT_KINDS = frozenset({
    "status", "delay", "reset", "truncate", "ignore_range", "wrong_range", "wrong_length",
    "gzip", "html", "drip", "silent", "big_headers", "hang_up", "chunked", "bad_chunk",
    "headers"})


@dataclass
class Fault:
    """Something to do instead of (or on top of) a normal answer.

    kinds:

    - ``status``: answer ``status``/``reason`` with ``headers`` (a 302 with ``Location``
      makes a redirect)
    - ``delay``: wait ``seconds``, then answer normally
    - ``reset``: send half the body, then drop the connection with a RST
    - ``truncate``: promise the whole body, send half, close
    - ``hang_up``: close the connection without answering
    - ``ignore_range``: answer 200 with the whole file
    - ``wrong_range``: a Content-Range one byte off
    - ``wrong_length``: a Content-Length (and body) one byte short of the range
    - ``gzip``: the range gzip-compressed, with ``Content-Encoding: gzip``
    - ``html``: 200 with a small HTML page (a proxy's error or login page)
    - ``drip``: the right headers, then the body a few bytes every ``seconds``
    - ``silent``: read the request and never answer (until the emulator stops)
    - ``big_headers``: a header line longer than any client accepts
    - ``chunked``: the body with ``Transfer-Encoding: chunked`` instead of a length
    - ``bad_chunk``: a chunked body whose first chunk size is not a number
    - ``headers``: a normal answer with ``headers`` put over its own

    ``status`` and ``headers`` waits ``seconds`` before answering; any kind but ``status``
    sends ``headers`` over those of its answer.

    ``count`` is how many matching requests it applies to; None means forever.
    """

    kind: str
    status: int = 500
    reason: str = "INTERNAL_ERROR"
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    path: str | None = None
    count: int | None = 1


@dataclass
class _Chaos:
    rate: float
    faults: list[Fault]
    rng: random.Random
    served: dict[str, int] = field(default_factory=dict)  # faults served, by kind


@dataclass
class EmulatedAccount:
    """A Zoho org with one self-client and its refresh token."""

    client_id: str
    client_secret: str
    refresh_token: str
    zgid: str
    refreshes: list[float] = field(default_factory=list)  # monotonic times, for the throttle


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int


class Emulator:
    """Zoho's download host on a loopback socket (TLS optional)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: bool = False,
                 tokens: set[str] | None = None, ca_path: str | None = None) -> None:
        self.tokens: set[str] = set(tokens or {"emulator-token"})
        self.files: dict[str, ServedFile] = {}
        self.requests: list[Request] = []
        self.arrived: list[str] = []  # paths as requests arrive, before any answer
        # Accounts host: refresh tokens -> accounts, one-time grant codes -> refresh tokens.
        self.accounts: dict[str, EmulatedAccount] = {}
        self.grant_codes: dict[str, str] = {}
        self.access_tokens: dict[str, tuple[str, float]] = {}  # token -> (zgid, expires)
        self.issued: list[str] = []  # every access token handed out, in order
        self.token_lifetime = 3600
        self.throttle_limit = 10  # refreshes per refresh token per window, as Zoho
        self.throttle_window = 600.0
        self.legacy_expiry = False  # answer expires_in_sec + expires_in in milliseconds
        # API host: the current job per org; orgs with no backup answer 204.
        self.current_job: dict[str, str] = {}
        self.no_backup: set[str] = set()
        self.listing_override: tuple[int, bytes] | None = None  # a scripted raw answer
        self.links_expire = datetime.now(UTC).replace(microsecond=0) + timedelta(days=6)
        self.faults: list[Fault] = []
        self.chaos: _Chaos | None = None
        # Kept-alive connections idle longer than this are closed by the server (nginx
        # does after 75 s); None keeps them open. ``idle_closed`` counts those closes.
        self.idle_timeout: float | None = None
        self.idle_closed = 0
        self.stopping = threading.Event()  # wakes ``silent`` and ``drip`` answers
        # The internet's shape on loopback: a wait before each answer's first byte, and a
        # cap on each connection's byte rate (None: as fast as loopback goes).
        self.latency = 0.0
        self.rate: float | None = None
        self.body_bytes = 0  # file body bytes sent, faults included
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.emulator = self
        self.ca_path: str | None = None
        self._own_ca = False  # a CA file made here, removed by close()
        if tls:
            import trustme  # only the TLS mode needs it

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(ctx)
            self._server.ssl_context = ctx
            if ca_path is None:  # one of its own: two emulators of a process never share
                fd, ca_path = tempfile.mkstemp(prefix="zohofs-emulator-ca-", suffix=".pem")
                os.close(fd)
                self._own_ca = True
            self.ca_path = ca_path
            ca.cert_pem.write_to_path(self.ca_path)
        address = self._server.server_address
        self.host, self.port = str(address[0]), int(address[1])
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self._server.ssl_context else "http"
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"{scheme}://{host}:{self.port}"

    # -- content -----------------------------------------------------------------------

    def add_file(self, zgid: str, job_id: str, name: str, data: bytes | mmap.mmap,
                 last_modified: float = DEFAULT_LAST_MODIFIED, etag: str | None = None,
                 validators: bool = True) -> str:
        path = f"/v2/crm/{zgid}/backup/{job_id}/{name}"
        if etag is None:
            etag = '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'
        self.files[path] = ServedFile(data, etag, last_modified, validators)
        return self.base_url + path

    def add_backup(self, backup: Backup) -> list[str]:
        """Serve a backup's files; it becomes its org's current backup."""
        links = [self.add_file(backup.zgid, backup.job_id, name, data)
                 for name, data in sorted(backup.files.items())]
        self.current_job[backup.zgid] = backup.job_id  # whole, as Zoho's answer switches
        return links

    def add_account(self, zgid: str, client_id: str | None = None,
                    client_secret: str | None = None,
                    refresh_token: str | None = None) -> EmulatedAccount:
        account = EmulatedAccount(
            client_id or f"1000.{secrets.token_hex(12).upper()}",
            client_secret or secrets.token_hex(20),
            refresh_token or f"1000.{secrets.token_hex(16)}.{secrets.token_hex(16)}", zgid)
        self.accounts[account.refresh_token] = account
        return account

    def add_grant_code(self, account: EmulatedAccount) -> str:
        code = f"1000.{secrets.token_hex(16)}.{secrets.token_hex(16)}"
        self.grant_codes[code] = account.refresh_token
        return code

    def expire_access_tokens(self) -> None:
        """Every access token handed out so far stops working (as after an hour)."""
        for token, (zgid, _) in list(self.access_tokens.items()):
            self.access_tokens[token] = (zgid, 0.0)

    def listing(self, zgid: str) -> dict[str, object]:
        job = self.current_job[zgid]
        prefix = f"/v2/crm/{zgid}/backup/{job}/"
        # A copy first (atomic): a test may add files while the server thread lists.
        names = sorted(p[len(prefix):] for p in list(self.files) if p.startswith(prefix))
        offset = timezone(timedelta(hours=5, minutes=30))  # Zoho's samples use IST
        return {"urls": {
            "data_links": [self.base_url + prefix + n for n in names if n.startswith("Data_")],
            "attachment_links": [self.base_url + prefix + n for n in names
                                 if n.startswith("Attachments_")],
            "expiry_date": self.links_expire.astimezone(offset).isoformat()}}

    def add_data_dir(self, root: Path) -> list[str]:
        """Serve every file under ``root/v2/crm/<zgid>/backup/<job>/``."""
        links = []
        for path in sorted(root.glob("v2/crm/*/backup/*/*")):
            m = _FILE_PATH.match("/" + path.relative_to(root).as_posix())
            if not m or not path.is_file():
                continue
            st = path.stat()
            with open(path, "rb") as f:
                data: bytes | mmap.mmap = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                                           if st.st_size else b"")
            links.append(self.add_file(m[1], m[2], m[3], data, st.st_mtime,
                                       f'"{st.st_size:x}-{int(st.st_mtime):x}"'))
            # The highest job id of an org is its current backup (Zoho's ids grow).
            if int(m[2]) >= int(self.current_job.get(m[1], "0")):
                self.current_job[m[1]] = m[2]
        return links

    def replace(self, url_or_path: str, data: bytes) -> None:
        """Swap a file's content for a new version (new ETag and Last-Modified)."""
        path = "/" + url_or_path.split("/", 3)[-1] if "://" in url_or_path else url_or_path
        old = self.files[path]
        etag = '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'
        self.files[path] = ServedFile(data, etag, old.last_modified + 3600, old.validators)

    # -- faults and log ----------------------------------------------------------------

    def add_fault(self, kind: str, **kwargs: Any) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r} (one of {', '.join(sorted(FAULT_KINDS))})")
        fault = Fault(kind, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.path is None or fault.path in path:
                    if fault.count is not None:
                        fault.count -= 1
                        if fault.count <= 0:
                            self.faults.remove(fault)
                    return fault
            chaos = self.chaos
            if chaos is not None and _FILE_PATH.match(path) and chaos.rng.random() < chaos.rate:
                fault = chaos.rng.choice(chaos.faults)
                chaos.served[fault.kind] = chaos.served.get(fault.kind, 0) + 1
                return fault
        return None

    def start_chaos(self, rate: float, faults: list[Fault], seed: int = 0) -> None:
        """From now on a share ``rate`` of the download requests that no scripted fault
        matched get one of ``faults``, chosen at random (a soak's background noise)."""
        self.chaos = _Chaos(rate, faults, random.Random(seed))

    def gets(self, name: str | None = None) -> list[Request]:
        """Logged GETs, optionally only those for paths ending in ``name``."""
        return [r for r in list(self.requests)
                if r.method == "GET" and (name is None or r.path.endswith("/" + name))]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Emulator:
        self.stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="zohofs-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for sock in connections:  # kept-alive ones too: the server is gone
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop for good, and remove the CA file made for this emulator."""
        self.stop()
        if self._own_ca and self.ca_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ca_path)

    def restart(self) -> None:
        """Come back on the same address after :meth:`stop` (a server gone and back)."""
        server = _Server((self.host, self.port), _Handler)
        server.emulator = self
        server.ssl_context = self._server.ssl_context
        self._server = server
        self.start()

    def track(self, sock: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(sock)
            else:
                self._connections.discard(sock)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    emulator: Emulator
    ssl_context: ssl.SSLContext | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-request (zohofs aborting a request past its deadline)
        # are part of the game, not a server error worth a traceback.
        log.debug("connection from %s ended abruptly", client_address, exc_info=True)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the connection's own thread, so one slow
        # client cannot stall the accept loop.
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        self.emulator.track(request, True)
        try:
            super().finish_request(request, client_address)
        finally:
            self.emulator.track(request, False)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def handle(self) -> None:
        # BaseHTTPRequestHandler's loop, plus closing connections that stay idle too long.
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            if not self._wait_for_request():
                return
            self.handle_one_request()

    def _wait_for_request(self) -> bool:
        """False when the connection should close: idle past ``idle_timeout`` (read at
        every step, so a test can lower it while connections wait) or the server stops."""
        emu = self.server.emulator
        if isinstance(self.connection, ssl.SSLSocket) and self.connection.pending():
            return True
        since = time.monotonic()
        while not emu.stopping.is_set():
            try:
                readable, _, _ = select.select([self.connection], [], [], 0.05)
            except (OSError, ValueError):
                return False
            if readable:
                return True
            idle = emu.idle_timeout
            if idle is not None and time.monotonic() - since >= idle:
                with emu._lock:
                    emu.idle_closed += 1
                return False
        return False

    def _record(self, status: int) -> None:
        self.server.emulator.requests.append(
            Request(self.command, self.path, dict(self.headers.items()), status))

    def _send(self, status: int, body: bytes = b"", reason: str | None = None,
              headers: dict[str, str] | None = None) -> None:
        """A complete small answer (everything but file bodies), logged."""
        self._record(status)
        self.send_response(status, reason)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, body: object, reason: str | None = None,
              headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), reason, headers)

    def _error(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        # Zoho's shape; the download host also puts the code in the reason phrase.
        self._json(status, {"code": reason, "details": {}, "message": reason,
                            "status": "error"}, reason, headers)

    def _not_get(self) -> None:
        self._error(400, "INVALID_REQUEST_METHOD")

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_get

    def do_POST(self) -> None:
        emu = self.server.emulator
        emu.arrived.append(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        fault = emu._take_fault(self.path)
        if fault and fault.kind == "status":
            return self._error(fault.status, fault.reason, fault.headers)
        if self.path.split("?", 1)[0] != "/oauth/v2/token":
            return self._error(400, "INVALID_REQUEST_METHOD")
        self._token_endpoint(emu, form)

    def _token_endpoint(self, emu: Emulator, form: dict[str, str]) -> None:
        # Zoho answers most failures with HTTP 200 and an "error" key.
        grant = form.get("grant_type")
        if grant == "authorization_code":
            refresh = emu.grant_codes.pop(form.get("code", ""), None)
        elif grant == "refresh_token":
            refresh = form.get("refresh_token")
        else:
            return self._json(200, {"error": "unsupported_grant_type"})
        account = emu.accounts.get(refresh or "")
        if account is None:
            return self._json(200, {"error": "invalid_code"})
        if form.get("client_id") != account.client_id:
            return self._json(200, {"error": "invalid_client"})
        if form.get("client_secret") != account.client_secret:
            return self._json(200, {"error": "invalid_client_secret"})
        now = time.monotonic()
        with emu._lock:
            account.refreshes[:] = [t for t in account.refreshes
                                    if t > now - emu.throttle_window]
            if grant == "refresh_token" and len(account.refreshes) >= emu.throttle_limit:
                return self._json(400, {
                    "error": "Access Denied", "status": "failure",
                    "error_description": "You have made too many requests continuously. "
                                         "Please try again after some time."})
            if grant == "refresh_token":
                account.refreshes.append(now)
            token = f"1000.{secrets.token_hex(16)}.{secrets.token_hex(16)}"
            emu.access_tokens[token] = (account.zgid, now + emu.token_lifetime)
            emu.issued.append(token)
        body: dict[str, object] = {"access_token": token, "api_domain": emu.base_url,
                                   "token_type": "Bearer", "expires_in": emu.token_lifetime}
        if emu.legacy_expiry:
            body.update(expires_in_sec=emu.token_lifetime,
                        expires_in=emu.token_lifetime * 1000)
        if grant == "authorization_code":
            body["refresh_token"] = account.refresh_token
        self._json(200, body)

    def _token_zgid(self) -> tuple[str | None, bool]:
        """(org of the presented access token, whether it expired)."""
        emu = self.server.emulator
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme != "Zoho-oauthtoken":
            return None, False
        if token in emu.tokens:
            return "*", False
        zgid, expires = emu.access_tokens.get(token, (None, 0.0))
        if zgid is None:
            return None, False
        return (zgid, False) if time.monotonic() < expires else (None, True)

    def do_GET(self) -> None:
        emu = self.server.emulator
        emu.arrived.append(self.path)
        if emu.latency:
            emu.stopping.wait(emu.latency)
        fault = emu._take_fault(self.path)
        if fault and fault.kind in ("status", "delay", "headers") and fault.seconds:
            emu.stopping.wait(fault.seconds)
        if fault and fault.kind == "status":
            return self._error(fault.status, fault.reason, fault.headers)
        if fault and fault.kind == "hang_up":
            self.close_connection = True
            return
        if fault and fault.kind == "silent":
            emu.stopping.wait(fault.seconds or None)
            self.close_connection = True
            return
        if fault and fault.kind == "big_headers":
            self._record(200)
            self.send_response(200)
            self.send_header("X-Padding", "x" * 70000)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault and fault.kind == "html":
            page = b"<html><body><h1>Service temporarily unavailable</h1></body></html>"
            self._record(200)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=UTF-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        path = self.path.split("?", 1)[0]
        api = _API_PATH.match(path)
        if api:
            return self._api(emu, api[1])
        served = emu.files.get(path)
        if served is None:
            return self._error(401, "URL_RULE_NOT_CONFIGURED")
        zgid, expired = self._token_zgid()
        if expired:
            return self._error(401, "INVALID_OAUTHSCOPE", {
                "WWW-Authenticate": 'Zoho-oauthtoken error="expired_token"'})
        if zgid is None or zgid not in ("*", path.split("/")[3]):
            return self._error(401, "INVALID_OAUTHSCOPE")
        if datetime.now(UTC) >= emu.links_expire:
            return self._error(403, "FORBIDDEN")
        self._send_file(served, fault)

    def _api(self, emu: Emulator, what: str) -> None:
        zgid, _ = self._token_zgid()
        if zgid is None or zgid == "*":
            return self._json(401, {"code": "INVALID_TOKEN", "details": {},
                                    "message": "invalid oauth token", "status": "error"})
        if what == "/urls":
            if emu.listing_override is not None:
                return self._send(*emu.listing_override)
            if zgid in emu.no_backup or zgid not in emu.current_job:
                return self._send(204)
            return self._json(200, emu.listing(zgid))
        job = emu.current_job.get(zgid, "0")
        if what == "/history":
            return self._json(200, {"history": [{"id": job, "log_time": "2026-11-21T08:45:00+05:30",
                                                 "state": "COMPLETED", "repeat_type": "weekly"}],
                                    "info": {"per_page": 200, "count": 1, "page": 1,
                                             "more_records": False}})
        return self._json(200, {"backup": {"id": job, "status": "COMPLETED",
                                           "start_date": "2026-11-21T08:30:00+05:30",
                                           "rrule": "FREQ=WEEKLY;INTERVAL=1;BYDAY=SA"}})

    def _send_file(self, served: ServedFile, fault: Fault | None) -> None:
        size = len(served.data)
        last_modified = email.utils.formatdate(served.last_modified, usegmt=True)
        if_match = self.headers.get("If-Match")
        if if_match and if_match.strip() not in ("*", served.etag):
            return self._error(412, "PRECONDITION_FAILED")
        since = self.headers.get("If-Unmodified-Since")
        if since:
            try:
                when = email.utils.parsedate_to_datetime(since).timestamp()
            except (TypeError, ValueError):
                when = None
            if when is not None and int(served.last_modified) > int(when):
                return self._error(412, "PRECONDITION_FAILED")

        start, end = 0, size - 1
        status = 200
        m = _RANGE.match(self.headers.get("Range", "").strip())
        if m and not (fault and fault.kind == "ignore_range") and (m[1] or m[2]):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            else:
                start, end = max(0, size - int(m[2])), size - 1
            if start >= size or start > end:
                return self._error(416, "REQUESTED_RANGE_NOT_SATISFIABLE",
                                   {"Content-Range": f"bytes */{size}"})
            status = 206
        length = end - start + 1
        headers = {"Content-Type": "application/zip",
                   "Content-Disposition":
                       f'attachment; filename="{self.path.rsplit("/", 1)[-1]}"',
                   "Accept-Ranges": "bytes"}
        if served.validators:
            headers.update(ETag=served.etag, **{"Last-Modified": last_modified})
        if status == 206:
            shift = 1 if fault and fault.kind == "wrong_range" else 0
            headers["Content-Range"] = f"bytes {start + shift}-{end + shift}/{size}"
        body: bytes | memoryview = memoryview(served.data)[start:end + 1]
        if fault and fault.kind == "wrong_length":
            length -= 1
            body = body[:length]
        if fault and fault.kind == "gzip":
            body = gzip.compress(bytes(body))
            length = len(body)
            headers["Content-Encoding"] = "gzip"
        chunked = fault is not None and fault.kind in ("chunked", "bad_chunk")
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(length)
        headers.update(fault.headers if fault else {})
        self._record(status)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if fault and fault.kind == "drip":
            self._drip(body, fault.seconds or 0.2)
            return
        if chunked:
            assert fault is not None
            head = b"zz" if fault.kind == "bad_chunk" else b"%x" % len(body)
            self.wfile.write(head + b"\r\n" + bytes(body) + b"\r\n0\r\n\r\n")
            return
        if fault and fault.kind in ("reset", "truncate"):
            self.wfile.write(body[:length // 2])
            self.wfile.flush()
            if fault.kind == "reset":
                # SO_LINGER 0 makes close() send RST instead of FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            return
        try:
            self._write_body(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write_body(self, body: bytes | memoryview) -> None:
        emu = self.server.emulator
        rate = emu.rate
        # Paced in pieces of 1/50 s at the capped rate, so the cap holds over short spans.
        step = 1 << 20 if rate is None else max(4096, int(rate / 50))
        started = time.monotonic()
        for i in range(0, len(body), step):
            piece = body[i:i + step]
            self.wfile.write(piece)
            with emu._lock:
                emu.body_bytes += len(piece)
            if rate is not None:
                ahead = started + (i + len(piece)) / rate - time.monotonic()
                if ahead > 0 and emu.stopping.wait(ahead):
                    return

    def _drip(self, body: bytes | memoryview, interval: float) -> None:
        """A few bytes every ``interval``: each recv() gets something, so only an overall
        deadline ends the wait."""
        self.close_connection = True
        stopping = self.server.emulator.stopping
        try:
            for i in range(0, len(body), 16):
                self.wfile.write(body[i:i + 16])
                self.wfile.flush()
                if stopping.wait(interval):
                    return
        except OSError:
            return
