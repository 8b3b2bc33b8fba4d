"""The typed outcome of every Blynk request: success, retryable, or permanent with a reason
(a :class:`~pipeline.errors.Reason`; a permanent one becomes the dead-letter reason)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import Reason


@dataclass(frozen=True, slots=True)
class Ok:
    status: int
    body: str = ""
    #: The server that finally answered (differs from the one asked after a 308).
    server: str = ""


@dataclass(frozen=True, slots=True)
class Retry:
    reason: Reason
    detail: str
    retry_after_s: float | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    reason: Reason
    detail: str
    status: int | None = None
    #: The pin the error is about, when Blynk's answer lets us tell.
    pin: str | None = None


Outcome = Ok | Retry | Fail
