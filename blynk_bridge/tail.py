"""``blynk-bridge tail uplinks|writes|downlinks|dead [--device ID] [--json]``: entries as they
arrive, like a debug node.

Reads with plain ``XREAD BLOCK`` from where each partition of the stream ended when the command
started — never through a consumer group, so nothing is delivered, claimed or acked: tailing
takes no work from the stages and leaves no pending entry behind. Entries appended before the
start are not shown. One line per entry (:func:`describe`), or one JSON object per line with
``--json`` (:mod:`blynk_bridge.output`); tokens are masked either way. ``--device`` keeps the
entries of one source device (a write's device key, a downlink's Blynk name or id, a dead
letter's decoded entry or MQTT topic). Ctrl-C (or SIGTERM) ends it with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from blynk_bridge.ops import decode_original, mask_secrets
from blynk_bridge.output import print_json_line
from blynk_bridge.watch import run_live
from pipeline import config as config_mod
from pipeline import events
from pipeline.backlog import as_str
from pipeline.keys import DEAD, DOWNLINKS, UPLINKS, WRITES, Keys
from pipeline.lifecycle import until_stopped
from pipeline.redact import mask, redact_text, redact_url
from pipeline.streams import Redis

#: What ``tail`` follows, in data-flow order.
NAMES = (UPLINKS, WRITES, DOWNLINKS, DEAD)


@dataclass(frozen=True, slots=True)
class Shown:
    """One stream entry as ``tail`` shows it."""

    stream: str
    id: str
    #: The source devices (or Blynk names) the entry concerns, for ``--device``.
    devices: frozenset[str]
    line: str
    doc: dict[str, Any]


def _clock(entry_id: str) -> str:
    ms = int(entry_id.partition("-")[0])
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]


def _pairs(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "-"


def _device_of_key(key: str) -> str:
    """``tts:farm:dev-1#ab12`` → ``dev-1`` (the device part of a registry device key)."""
    return key.split("#", 1)[0].split(":", 2)[-1]


def describe(name: str, entry_id: str, raw: bytes | None, keys: Keys) -> Shown:
    """Decode one entry of the ``name`` stream for display (pure; undecodable is shown too)."""
    base = {"stream": name, "id": entry_id, "time": datetime.fromtimestamp(
        int(entry_id.partition("-")[0]) / 1000, UTC).isoformat(timespec="milliseconds")}
    try:
        if raw is None:
            raise msgspec.DecodeError("no `d` field")
        if name == UPLINKS:
            u = events.decode_uplink(raw)
            line = (f"{u.source}:{u.integration} {u.device} {u.kind} {_pairs(u.values)}"
                    + (" (token in message)" if u.token else ""))
            return Shown(name, entry_id, frozenset({u.device}), line,
                         base | {"entry": mask_secrets(msgspec.to_builtins(u))})
        if name == WRITES:
            w = events.decode_write(raw)
            line = (f"{w.device_key} {_pairs(w.pins)} -> {redact_url(w.server)} "
                    f"token {mask(w.token)}")
            return Shown(name, entry_id, frozenset({_device_of_key(w.device_key), w.device_key}),
                         line, base | {"entry": mask_secrets(events.fields(w))})
        if name == DOWNLINKS:
            d = events.decode_downlink(raw)
            who = d.device_name or (str(d.blynk_id) if d.blynk_id is not None else "?")
            names = {n for n in (d.device_name, str(d.blynk_id) if d.blynk_id else None) if n}
            return Shown(name, entry_id, frozenset(names), f"{d.origin} {who} {d.pin}={d.value}",
                         base | {"entry": mask_secrets(msgspec.to_builtins(d))})
        letter = events.decode_dead(raw)
        original = decode_original(letter, keys)
        found: set[str] = set()
        if isinstance(original, dict):
            for field in ("device", "device_name"):
                if isinstance(original.get(field), str):
                    found.add(original[field])
            if isinstance(original.get("device_key"), str):
                found.add(_device_of_key(original["device_key"]))
        if "/devices/" in letter.stream:  # a TTS topic: v3/{app}/devices/{id}/up
            found.add(letter.stream.split("/devices/", 1)[1].split("/", 1)[0])
        line = (f"{letter.stage} {letter.reason} from {letter.stream}"
                f"{' ' + ','.join(sorted(found)) if found else ''}: {redact_text(letter.detail)}")
        doc = base | {"stage": letter.stage, "reason": letter.reason, "origin": letter.stream,
                      "detail": redact_text(letter.detail), "attempts": letter.attempts,
                      "entry": original}
        return Shown(name, entry_id, frozenset(found), line, doc)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return Shown(name, entry_id, frozenset(), f"undecodable entry: {exc}",
                     base | {"error": f"undecodable: {exc}"})


def streams_of(name: str, keys: Keys) -> list[str]:
    return keys.dead_streams() if name == DEAD else keys.streams(name)


async def start_ids(redis: Redis, streams: list[str]) -> dict[str, str]:
    """Where each stream ends now (``0-0`` for an empty or missing one: nothing older to skip)."""
    ids: dict[str, str] = {}
    for key in streams:
        last = await redis.xrevrange(key, count=1)
        ids[key] = as_str(last[0][0]) if last else "0-0"
    return ids


async def follow(redis: Redis, keys: Keys, name: str, show: Callable[[Shown], None],
                 stop: asyncio.Event, *, device: str | None = None,
                 ready: Callable[[], None] | None = None, block_ms: int = 5000) -> None:
    """Show each entry appended to the ``name`` stream (every partition) from now until
    ``stop``; ``ready`` is called once the start positions are taken."""
    ids = await start_ids(redis, streams_of(name, keys))
    if ready is not None:
        ready()
    while not stop.is_set():
        got: Any = await until_stopped(
            redis.xread(dict(ids.items()), count=500, block=block_ms), stop)
        for key, entries in got or []:
            for entry_id, fields in entries:
                eid = as_str(entry_id)
                ids[as_str(key)] = eid
                shown = describe(name, eid, (fields or {}).get(events.FIELD), keys)
                if device is None or device in shown.devices:
                    show(shown)


def cmd_tail(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    keys = cfg.redis.keys()

    def show(shown: Shown) -> None:
        if args.json:
            print_json_line(shown.doc)
        else:
            print(f"{_clock(shown.id)} {shown.stream:<9} {shown.line}", flush=True)

    def ready() -> None:
        what = f" of device {args.device}" if args.device else ""
        print(f"tail: {', '.join(streams_of(args.stream, keys))}: new entries{what} "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)

    async def body(redis: Redis, stop: asyncio.Event) -> None:
        await follow(redis, keys, args.stream, show, stop, device=args.device, ready=ready)

    return run_live(cfg.redis.url, body, cluster=cfg.redis.is_cluster)
