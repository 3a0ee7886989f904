"""`zohofs ls`: what would be mounted, with sizes and expiry, and the exit status a cron
or monitoring check reads (a listing that failed, a backup about to expire)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from datetime import UTC, datetime, timedelta

from zohofs.config import Config
from zohofs.runtime import Runtime, fatal_sign_in_errors, open_runtime


async def list_backups(cfg: Config, expires_within: timedelta | None = None) -> int:
    """Print what would be mounted. Exit 0 when every file was listed and probed; 2 when
    sign-in failed for a reason waiting will not fix (as `mount` does); else 1, also when
    there is nothing to list: a cron check must notice; 3 when all is well but a backup
    expires within ``expires_within``."""
    # The failures of sign-in and listing are printed below, once each: not also logged.
    for name in ("zohofs.auth", "zohofs.catalog"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    async with open_runtime(cfg) as runtime:
        errors = await runtime.catalog.refresh()
        for error in errors:
            print(f"zohofs: error: {error}", file=sys.stderr)
        fatal = fatal_sign_in_errors(errors)
        if fatal and len(fatal) == len(runtime.sources) and not cfg.links:
            return 2
        rows = [("ZGID", "JOB", "FILE", "SIZE", "EXPIRES")]
        failed = bool(errors)
        for node in sorted(runtime.fs.files, key=lambda n: n.file.path if n.file else ""):
            assert node.file is not None
            if node.info is not None:
                size = str(node.info.size)
            else:
                failed = True
                size = f"error: {node.failure.error}" if node.failure else "?"
            expires = node.file.expires.isoformat() if node.file.expires else "-"
            rows.append((node.file.zgid, node.file.job_id, node.file.name, size, expires))
        if len(rows) == 1:
            print("zohofs: no backup files" + (
                "" if errors else " (Zoho lists none, or every link was refused: see "
                                  "the warnings above)"), file=sys.stderr)
            return 1
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
        if failed:
            return 1
        return 3 if expires_within is not None and _expiring(runtime, expires_within) else 0


def _expiring(runtime: Runtime, within: timedelta) -> bool:
    """Say which backups expire within ``within``; True if any does."""
    now = datetime.now(UTC)
    soon = sorted({(n.file.expires, f"{n.file.zgid}/{n.file.job_id}") for n in runtime.fs.files
                   if n.file and n.file.expires and n.file.expires - now <= within})
    for expires, backup in soon:
        left = max(expires - now, timedelta(0))
        print(f"zohofs: backup {backup} expires in {left.total_seconds() / 3600:.0f} h "
              f"({expires.astimezone().isoformat(sep=' ', timespec='minutes')}): copy it "
              "before then", file=sys.stderr)
    return bool(soon)


def duration(text: str) -> timedelta:
    """``48h``, ``2d``, ``90m``, ``30s`` or a number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 48h, 2d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    return timedelta(seconds=float(match[1]) * unit)
