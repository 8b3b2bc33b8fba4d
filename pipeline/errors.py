"""The small error hierarchy every stage speaks.

A stage decides what to do with a failure by its class alone: a :class:`Retryable` failure leaves
the entry pending (it is delivered again, up to ``max_deliveries``); a :class:`Permanent` failure
dead-letters the entry at once with its ``reason`` code.
"""

from __future__ import annotations

from dataclasses import dataclass


class BridgeError(Exception):
    """Base of every error blynk-bridge raises on purpose."""

    reason: str = "error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in a configuration file and where it is: ``key`` is a path such as
    ``tts[0].port`` (None: the file as a whole); ``line`` and ``column`` count from 1 (None:
    not known, e.g. TOML, or a key the file does not hold)."""

    message: str
    key: str | None = None
    line: int | None = None
    column: int | None = None

    def render(self, origin: str) -> str:
        """``file:line:col: message`` (the form editors and terminals link to)."""
        where = f"{origin}:{self.line}:{self.column}" if self.line is not None else origin
        return f"{where}: {self.message}"


class ConfigError(BridgeError):
    """The configuration file is missing, unreadable or invalid; the message names key and file.

    Raised by :mod:`pipeline.config` with ``problems`` (each with its key and position) and
    ``origin`` (the file); elsewhere a plain message is enough."""

    reason = "config"

    def __init__(self, detail: str, *, origin: str | None = None,
                 problems: tuple[ConfigProblem, ...] = ()) -> None:
        super().__init__(detail)
        self.origin = origin
        self.problems = problems

    @classmethod
    def of(cls, origin: str, *problems: ConfigProblem) -> ConfigError:
        """An error about ``origin``: its message is one rendered line per problem."""
        return cls("\n".join(p.render(origin) for p in problems), origin=origin,
                   problems=problems)


class Retryable(BridgeError):
    """A failure that may pass by itself (timeouts, 5xx, 429, connection loss)."""

    reason = "retryable"

    def __init__(
        self, detail: str, *, reason: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail, reason=reason)
        self.retry_after_s = retry_after_s


class Permanent(BridgeError):
    """A failure that will happen again on every retry; the entry is dead-lettered."""

    reason = "permanent"


class InvalidInput(Permanent):
    """Input that can never be accepted (not JSON, wrong shape, too large).

    ``reason`` is a machine-readable code (``invalid_json``, ``wrong_shape``, ``too_large``,
    ``no_decoded_payload``…) and ``field`` names the offending field when there is one.
    """

    reason = "invalid_input"

    def __init__(self, detail: str, *, reason: str | None = None, field: str | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.field = field
