"""Device ids and event ids: which device ids ingest accepts, and how an event id is made.

**Device ids** (Particle ``coreid``/``device_id``/``deviceID``, TTS
``end_device_ids.device_id``) must match :data:`DEVICE_ID`: 1 to 64 of ``A-Z a-z 0-9 . _ : @ -``.
That holds Particle's 24-hex-digit ids and its ``api``/``particle-internal`` sources, TTS device
ids (lower-case letters, digits and dashes, at most 36) and the names custom templates commonly
send, while keeping control characters (CR/LF/NUL), bidi overrides, spaces, slashes and huge
strings out of Redis keys, Blynk device names, logs and headers. Other ids are refused
(``invalid_field`` naming the field), never rewritten: two different ids must stay two devices.

**Event ids** are ``<source>:<integration>:<local id>``, so the same message reaching two
integrations is two events (de-duplication is by event id). The local id is the sender's own
(TTS ``as:up:`` correlation id, Particle ``event_id``) or a hash the parser makes. An id longer
than :data:`MAX_EVENT_ID_BYTES` or with characters outside ``A-Z a-z 0-9 . _ : @ / + = -``
becomes ``<source>:`` + a 16-byte BLAKE2b of integration and local id (hex): every event id is
bounded and safe in a Redis key and an HTTP header.
"""

from __future__ import annotations

import hashlib
import re

from pipeline.errors import InvalidInput, Reason

DEVICE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}", re.ASCII)
MAX_EVENT_ID_BYTES = 128
_SAFE_EVENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]+", re.ASCII)


def check_device(device: str, field: str) -> str:
    """``device`` if it is a valid device id; else :class:`InvalidInput` naming ``field``."""
    if DEVICE_ID.fullmatch(device):
        return device
    raise InvalidInput(
        f"`{field}` must be 1-64 of A-Z a-z 0-9 . _ : @ - (got {len(device)} characters: "
        f"{device[:40]!r})",
        reason=Reason.INVALID_FIELD,
        field=field,
    )


def readable_prefix(source: str, integration: str, local_len: int) -> str | None:
    """``<source>:<integration>:``, to which a local id of ``local_len`` characters of the safe
    alphabet (a hex digest) is appended as is: ``prefix + local == event_id(source,
    integration, local)``. ``None`` when :func:`event_id` would hash such ids instead. Lets a
    parser that scopes hex digests skip the per-event check."""
    prefix = f"{source}:{integration}:"
    if len(prefix) + local_len <= MAX_EVENT_ID_BYTES and _SAFE_EVENT_ID.fullmatch(prefix):
        return prefix
    return None


def event_id(source: str, integration: str, local: str) -> str:
    """The event id of ``local`` (the sender's id or the parser's hash) scoped to the
    integration: readable when short and safe, else hashed (see the module docstring)."""
    readable = f"{source}:{integration}:{local}"
    if len(readable) <= MAX_EVENT_ID_BYTES and _SAFE_EVENT_ID.fullmatch(readable):
        return readable  # ASCII by the pattern: characters are bytes
    key = f"{integration}\0{local}".encode(errors="surrogatepass")
    return f"{source}:" + hashlib.blake2b(key, digest_size=16).hexdigest()
