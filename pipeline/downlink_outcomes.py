"""TTS downlink outcomes matched to the bridge's commands, wherever they are heard.

TTS reports each downlink's fate — ``queued``, ``sent``, ``ack``, ``nack``, ``failed`` — on the
application's MQTT connection (``down/<outcome>``, heard by the downlink stage) and, to
applications that take webhooks, as webhook messages (``downlink_<outcome>``, heard by
ingest-http). Both hand the message here, one home for what follows:

* matched by the correlation id ``bb:down:<id>`` the command carried to what the downlink stage
  kept when it sent it (:class:`Sent` under ``keys.down_command``);
* counted once across replicas and channels (``SET NX`` per id and outcome:
  ``bb_downlink_outcomes_total``);
* ``nack`` / ``failed`` dead-lettered (``tts_nack`` / ``tts_failed``) with TTS's error;
* with the template's ``downlink.outcome_pin``, the outcome written back to Blynk (1 delivered,
  0 failed). TTS acks only confirmed downlinks (Blynk's integration sends none): ``sent`` (a
  gateway transmitted it) is delivery for them, ``ack`` for the confirmed ones.

Redis errors propagate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from pipeline import events, metrics
from pipeline import keys as keynames
from pipeline.config import TemplateConfig
from pipeline.errors import Reason
from pipeline.keys import Keys
from pipeline.redact import masked_repr
from pipeline.registry import split_key
from pipeline.streams import Redis, now_ms

#: TTS outcomes that mean the device got (``sent``: unconfirmed) or confirmed (``ack``) it.
DELIVERED = ("sent", "ack")
#: Every outcome TTS reports (MQTT topic suffix; webhook key ``downlink_<outcome>``).
OUTCOMES = ("queued", "sent", "ack", "nack", "failed")
#: The outcomes that are failures, and the reason their dead letters carry.
TTS_FAILURES = {"nack": Reason.TTS_NACK, "failed": Reason.TTS_FAILED}


class Sent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What outcome matching keeps of a sent command (``keys.down_command``)."""

    device_key: str
    template: str
    pin: str
    stream: str
    entry_id: str
    raw: bytes
    token: str
    server: str

    def __repr__(self) -> str:
        return masked_repr(self, ("token", "raw"))


_sent_dec = msgspec.msgpack.Decoder(Sent)


def queue_write_back(pipe: Any, keys: Keys, *, device_key: str, token: str, server: str,
                     pin: str, value: events.Value, wall: int, event_id: str) -> None:
    """Queue one value for Blynk on the writes stream (an outcome, a function's return
    value), written as the device's own (``event_id`` keeps repeats apart)."""
    source, _, device = split_key(device_key)
    write = events.BlynkWrite(token=token, server=server, device_key=device_key,
                              pins={pin.upper(): value}, event_ts_ms=wall, received_ts_ms=wall,
                              event_id=event_id)
    pipe.xadd(keys.stream_for(keynames.WRITES, source, device),
              {events.FIELD: events.encode(write)})


class Outcomes:
    """Matches TTS downlink outcomes (see the module docstring)."""

    def __init__(self, redis: Redis, keys: Keys, templates: Mapping[str, TemplateConfig],
                 ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._templates = templates
        self._ttl_s = ttl_s

    async def handle(self, integration: str, outcome: str, payload: bytes) -> int:
        """One outcome message (TTS's JSON, MQTT or webhook); returns the commands it matched
        for the first time."""
        matched = 0
        for event_id in correlation_ids(payload):
            first = await self._redis.set(self._keys.down_outcome(event_id, outcome), b"1",
                                          nx=True, ex=self._ttl_s)
            if not first:
                continue
            matched += 1
            metrics.DOWNLINK_OUTCOMES.labels(integration, outcome).inc()
            if outcome not in DELIVERED and outcome not in TTS_FAILURES:
                continue
            raw = await self._redis.get(self._keys.down_command(event_id))
            if raw is None:
                continue
            sent = _sent_dec.decode(raw if isinstance(raw, bytes) else raw.encode())
            async with self._redis.pipeline(transaction=False) as pipe:
                if outcome not in DELIVERED:
                    dead = events.dead_letter(
                        stream=sent.stream, entry_id=sent.entry_id, raw=sent.raw,
                        stage="downlink", reason=TTS_FAILURES[outcome],
                        detail=tts_error(payload), attempts=1, dead_ts_ms=now_ms())
                    pipe.xadd(self._keys.dead, {events.FIELD: events.encode(dead)})
                    metrics.DEAD.labels("downlink", TTS_FAILURES[outcome]).inc()
                template = self._templates.get(sent.template)
                pin = (template.downlink.outcome_pin
                       if template is not None and template.downlink else None)
                if pin:
                    queue_write_back(pipe, self._keys, device_key=sent.device_key,
                                     token=sent.token, server=sent.server, pin=pin,
                                     value=1 if outcome in DELIVERED else 0, wall=now_ms(),
                                     event_id=f"{event_id}:{outcome}")
                await pipe.execute()
        return matched


class _Outcome(msgspec.Struct):
    correlation_ids: list[str] = msgspec.field(default_factory=list)


_outcome_dec = msgspec.json.Decoder(_Outcome)


def correlation_ids(payload: bytes) -> list[str]:
    """The bridge's own correlation ids (``bb:down:…``) of an outcome message."""
    try:
        msg = _outcome_dec.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []
    return [c for c in msg.correlation_ids if c.startswith("bb:down:") and len(c) < 64]


def tts_error(payload: bytes) -> str:
    """TTS's error of a ``failed`` / ``nack`` message, for the dead letter."""
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return payload[:500].decode(errors="replace")
    for key in ("downlink_failed", "downlink_nack"):
        part = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(part, dict):
            err = part.get("error")
            if isinstance(err, dict):
                return f"{err.get('name')}: {err.get('message_format')}"[:500]
            return f"{key}"[:500]
    return "TTS reported the downlink failed"
