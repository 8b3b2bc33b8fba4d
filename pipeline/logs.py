"""Logging: structured JSON for machines, plain text for people; secrets masked either way."""

from __future__ import annotations

import json
import logging
import sys
import time

from pipeline.redact import redact_url


class RedactingFilter(logging.Filter):
    """Masks ``token=…``-style values in every record, whatever logged it (aiohttp included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        redacted = redact_url(msg)
        if redacted != msg:
            record.msg, record.args = redacted, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = redact_url(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", fmt: str | None = None, path: str | None = None) -> None:
    """Log to stderr (or to ``path``): text on a terminal, JSON lines otherwise."""
    handler: logging.Handler = (
        logging.FileHandler(path) if path is not None else logging.StreamHandler(sys.stderr)
    )
    if fmt is None:
        fmt = "text" if path is None and sys.stderr.isatty() else "json"
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
