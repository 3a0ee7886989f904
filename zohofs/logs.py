"""Logging set-up: journald-friendly, quiet libraries, no secrets."""

from __future__ import annotations

import logging
import os
import sys
from urllib.parse import urlsplit, urlunsplit

_JOURNAL_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    """Prefix each line with ``<N>`` so journald records the right priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Per-request lines from the HTTP libraries are noise, and httpx's carry URLs.
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # pyfuse3's debug output is one line per kernel request: only with --debug.
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.INFO)


def redact_url(url: str) -> str:
    """The URL without query and fragment: those are where tokens hide."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
