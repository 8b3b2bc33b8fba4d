"""The small error hierarchy every stage speaks.

A stage decides what to do with a failure by its class alone: a :class:`Retryable` failure leaves
the entry pending (it is delivered again, up to ``max_deliveries``); a :class:`Permanent` failure
dead-letters the entry at once with its ``reason`` code.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error blynk-bridge raises on purpose."""

    reason: str = "error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class ConfigError(BridgeError):
    """The configuration file is missing, unreadable or invalid; the message names key and file."""

    reason = "config"


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
