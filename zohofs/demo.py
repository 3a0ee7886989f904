"""The built-in emulator as a command, and the demo: a generated backup served by it,
signed in to, discovered and mounted exactly as against Zoho."""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from zohofs import config
from zohofs.auth import Credentials
from zohofs.config import Config, MiB, parse_size
from zohofs.lifecycle import check_mountpoint, serve
from zohofs.login import store_secret
from zohofs.tree import view_name


def _generated_backup(args: argparse.Namespace) -> Any:
    from zohofs.emulator.backup import generate

    return generate(seed=args.seed, size=parse_size(args.size),
                    part_size=parse_size(args.part_size))


def cmd_emulator(args: argparse.Namespace) -> int:
    from zohofs.emulator.server import Emulator

    # Blocked before the server threads start, so that only sigwait() below sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    emulator = Emulator(args.host, args.port, tls=args.tls, tokens={args.token},
                        ca_path=args.ca_out)
    emulator.token_lifetime = args.token_lifetime
    emulator.latency = args.latency
    emulator.rate = parse_size(args.rate) if args.rate else None
    links = (emulator.add_data_dir(args.data_dir) if args.data_dir
             else emulator.add_backup(_generated_backup(args)))
    print(emulator.base_url, flush=True)
    if emulator.ca_path:
        print(f"ca-file: {emulator.ca_path}", flush=True)
    accounts = []
    for zgid in sorted(emulator.current_job):
        account = emulator.add_account(zgid)
        accounts.append(account)
        print(f"account: zgid={zgid} client_id={account.client_id} "
              f"client_secret={account.client_secret} "
              f"refresh_token={account.refresh_token}", flush=True)
        # Grant codes, to rehearse `zohofs login --accounts-url ...` locally (each is
        # good once, as Zoho's are: a mistyped secret costs one).
        for _ in range(GRANT_CODES):
            print(f"grant-code: zgid={zgid} code={emulator.add_grant_code(account)}",
                  flush=True)
    for link in links:
        print(f"link: {link}", flush=True)
    with tempfile.TemporaryDirectory(prefix="zohofs-emulator-") as tmp:
        if accounts:
            print(f"config: {_write_config(emulator, accounts[0], Path(tmp))}", flush=True)
        emulator.start()
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            emulator.close()
    return 0


GRANT_CODES = 3


def _write_config(emulator: Any, account: Any, directory: Path) -> Path:
    """A config that `zohofs ls --config PATH` and `zohofs mount` use as they are."""
    path = directory / "config.toml"
    lines = [f'accounts_url = "{emulator.base_url}"', f'api_url = "{emulator.base_url}"',
             f'trust_hosts = ["{emulator.host}:{emulator.port}"]',
             f'client_id = "{account.client_id}"',
             f'client_secret = "{account.client_secret}"',
             f'refresh_token = "{account.refresh_token}"']
    if emulator.ca_path:
        lines.insert(2, f'ca_file = "{emulator.ca_path}"')
    store_secret(path, "\n".join(lines))
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    from zohofs.emulator.server import Emulator

    mountpoint = os.path.realpath(args.mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    check_mountpoint(mountpoint)
    with tempfile.TemporaryDirectory(prefix="zohofs-demo-") as tmp:
        # The demo's access tokens are the emulator's: nothing of them belongs in the
        # machine's state directory, where the real mount keeps its own.
        os.environ["STATE_DIRECTORY"] = os.path.join(tmp, "state")
        emulator = Emulator(tls=True, ca_path=os.path.join(tmp, "ca.pem"))
        backup = _generated_backup(args)
        emulator.add_backup(backup)
        account = emulator.add_account(backup.zgid)
        # The demo signs in and discovers exactly as against Zoho: refresh token, token
        # endpoint, backup URLs API, then ranged downloads.
        cfg = Config(
            mountpoint=mountpoint, ca_file=emulator.ca_path, debug=args.debug,
            expand=args.expand, cache_dir=args.cache_dir,
            trust_hosts=frozenset({f"{emulator.host}:{emulator.port}"}),
            accounts=(config.Account("demo", "us", emulator.base_url, emulator.base_url,
                                     Credentials(account.client_id,
                                                        account.client_secret,
                                                        account.refresh_token)),))

        async def show_tree() -> None:
            await trio.to_thread.run_sync(_print_tree, mountpoint, args.expand)

        with emulator:
            print(f"emulator: {emulator.base_url} (Zoho's accounts, API and download hosts; "
                  "TLS with a throw-away CA)")
            trio.run(serve, cfg, show_tree)
    return 0


def _print_tree(root: str, expand: bool) -> None:
    # Runs in a worker thread: the thread serving the mount must never touch it.
    print(f"\n{root}")
    for dirpath, dirnames, filenames in os.walk(root):  # top-down: pruned below
        dirnames.sort()
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        if dirpath != root:
            print("    " * (depth - 1) + os.path.basename(dirpath) + "/")
        folders = {view_name(f) for f in filenames}
        inside = [d for d in dirnames if d in folders]  # --expand's folders
        dirnames[:] = [d for d in dirnames if d not in inside]
        for name in inside:
            print("    " * depth + f"{name}/  (what {name}.zip holds)")
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            when = datetime.fromtimestamp(st.st_mtime).strftime("%Y-%m-%d %H:%M")
            print("    " * depth + f"{name}  {st.st_size / MiB:.1f} MiB  {when}")
    print(f"\nTry: ls -l {root}/*/*  or  unzip -l {root}/*/*/Data_001.zip"
          + (f"  or  head {root}/*/*/Data_001/Data/Leads_001.csv" if expand else ""))
    print("Press Ctrl-C to unmount and stop.", flush=True)
