"""Transform's outputs: what a routed uplink becomes, and the accounting once it is written.

:meth:`Outputs.map` turns each ``WRITE``-routed uplink into its encoded ``BlynkWrite`` (the
values that map onto its template) and its partial dead letter (``type_mismatch``: the values
that do not fit their datastream), plus what to count; it touches no Redis. :meth:`Outputs.account`
runs after the batch's script call wrote them: metrics, unmapped keys (bounded, flushed at most
once a second), firmware versions into the registry.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline import events, metrics
from pipeline.errors import Reason
from pipeline.keys import Keys
from pipeline.mapping import describe_rejected, map_uplink
from pipeline.registry import Registry
from pipeline.routing import Route
from pipeline.streams import Entry
from pipeline.unmapped import UnmappedKeys
from workers.transform.templates import Templates

STAGE = "transform"


@dataclass(slots=True)
class Mapped:
    """One ready uplink, mapped: its outputs and what to account for once it is written."""

    entry: Entry
    route: Route
    template: str
    stream: str
    write: bytes | None
    dead: bytes | None
    unmapped: tuple[str, ...]
    rejected: int
    firmware: str | None


class Outputs:
    """Maps routed uplinks onto their outputs and accounts for the written ones."""

    def __init__(self, keys: Keys, templates: Templates, registry: Registry,
                 unmapped: UnmappedKeys, servers: Mapping[str, str], default_server: str) -> None:
        self._keys = keys
        self._templates = templates
        self._registry = registry
        self.unmapped = unmapped
        self._unmapped_flushed = time.monotonic()
        self._servers = servers
        self._default_server = default_server

    def dead_letter_of(self, e: Entry, reason: Reason, detail: str, ts: int) -> bytes:
        """The encoded dead letter of a whole decodable uplink (as the reader writes it)."""
        return events.encode(events.dead_letter(
            stream=e.stream, entry_id=e.id, raw=e.data or b"", stage=STAGE, reason=reason,
            detail=detail, attempts=e.deliveries, dead_ts_ms=ts))

    def map(self, ready: Sequence[tuple[Entry, Route]], ts: int) -> list[Mapped]:
        """Map each ``WRITE``-routed uplink onto its template: its write, partial dead letter,
        counts."""
        out: list[Mapped] = []
        stream_for = self._keys.stream_for
        encode = events.encode
        for e, r in ready:
            u, dev = r.uplink, r.device
            assert dev is not None
            template = self._templates.of_route(r)
            mapped = map_uplink(template, u)
            dead: bytes | None = None
            if mapped.rejected:
                dead = encode(events.dead_letter(
                    stream=e.stream, entry_id=e.id, raw=e.data or b"",
                    stage=STAGE, reason=Reason.TYPE_MISMATCH,
                    detail=describe_rejected(mapped.rejected),
                    attempts=e.deliveries, dead_ts_ms=ts))
            write: bytes | None = None
            if mapped.pins:
                hist = template.history_pins
                write = encode(events.BlynkWrite(
                    token=dev.token, server=self._server_url(dev.server), device_key=dev.key,
                    pins=mapped.pins, event_ts_ms=u.event_ts_ms,
                    received_ts_ms=u.received_ts_ms, event_id=u.event_id,
                    history_pins=[p for p in mapped.pins if p in hist] if hist else [],
                ))
            firmware = mapped.firmware if (
                mapped.firmware is not None and u.token is None
                and mapped.firmware != dev.firmware) else None
            out.append(Mapped(e, r, template.name, stream_for("writes", u.source, u.device),
                              write, dead, tuple(mapped.unmapped), len(mapped.rejected),
                              firmware))
        return out

    async def account(self, written: Sequence[Mapped]) -> None:
        """After the outputs are in Redis: metrics, unmapped keys, firmware versions."""
        transformed: Counter[tuple[str, str]] = Counter()
        firmware: dict[str, str] = {}
        rejected_n: Counter[str] = Counter()
        nothing = 0
        unmapped = self.unmapped
        for m in written:
            if m.unmapped:
                unmapped.add(m.template, m.unmapped)
            if m.firmware is not None:
                firmware[m.route.key] = m.firmware
            if m.rejected:
                rejected_n[m.template] += m.rejected
            if m.write is None:
                nothing += 1
            else:
                u = m.route.uplink
                transformed[(u.source, u.integration)] += 1
        for (source, integration), n in transformed.items():
            metrics.TRANSFORMED.labels(source, integration).inc(n)
        for tname, n in rejected_n.items():
            metrics.REJECTED_VALUES.labels(tname, Reason.TYPE_MISMATCH).inc(n)
            metrics.DEAD.labels(STAGE, Reason.TYPE_MISMATCH).inc()
        if nothing:
            metrics.TRANSFORM_SKIPPED.labels(Reason.NOTHING_MAPPED).inc(nothing)
        if firmware:
            await self._registry.set_firmware(firmware)
        if self.unmapped and time.monotonic() - self._unmapped_flushed >= 1.0:
            await self.flush_unmapped()

    async def flush_unmapped(self) -> None:
        """Write the unmapped-key counts (:class:`pipeline.unmapped.UnmappedKeys`)."""
        self._unmapped_flushed = time.monotonic()
        await self.unmapped.flush()

    def _server_url(self, server: str | None) -> str:
        if not server:
            return self._default_server
        url = self._servers.get(server)
        if url is not None:
            return url
        return server if "://" in server else self._default_server
