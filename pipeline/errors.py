"""The small error hierarchy every stage speaks, and the one vocabulary of reason codes.

A stage decides what to do with a failure by its class alone: a :class:`Retryable` failure leaves
the entry pending (it is delivered again, up to ``max_deliveries``); a :class:`Permanent` failure
dead-letters the entry at once with its ``reason`` code.

Every machine-readable reason the bridge emits — an ingest refusal (HTTP answer and
``bb_rejected_total``), a dead letter (``bb_dead_letters_total``, ``blynk-bridge dead``), a
retry, a Blynk outcome, a deliberate skip — is a member of :class:`Reason`, with its one-line
description. Reasons are typed as :class:`Reason` wherever they are produced, so mypy refuses an
ad-hoc string; ``docs/DESIGN.md`` lists the table (``tests/test_reasons.py`` keeps both true).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    """Where a reason shows."""

    REFUSED = "refused"  # ingest answered 4xx/5xx (or closed the connection); nothing stored
    DEAD = "dead"  # dead-lettered (inspect and replay with `blynk-bridge dead`)
    RETRY = "retry"  # retried; dead-lettered only once retries run out
    SKIPPED = "skipped"  # valid input deliberately not forwarded; counted
    LABEL = "label"  # a metric label or class default, never stored


class Reason(enum.StrEnum):
    """Every reason code, its :class:`Kind` (the main place it shows) and its description."""

    kind: Kind
    description: str

    def __new__(cls, code: str, kind: Kind = Kind.LABEL, description: str = "") -> Reason:
        member = str.__new__(cls, code)
        member._value_ = code
        member.kind = kind
        member.description = description
        return member

    # Input refused at ingest (HTTP answer, or an MQTT message dead-lettered with the reason).
    INVALID_JSON = "invalid_json", Kind.REFUSED, "the body is not valid JSON"
    INVALID_ENCODING = "invalid_encoding", Kind.REFUSED, "the body or a query value is not UTF-8"
    WRONG_SHAPE = "wrong_shape", Kind.REFUSED, "valid JSON/form, but not the expected structure"
    MISSING_FIELD = "missing_field", Kind.REFUSED, "a required field is missing"
    INVALID_FIELD = ("invalid_field", Kind.REFUSED,
                     "a field's value is not allowed (e.g. a device id)")
    TOO_MANY_VALUES = "too_many_values", Kind.REFUSED, "more values or fields than allowed"
    TOO_LARGE = "too_large", Kind.REFUSED, "over a size limit (body, value; Blynk: batch too large)"
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", Kind.REFUSED,
                              "content type is not JSON, form or text")
    UNKNOWN_INTEGRATION = ("unknown_integration", Kind.REFUSED,
                           "no configured integration (or Blynk webhook) of that name")
    NO_DECODED_PAYLOAD = ("no_decoded_payload", Kind.REFUSED,
                          "a TTS uplink without decoded_payload (no payload formatter)")
    UNENCODABLE = ("unencodable", Kind.REFUSED,
                   "holds a value that cannot be stored (e.g. an integer past 64 bits)")
    PARSE_FAILED = "parse_failed", Kind.REFUSED, "an MQTT message the parser failed on (a bug)"
    UNRENDERED_PLACEHOLDER = ("unrendered_placeholder", Kind.REFUSED,
                              "a Blynk webhook body with a placeholder Blynk did not fill")
    UNAUTHORIZED = ("unauthorized", Kind.REFUSED,
                    "credentials missing or wrong (ingest); a device cloud or Blynk refused ours")
    TOO_MANY_AUTH_FAILURES = ("too_many_auth_failures", Kind.REFUSED,
                              "a peer failed authentication too often; retry later")
    NOT_FOUND = ("not_found", Kind.REFUSED,
                 "no such route (ingest); Blynk platform API: no such object")
    METHOD_NOT_ALLOWED = "method_not_allowed", Kind.REFUSED, "HTTP method not allowed on the route"
    BODY_TIMEOUT = "body_timeout", Kind.REFUSED, "the body did not arrive within body_timeout_s"
    BACKLOG = "backlog", Kind.REFUSED, "transform's backlog is past its high-water mark (503)"
    REDIS_UNAVAILABLE = "redis_unavailable", Kind.REFUSED, "Redis cannot store the input now (503)"
    TOO_MANY_CONNECTIONS = ("too_many_connections", Kind.REFUSED,
                            "a peer holds more than max_connections_per_peer connections")
    MALFORMED_REQUEST = "malformed_request", Kind.REFUSED, "not a parseable HTTP request"
    HEADER_TIMEOUT = "header_timeout", Kind.REFUSED, "request head not received in header_timeout_s"
    HOST_NOT_ALLOWED = ("host_not_allowed", Kind.REFUSED,
                        "status page: a Host name not in monitor.allowed_hosts (DNS rebinding)")
    ACTIONS_DISABLED = ("actions_disabled", Kind.REFUSED,
                        "status page: an action while monitor.admin_token is not set")
    CROSS_ORIGIN = ("cross_origin", Kind.REFUSED,
                    "status page: an action sent from another web site's page")

    # Dead letters written by the stages.
    MAX_DELIVERIES = "max_deliveries", Kind.DEAD, "delivered max_deliveries times without success"
    UNDECODABLE = "undecodable", Kind.DEAD, "a stream entry that is not a valid wire type"
    INVALID_ENTRY = "invalid_entry", Kind.DEAD, "a downlink entry that is not a valid Downlink"
    UNKNOWN_DEVICE = ("unknown_device", Kind.DEAD,
                      "no registry row (uplink without provisioning; downlink's Blynk device)")
    DEVICE_BROKEN = ("device_broken", Kind.DEAD,
                     "the device is marked broken (its token was refused)")
    TYPE_MISMATCH = ("type_mismatch", Kind.DEAD,
                     "a value does not fit its datastream's type (mapping, Blynk, downlink)")
    PROVISION_FAILED = ("provision_failed", Kind.DEAD,
                        "creating the device in Blynk cannot work (template, platform API)")
    PROVISION_LIMIT = "provision_limit", Kind.DEAD, "the integration reached its provision_max"
    INVALID_TOKEN = "invalid_token", Kind.DEAD, "Blynk refused the device token"
    WRONG_PIN = "wrong_pin", Kind.DEAD, "not a valid pin (Blynk's answer, a webhook's device_pin)"
    NO_DATASTREAM = "no_datastream", Kind.DEAD, "Blynk has no datastream on that pin"
    BAD_REQUEST = "bad_request", Kind.DEAD, "Blynk refused the request for another reason"
    REDIRECT_REFUSED = ("redirect_refused", Kind.DEAD,
                        "a redirect to a host that is not Blynk, or from https to http")
    UNREACHABLE = "unreachable", Kind.DEAD, "the destination stayed unreachable past the retries"
    UNKNOWN_TEMPLATE = ("unknown_template", Kind.DEAD,
                        "the device's template is not in the configuration")
    UNKNOWN_PIN = "unknown_pin", Kind.DEAD, "the device's template has no datastream on the pin"
    NO_FUNCTION = "no_function", Kind.DEAD, "no Particle function configured for the pin"
    EXPIRED = "expired", Kind.DEAD, "a downlink older than downlink.ttl_s; never sent late"
    DEVICE_OFFLINE = ("device_offline", Kind.DEAD,
                      "the device stayed unreachable until the downlink's retries ran out")
    ENCODE_FAILED = "encode_failed", Kind.DEAD, "the template's downlink encoding cannot encode it"
    ARG_TOO_LONG = "arg_too_long", Kind.DEAD, "a Particle function argument over its byte limit"
    BAD_DEVICE = "bad_device", Kind.DEAD, "a device id the device cloud cannot address"
    BAD_FUNCTION = "bad_function", Kind.DEAD, "not a valid Particle function name"
    UNKNOWN_FUNCTION = "unknown_function", Kind.DEAD, "Particle does not know the function"
    CLOUD_REFUSED = "cloud_refused", Kind.DEAD, "the device cloud refused the command (HTTP 4xx)"
    TTS_NACK = "tts_nack", Kind.DEAD, "TTS reports the confirmed downlink was not acknowledged"
    TTS_FAILED = "tts_failed", Kind.DEAD, "TTS reports the downlink failed"

    # Retried (dead-lettered only when retries or the TTL run out).
    TIMEOUT = "timeout", Kind.RETRY, "no answer in time"
    CONNECTION = "connection", Kind.RETRY, "the connection failed or broke"
    SERVER_ERROR = "server_error", Kind.RETRY, "HTTP 5xx"
    RATE_LIMITED = "rate_limited", Kind.RETRY, "HTTP 429"
    REDIRECT = "redirect", Kind.RETRY, "a 308 to follow (to the device's region)"
    BAD_ANSWER = "bad_answer", Kind.RETRY, "an answer that cannot be read"
    MQTT = "mqtt", Kind.RETRY, "the MQTT session failed or is down"
    REDIS = "redis", Kind.RETRY, "a Redis command failed"
    CLOUD_UNAVAILABLE = "cloud_unavailable", Kind.RETRY, "the device cloud answered 429 or 5xx"
    PROVISION_RATE = "provision_rate", Kind.RETRY, "the integration's provision_rate is used up"
    PROVISION_PENDING = ("provision_pending", Kind.RETRY,
                         "another worker is still creating the device")
    ERROR = "error", Kind.RETRY, "an unexpected failure (logged with its traceback)"

    # Valid input deliberately not forwarded (counted).
    JOIN = "join", Kind.SKIPPED, "a LoRaWAN join: nothing to write"
    STATUS = "status", Kind.SKIPPED, "a status message: nothing to write"
    EMPTY = "empty", Kind.SKIPPED, "an uplink with no values"
    NOTHING_MAPPED = "nothing_mapped", Kind.SKIPPED, "no value maps onto the template"
    SIMULATED = "simulated", Kind.SKIPPED, "a TTS simulated uplink the application skips"
    DOWNLINK_QUEUED = "downlink_queued", Kind.SKIPPED, "a TTS downlink outcome on the uplink topic"
    DOWNLINK_SENT = "downlink_sent", Kind.SKIPPED, "a TTS downlink outcome on the uplink topic"
    DOWNLINK_ACK = "downlink_ack", Kind.SKIPPED, "a TTS downlink outcome on the uplink topic"
    DOWNLINK_NACK = "downlink_nack", Kind.SKIPPED, "a TTS downlink outcome on the uplink topic"
    DOWNLINK_FAILED = "downlink_failed", Kind.SKIPPED, "a TTS downlink outcome on the uplink topic"
    DOWNLINK_QUEUE_INVALIDATED = ("downlink_queue_invalidated", Kind.SKIPPED,
                                  "a TTS downlink outcome on the uplink topic")
    SERVICE_DATA = "service_data", Kind.SKIPPED, "TTS service data, not an uplink"

    # Metric labels and class defaults.
    FOREIGN_HOST = "foreign_host", Kind.LABEL, "a redirect refused: not a configured Blynk server"
    DOWNGRADE = "downgrade", Kind.LABEL, "a redirect refused: from https to http"
    NOT_FOLLOWED = "not_followed", Kind.LABEL, "a redirect refused: the platform API follows none"
    CONFIG = "config", Kind.LABEL, "the configuration is invalid"
    RETRYABLE = "retryable", Kind.LABEL, "a retryable failure without a more precise reason"
    PERMANENT = "permanent", Kind.LABEL, "a permanent failure without a more precise reason"
    INVALID_INPUT = "invalid_input", Kind.LABEL, "invalid input without a more precise reason"


def describe(code: str) -> str:
    """The description of a reason code; codes written by older versions read as unknown."""
    try:
        return Reason(code).description
    except ValueError:
        return "(not a reason this version knows)"


class BridgeError(Exception):
    """Base of every error blynk-bridge raises on purpose."""

    reason: Reason = Reason.ERROR

    def __init__(self, detail: str, *, reason: Reason | None = None) -> None:
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

    reason = Reason.CONFIG

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

    reason = Reason.RETRYABLE

    def __init__(
        self, detail: str, *, reason: Reason | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail, reason=reason)
        self.retry_after_s = retry_after_s


class Permanent(BridgeError):
    """A failure that will happen again on every retry; the entry is dead-lettered."""

    reason = Reason.PERMANENT


class InvalidInput(Permanent):
    """Input that can never be accepted (not JSON, wrong shape, too large).

    ``reason`` is a machine-readable code (``invalid_json``, ``wrong_shape``, ``too_large``,
    ``no_decoded_payload``…) and ``field`` names the offending field when there is one.
    """

    reason = Reason.INVALID_INPUT

    def __init__(self, detail: str, *, reason: Reason | None = None,
                 field: str | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.field = field
