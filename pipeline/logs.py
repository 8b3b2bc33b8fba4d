"""Logging: structured JSON for machines, plain text for people; secrets masked either way."""

from __future__ import annotations

import json
import logging
import sys
import time

from pipeline.redact import redact_text

_plain = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Masks ``token=…``-style values and credential headers (``Authorization: …``) in every
    record, its traceback included, whatever logged it (aiohttp's parser errors quote the
    request bytes around the error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        redacted = redact_text(msg)
        if redacted != msg:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _plain.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
            record.exc_info = None  # formatters print exc_text; the raw one would repeat it
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
            out["exc"] = redact_text(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact_text(record.exc_text)
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


class ThrottledLog:
    """At most one record per key per ``interval_s``; the next one says how many were held back.

    For conditions that can repeat per request or per batch (a refused peer, uplinks waiting
    for a rate): the first is logged at once, repeats within the interval are counted, not
    printed. Remembers at most ``max_keys`` keys (oldest forgotten first).
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 max_keys: int = 100_000) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._max_keys = max_keys
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}

    def warning(self, key: tuple[str, ...], msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def info(self, key: tuple[str, ...], msg: str, *args: object) -> None:
        self.log(logging.INFO, key, msg, *args)

    def log(self, level: int, key: tuple[str, ...], msg: str, *args: object) -> None:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            self._seen[key] = (seen[0], seen[1] + 1)
            return
        if seen is None and len(self._seen) >= self._max_keys:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = (now, 0)
        if seen is not None and seen[1]:
            self._log.log(level, msg + " (and %d more in the last %.0fs)", *args, seen[1],
                          now - seen[0])
        else:
            self._log.log(level, msg, *args)
