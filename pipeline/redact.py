"""Keep secrets out of logs and error messages.

Blynk tokens travel in query strings (``?token=…``); API keys and passwords in headers. Anything
that might print one goes through :func:`mask` or :func:`redact_url` first.
"""

from __future__ import annotations

import re

_TOKEN_QUERY = re.compile(
    r"(?i)((?:token|access_token|client_secret|api_key|password)=)([^&\s\"']+)"
)


def mask(secret: str | None, keep: int = 4) -> str:
    """Show only the last ``keep`` characters of a secret: ``…cdL9``."""
    if not secret:
        return "<empty>"
    if len(secret) <= keep * 2:
        return "…" + "*" * min(len(secret), 4)
    return "…" + secret[-keep:]


def redact_url(text: str) -> str:
    """Mask every ``token=…``-style query value inside ``text``."""
    return _TOKEN_QUERY.sub(lambda m: m.group(1) + mask(m.group(2)), text)


class Secret(str):
    """A string that never shows itself in ``repr``/``str`` formatting of containers.

    ``str(secret)`` (and f-strings) still give the value, because clients must send it; only
    ``repr`` is masked, which is what config dumps, tracebacks and debug logs use.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Secret({mask(self)!r})"

    def reveal(self) -> str:
        return str.__str__(self)
