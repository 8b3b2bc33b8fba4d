"""The typed outcome of every Blynk request: success, retryable, or permanent with a reason."""

from __future__ import annotations

from dataclasses import dataclass

#: Permanent reason codes (machine-readable; they become dead-letter reasons).
INVALID_TOKEN = "invalid_token"
WRONG_PIN = "wrong_pin"
TYPE_MISMATCH = "type_mismatch"
NO_DATASTREAM = "no_datastream"
TOO_LARGE = "too_large"
NOT_FOUND = "not_found"
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
#: A redirect the client must not follow (foreign host, https → http, any on the platform API).
REDIRECT_REFUSED = "redirect_refused"


@dataclass(frozen=True, slots=True)
class Ok:
    status: int
    body: str = ""
    #: The server that finally answered (differs from the one asked after a 308).
    server: str = ""


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str
    detail: str
    retry_after_s: float | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str
    detail: str
    status: int | None = None
    #: The pin the error is about, when Blynk's answer lets us tell.
    pin: str | None = None


Outcome = Ok | Retry | Fail
