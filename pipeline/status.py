"""Integration statuses (TTS application, Particle product, Blynk server), kept in Redis.

The states are Blynk's own: **Not Connected** (never connected, or the first connection
failed), **Connected**, **Broken** (was connected, now failing; retried with backoff and set back
to Connected by itself). Each carries since-when and the last error, and whether the error is
about credentials (fix the config) or reachability (wait).
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Literal

import msgspec
import redis.asyncio as aioredis

from pipeline import metrics
from pipeline.keys import Keys

ErrorKind = Literal["credentials", "unreachable", "protocol", "other"]


class State(StrEnum):
    NOT_CONNECTED = "Not Connected"
    CONNECTED = "Connected"
    BROKEN = "Broken"


def export_state(kind: str, name: str, state: str) -> None:
    """``bb_integration_status{kind, integration, state}``: 1 for ``state``, 0 for the others
    (one series per state, as Prometheus exporters show enums)."""
    for s in State:
        metrics.INTEGRATION_STATUS.labels(kind, name, s.value).set(1 if s.value == state else 0)


class IntegrationStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: str
    name: str
    state: State
    since_ms: int
    updated_ms: int
    last_error: str | None = None
    error_kind: ErrorKind | None = None
    owner: str | None = None


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(IntegrationStatus)


class StatusBoard:
    """Reads and writes statuses; ``since_ms`` changes only when the state changes."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._key = keys.status()

    async def get(self, kind: str, name: str) -> IntegrationStatus | None:
        raw = await self._redis.hget(self._key, f"{kind}:{name}")
        return _dec.decode(raw) if raw else None

    async def connected(self, kind: str, name: str, *, owner: str | None = None) -> None:
        await self._set(kind, name, State.CONNECTED, None, None, owner)

    async def failed(
        self, kind: str, name: str, error: str, error_kind: ErrorKind, *, owner: str | None = None
    ) -> IntegrationStatus:
        """Record a failure: Broken if it was Connected (or Broken), else Not Connected."""
        current = await self.get(kind, name)
        was_up = current is not None and current.state is not State.NOT_CONNECTED
        state = State.BROKEN if was_up else State.NOT_CONNECTED
        return await self._set(kind, name, state, error, error_kind, owner)

    async def _set(
        self,
        kind: str,
        name: str,
        state: State,
        error: str | None,
        error_kind: ErrorKind | None,
        owner: str | None,
    ) -> IntegrationStatus:
        now = time.time_ns() // 1_000_000
        current = await self.get(kind, name)
        since = current.since_ms if current is not None and current.state is state else now
        if error is None and current is not None and state is not State.CONNECTED:
            error, error_kind = current.last_error, current.error_kind
        status = IntegrationStatus(
            kind=kind,
            name=name,
            state=state,
            since_ms=since,
            updated_ms=now,
            last_error=error,
            error_kind=error_kind,
            owner=owner,
        )
        await self._redis.hset(self._key, f"{kind}:{name}", _enc.encode(status))
        export_state(kind, name, state)
        return status

    async def all(self) -> list[IntegrationStatus]:
        raw = await self._redis.hgetall(self._key)
        return sorted((_dec.decode(v) for v in raw.values()), key=lambda s: (s.kind, s.name))
