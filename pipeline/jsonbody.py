"""What a JSON body that does not decode is called, the same for every source.

msgspec reports invalid UTF-8 differently across versions (a ``UnicodeDecodeError`` in older
releases, a ``DecodeError`` whose text says so in newer ones), so the bytes themselves decide:
a body that is not UTF-8 is ``invalid_encoding``, anything else that fails is ``invalid_json``.
Both name the whole body (``$``) as the field.
"""

from __future__ import annotations

from pipeline.errors import InvalidInput, Reason


def undecodable(body: bytes, exc: Exception) -> InvalidInput:
    """The error for ``body`` that msgspec failed to decode with ``exc`` (never raises)."""
    try:
        body.decode()
    except UnicodeDecodeError as bad:
        return InvalidInput(
            f"body is not UTF-8 (byte {bad.start})", reason=Reason.INVALID_ENCODING, field="$"
        )
    return InvalidInput(f"not valid JSON: {exc}", reason=Reason.INVALID_JSON, field="$")
