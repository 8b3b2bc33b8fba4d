"""Keep secrets out of logs and error messages.

Blynk tokens travel in query strings (``?token=…``); API keys and passwords in headers and URLs'
user info. Anything that might print one goes through :func:`mask`, :func:`redact_url`,
:func:`redact_text` or :func:`safe_url` first.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_TOKEN_QUERY = re.compile(
    r"(?i)((?:token|access_token|client_secret|api_key|password)=)([^&\s\"']+)"
)


#: A credential header and its value, as echoed by HTTP parsers (``Authorization: Basic …``,
#: ``b'X-Bridge-Secret: …\\r\\n'``): the value runs to the end of the line or of the quoted bytes.
_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-[a-z0-9-]*(?:secret|key|token|auth)"
    r"[a-z0-9-]*)(\s*:\s*)([^\\\r\n'\"]+)"
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


def redact_text(text: str) -> str:
    """:func:`redact_url`, plus every credential header's value (``Authorization: …``)."""
    return _HEADER.sub(lambda m: m.group(1) + m.group(2) + mask(m.group(3)), redact_url(text))


def safe_url(url: str) -> str:
    """A URL fit to print: the user info's password and token-like query values masked."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{mask(parts.password)}@{parts.hostname or ''}"
        if parts.port:
            netloc += f":{parts.port}"
        url = urlunsplit(parts._replace(netloc=netloc))
    return redact_url(url)


def masked_repr(obj: Any, secrets: tuple[str, ...] = ("token",)) -> str:
    """``Name(field=value, …)`` of a msgspec Struct or a dataclass with the ``secrets`` fields
    masked: the ``__repr__`` of every object that holds a Blynk token, so a traceback, a
    callback's repr in asyncio's "exception in callback" log or a debug print never shows one."""
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj) if f.repr]
    else:
        names = list(getattr(obj, "__struct_fields__", ()))
    parts = []
    for name in names:
        value = getattr(obj, name)
        if name in secrets and isinstance(value, str):
            shown = repr(mask(value))
        elif name in secrets and isinstance(value, bytes):
            shown = f"<{len(value)} bytes>"
        else:
            shown = repr(value)
        parts.append(f"{name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


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
