"""The registry's reverse index: Blynk device (token, id) → device key (source, integration,
device).

One hash (``keys.blynk_index()``) with ``t:<token hash>`` and ``i:<Blynk device id>`` fields.
:func:`queue_write` is called by :meth:`pipeline.registry.Registry._commit` for every row it
writes with a token, inside the same ``MULTI``, so the index never lags the registry. Entries
are never deleted on a token change: :func:`resolve` checks the row still carries that token
(or id), so a stale entry resolves to nothing rather than to the wrong device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis.asyncio.client import Pipeline

from pipeline.config import DeviceEntry
from pipeline.keys import Keys
from pipeline.streams import Redis

if TYPE_CHECKING:  # the registry imports this module
    from pipeline.registry import Device, Registry


def token_field(token: str) -> str:
    return "t:" + hashlib.blake2b(token.encode(), digest_size=12).hexdigest()


def id_field(blynk_id: int) -> str:
    return f"i:{blynk_id}"


def queue_write(pipe: Pipeline, keys: Keys, device_key: str, fields: dict[str, str]) -> None:
    """Queue the index entries of a registry row being written with ``fields``."""
    token = fields.get("token")
    if not token:
        return
    mapping = {token_field(token): device_key}
    bid = fields.get("id")
    if bid:
        mapping[id_field(int(bid))] = device_key
    pipe.hset(keys.blynk_index(), mapping=mapping)  # type: ignore[arg-type]


async def index_static(redis: Redis, keys: Keys, devices: Sequence[DeviceEntry]) -> None:
    """Index the configuration's static device table (idempotent). ``load_static`` writes only
    rows that changed, so rows written before the index existed are indexed here."""
    for start in range(0, len(devices), 1000):
        part = devices[start:start + 1000]
        await redis.hset(keys.blynk_index(), mapping={
            token_field(d.token.reveal()): f"{d.source}:{d.integration}:{d.device}"
            for d in part})


async def resolve(redis: Redis, registry: Registry, keys: Keys,
                  who: Sequence[tuple[int | None, str | None]]) -> list[Device | None]:
    """The registry row of each ``(blynk_id, token)``: by token when given, else by id; a row
    that no longer carries that token or id is ``None`` (two round trips for the lot)."""
    fields: list[str] = []
    for blynk_id, token in who:
        fields.append(token_field(token) if token is not None
                      else id_field(blynk_id) if blynk_id is not None else "-")
    raw = await redis.hmget(keys.blynk_index(), fields) if fields else []
    device_keys = [v.decode() if isinstance(v, bytes) else None for v in raw]
    rows = await registry.get_many([k for k in device_keys if k is not None])
    out: list[Device | None] = []
    for (blynk_id, token), key in zip(who, device_keys, strict=True):
        dev = rows.get(key) if key is not None else None
        stale = dev is not None and (dev.token != token if token is not None
                                     else dev.blynk_id != blynk_id)
        if stale:
            dev = None
        out.append(dev)
    return out
