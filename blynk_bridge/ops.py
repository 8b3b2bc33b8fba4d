"""Operator commands: ``lag``, ``status``, ``dead list|show|replay|purge`` and
``devices list|show|unbreak|reindex``.

Each ``cmd_*`` takes the parsed arguments of :mod:`blynk_bridge.cli` and returns an exit code:
0 done, 1 done in part (a dead letter not found or not replayable, Redis unreachable), 2 the
request itself was wrong. Nothing asks questions, so every command scripts. Tokens are never
printed in full (:func:`pipeline.redact.mask`). With ``--json`` each prints one JSON object
(:mod:`blynk_bridge.output`): ``{"streams"}``, ``{"integrations", "unmapped"}``,
``{"dead_letters", "total"}``, ``{"replayed", "refused"}``, ``{"purged"}``, ``{"devices",
"broken"}``, ``{"unbroken"}``, ``{"index_entries_written"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from blynk_bridge.output import print_json
from pipeline import blynk_index, events
from pipeline import config as config_mod
from pipeline.backlog import StreamInfo, as_str, by_node, snapshot
from pipeline.deadletters import (
    DeadRow,
    dead_total,
    delete_dead,
    get_dead,
    letter_summary,
    matches,
    pipeline_streams,
    replay,
    scan_dead,
)
from pipeline.keys import DOWNLINKS, UPLINKS, WRITES, Keys
from pipeline.lease import owner_of
from pipeline.order import LastWritten
from pipeline.redact import mask, redact_text, safe_url
from pipeline.registry import Device, Registry
from pipeline.status import StatusBoard
from pipeline.streams import Redis, connect, now_ms

T = TypeVar("T")

#: Dict keys whose values are secrets wherever they appear in a decoded entry.
SECRET_KEYS = frozenset({"token", "t", "api_key", "access_token", "password", "secret"})



def _console() -> Console:
    # Off a terminal (pipes, tests) rich would wrap at 80 columns and split stream names.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def _safe_url(url: str) -> str:
    """A Redis URL without its password."""
    return safe_url(url)


@asynccontextmanager
async def _redis(cfg: config_mod.Config) -> AsyncIterator[tuple[Redis, Keys]]:
    redis = connect(cfg.redis.url, cluster=cfg.redis.is_cluster)
    try:
        yield redis, cfg.redis.keys()
    finally:
        await redis.aclose()


def _run(cfg: config_mod.Config, work: Callable[[Redis, Keys], Awaitable[T]]) -> T | None:
    """Run ``work`` against the configured Redis; ``None`` (and a message) on Redis errors."""

    async def main() -> T:
        async with _redis(cfg) as (redis, keys):
            return await work(redis, keys)

    try:
        return asyncio.run(main())
    except RedisError as exc:
        print(f"Redis at {_safe_url(cfg.redis.url)}: {exc}", file=sys.stderr)
        return None


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


# ---------------------------------------------------------------------------------------- lag


def lag_rows(streams: Iterable[StreamInfo], now: int) -> list[dict[str, Any]]:
    """One JSON-able row per stream, groups nested (the ``--json`` shape)."""
    return [
        {
            "stream": s.name,
            "key": s.key,
            "partition": s.partition,
            "node": s.node,
            "length": s.length,
            "groups": [
                {
                    "group": g.name,
                    "lag": g.lag,
                    "lag_exact": g.lag_exact,
                    "pending": g.pending,
                    "consumers": g.consumers,
                    "last_delivered_id": g.last_delivered_id,
                    "oldest_pending_id": g.oldest_pending_id,
                    "oldest_pending_age_s": round(g.oldest_pending_age_s(now), 3),
                }
                for g in s.groups
            ],
        }
        for s in streams
    ]


def node_rows(streams: list[StreamInfo]) -> list[dict[str, Any]]:
    """Per Redis node and group: the sums of its streams (the ``--json --nodes`` shape)."""
    return [{"node": t.node, "group": t.group, "streams": t.streams, "length": t.length,
             "lag": t.lag, "pending": t.pending} for t in by_node(streams)]


def cmd_lag(args: argparse.Namespace) -> int:
    """Every stream (each partition) and group: length, lag, pending, consumers, oldest
    pending, with its partition and Redis node; then the sums per node and group."""
    streams = _run(config_mod.load(args.config), snapshot)
    if streams is None:
        return 1
    now = now_ms()
    if getattr(args, "json", False):
        if getattr(args, "nodes", False):
            print_json({"nodes": node_rows(streams)})
        else:
            print_json({"streams": lag_rows(streams, now)})
        return 0
    table = Table(title="blynk-bridge streams")
    for col in ("stream", "partition", "node", "group", "length", "lag", "pending", "consumers",
                "oldest pending"):
        table.add_column(col, justify="left" if col in ("stream", "node", "group") else "right")
    for s in streams:
        part = "-" if s.partition is None else str(s.partition)
        if not s.groups:
            table.add_row(s.key, part, s.node, "-", str(s.length), "", "", "", "")
        for g in s.groups:
            lag = str(g.lag) if g.lag_exact else f">={g.lag}"
            table.add_row(s.key, part, s.node, g.name, str(s.length), lag, str(g.pending),
                          str(g.consumers), _age(g.oldest_pending_age_s(now)))
    _console().print(table)
    nodes = Table(title="per Redis node")
    for col in ("node", "group", "streams", "length", "lag", "pending"):
        nodes.add_column(col, justify="left" if col in ("node", "group") else "right")
    for t in by_node(streams):
        nodes.add_row(t.node, t.group, str(t.streams), str(t.length), str(t.lag),
                      str(t.pending))
    _console().print(nodes)
    return 0


# ------------------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    """Integration statuses and, per template, decoded keys that have no datastream."""
    cfg = config_mod.load(args.config)

    async def work(redis: Redis, keys: Keys
                   ) -> tuple[list[Any], dict[str, dict[str, int]], int, dict[str, list[str]]]:
        statuses = await StatusBoard(redis, keys).all()
        unmapped = {}
        for t in cfg.templates:
            raw = await redis.hgetall(keys.unmapped(t.name))
            unmapped[t.name] = {as_str(k): int(v) for k, v in sorted(raw.items())}
        superseded = int(await redis.get(keys.superseded()) or 0)
        return statuses, unmapped, superseded, await partition_owners(redis, keys)

    result = _run(cfg, work)
    if result is None:
        return 1
    statuses, unmapped, superseded, owners = result
    if getattr(args, "json", False):
        out = {
            "integrations": [
                {**msgspec.to_builtins(s), "last_error": redact_text(s.last_error or "") or None}
                for s in statuses
            ],
            "unmapped": unmapped,
            "superseded_values": superseded,
            "partition_owners": owners,
        }
        print_json(out)
        return 0
    console = _console()
    table = Table(title="integrations")
    for col in ("kind", "name", "state", "since", "last error", "error kind", "owner"):
        table.add_column(col)
    for s in statuses:
        table.add_row(s.kind, s.name, str(s.state), _time(s.since_ms),
                      redact_text(s.last_error or "-"), s.error_kind or "-", s.owner or "-")
    if not statuses:
        table.add_row("-", "no integration has reported yet", "", "", "", "", "")
    console.print(table)
    keys_table = Table(title="decoded keys with no datastream")
    for col in ("template", "key", "count"):
        keys_table.add_column(col, justify="right" if col == "count" else "left")
    for template, counts in unmapped.items():
        for key, count in counts.items():
            keys_table.add_row(template, key, str(count))
    if not any(unmapped.values()):
        keys_table.add_row("-", "none", "")
    console.print(keys_table)
    # Values a newer one replaced before egress wrote them: not lost (Blynk got the newer
    # one), but not in Blynk's history either; `history: true` on a datastream keeps them.
    console.print(f"superseded values (replaced by a newer one before they were written; "
                  f"datastreams without history: true): {superseded}")
    owners_table = Table(title="partition owners (a partition without one waits for a replica)")
    for col in ("stage", "partition", "owner"):
        owners_table.add_column(col)
    for stage, names in owners.items():
        for p, name in enumerate(names):
            owners_table.add_row(stage, str(p), name or "- (none)")
    console.print(owners_table)
    return 0


async def partition_owners(redis: Redis, keys: Keys) -> dict[str, list[str]]:
    """Per stage that owns partitions through leases (transform: uplinks, egress: writes), the
    replica holding each partition's lease now ('' = none: its entries wait for a replica)."""
    leases = {"transform": keys.transform_lease, "egress": keys.egress_lease}
    async with redis.pipeline(transaction=False) as pipe:
        for lease in leases.values():
            for p in range(keys.partitions):
                pipe.get(lease(p))
        values = await pipe.execute()
    out: dict[str, list[str]] = {}
    for i, stage in enumerate(leases):
        held = values[i * keys.partitions:(i + 1) * keys.partitions]
        out[stage] = [owner_of(v) if v else "" for v in held]
    return out


# --------------------------------------------------------------------------------------- dead


def mask_secrets(value: Any) -> Any:
    """``value`` (JSON-able data) with the values of :data:`SECRET_KEYS` masked, at any depth."""
    if isinstance(value, dict):
        return {
            k: (mask(str(v)) if k in SECRET_KEYS and isinstance(v, str) else mask_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def decode_original(letter: events.DeadLetter, keys: Keys) -> Any:
    """The dead entry's payload as JSON-able data, secrets masked.

    Decoded as the event its origin stream carries (``Uplink``, ``BlynkWrite``, ``Downlink``);
    anything else (an MQTT payload from ingest, bytes that do not decode) falls back to generic
    msgpack or JSON, then to ``repr``.
    """
    decoders: dict[str, Callable[[bytes], Any]] = {
        UPLINKS: events.decode_uplink,
        WRITES: events.decode_write,
        DOWNLINKS: events.decode_downlink,
    }
    name = pipeline_streams(keys).get(letter.stream)
    candidates: list[Callable[[bytes], Any]] = []
    if name is not None:
        candidates.append(decoders[name])
    candidates += [msgspec.msgpack.decode, msgspec.json.decode]
    for decode in candidates:
        try:
            value = decode(letter.raw)
            return mask_secrets(events.fields(value) if isinstance(value, msgspec.Struct)
                                else msgspec.to_builtins(value))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return repr(letter.raw[:2000])


def cmd_dead(args: argparse.Namespace) -> int:
    """``dead list|show|replay|purge`` (see the module docstring for exit codes)."""
    action: str = args.action
    ids: list[str] = list(args.ids or [])
    reason: str | None = args.reason
    every: bool = bool(getattr(args, "all", False))
    if action == "show" and not ids:
        print("dead show: give one or more dead-letter ids (see `dead list`)", file=sys.stderr)
        return 2
    if action in ("replay", "purge") and not (ids or reason or every):
        print(f"dead {action}: give ids, --reason REASON, or --all", file=sys.stderr)
        return 2
    cfg = config_mod.load(args.config)
    as_json = bool(getattr(args, "json", False))

    async def work(redis: Redis, keys: Keys) -> int:
        missing: list[str] = []
        if ids:
            found = await get_dead(redis, keys, ids)
            missing = [i for i, r in found.items() if r is None]
            rows = [r for r in found.values() if r is not None and matches(r, reason)]
        else:
            limit = args.limit if action == "list" else None
            rows = await scan_dead(redis, keys, reason=reason, limit=limit)
        for eid in missing:
            print(f"no dead letter {eid}", file=sys.stderr)
        if action == "list":
            _print_list(rows, await dead_total(redis, keys), as_json)
        elif action == "show":
            # The decoded entry is the point of `show`: JSON either way.
            print_json({"dead_letters": [_shown(row, keys) for row in rows]})
        elif action == "replay":
            done = await replay(redis, keys, rows)
            replayed = {d for d, _, _ in done}
            refused = [r for r in rows if r.id not in replayed]
            if as_json:
                print_json({"replayed": [{"id": d, "stream": st, "new_id": n}
                                         for d, st, n in done],
                            "refused": [r.id for r in refused]})
            for dead_id, stream, new_id in done if not as_json else ():
                print(f"replayed {dead_id} -> {stream} as {new_id}")
            for r in refused:
                if r.letter is not None and r.letter.truncated:
                    why = (f"only the first {len(r.letter.raw)} of its {r.letter.raw_size} "
                           f"bytes were kept (digest {r.letter.raw_digest})")
                else:
                    origin = r.letter.stream if r.letter else "?"
                    why = (f"its origin {origin!r} is not a pipeline stream (ingest keeps the "
                           "MQTT topic or request there)")
                print(f"cannot replay {r.id}: {why}; inspect it with `dead show` and send it "
                      "again from its source", file=sys.stderr)
            if not as_json:
                print(f"replayed {len(done)} of {len(rows)} dead letters")
            if refused:
                return 1
        else:  # purge
            purged = await delete_dead(redis, keys, rows) if rows else 0
            if as_json:
                print_json({"purged": purged})
            else:
                print(f"purged {purged} dead letters")
        return 1 if missing else 0

    rc = _run(cfg, work)
    return 1 if rc is None else rc


def _print_list(rows: list[DeadRow], total: int, as_json: bool) -> None:
    if as_json:
        print_json({"dead_letters": [letter_summary(row) for row in rows], "total": total})
        return
    table = Table(title=f"dead letters ({len(rows)} shown of {total})")
    for col in ("id", "time", "stage", "reason", "attempts", "origin", "detail"):
        table.add_column(col, justify="right" if col == "attempts" else "left")
    for row in rows:
        s = letter_summary(row)
        if row.letter is None:
            table.add_row(row.id, "", "", "undecodable", "", "", str(row.error))
            continue
        detail = s["detail"] if len(s["detail"]) <= 80 else s["detail"][:79] + "…"
        table.add_row(s["id"], s["time"], s["stage"], s["reason"], str(s["attempts"]),
                      s["stream"], detail)
    _console().print(table)


def _shown(row: DeadRow, keys: Keys) -> dict[str, Any]:
    """A dead letter in full for ``dead show``: its summary, replayability, decoded entry."""
    out = letter_summary(row)
    if row.letter is not None:
        out["replayable"] = row.letter.stream in pipeline_streams(keys) and not row.letter.truncated
        out["entry"] = decode_original(row.letter, keys)
    return out


# ------------------------------------------------------------------------------------ devices


def _device_row(dev: Device, since_ms: int | None) -> dict[str, Any]:
    """A registry row as JSON-able data, the token masked."""
    return {
        "key": dev.key,
        "status": dev.status,
        "reason": dev.reason,
        "detail": dev.detail,
        "broken_since": _time(since_ms) if since_ms is not None else None,
        "template": dev.template,
        "server": dev.server,
        "blynk_id": dev.blynk_id,
        "token": mask(dev.token),
    }


async def _scan_devices(redis: Redis, keys: Keys, limit: int) -> list[str]:
    """Device keys of registry rows (``SCAN``; at most ``limit``)."""
    out: list[str] = []
    for row_prefix in keys.device_prefixes():
        async for raw in redis.scan_iter(match=f"{row_prefix}*", count=1000):
            out.append(as_str(raw)[len(row_prefix):])
            if len(out) >= limit:
                return sorted(out)
    return sorted(out)


def cmd_devices(args: argparse.Namespace) -> int:
    """``devices list|show|unbreak|reindex`` (see the module docstring for exit codes)."""
    action: str = args.action
    keys_given: list[str] = list(getattr(args, "keys", None) or [])
    every = bool(getattr(args, "all", False))
    as_json = bool(getattr(args, "json", False))
    if action == "show" and not keys_given:
        print("devices show: give one or more device keys (see `devices list`)", file=sys.stderr)
        return 2
    if action == "unbreak" and not (keys_given or every):
        print("devices unbreak: give device keys, or --all for every broken device",
              file=sys.stderr)
        return 2
    cfg = config_mod.load(args.config)

    async def work(redis: Redis, keys: Keys) -> int:
        if action == "reindex":
            written = await blynk_index.backfill(redis, keys)
            if as_json:
                print_json({"index_entries_written": written})
            else:
                print(f"registry indexed for downlinks: {written} index entries written")
            return 0
        registry = Registry(redis, keys)
        since = dict(await registry.broken())
        if action == "list":
            wanted = (await _scan_devices(redis, keys, args.limit) if every
                      else list(since)[: args.limit])
            rows = [d for d in (await registry.load(wanted)).values() if d is not None]
            _print_devices(rows, since, as_json)
            return 0
        missing: list[str] = []
        if action == "show":
            found = await registry.load(keys_given)
            out = []
            for key in keys_given:
                dev = found.get(key)
                if dev is None:
                    missing.append(key)
                    continue
                row = _device_row(dev, since.get(key))
                row["last_written"] = await LastWritten(redis, keys).get(key)
                out.append(row)
            print_json({"devices": out, "broken": len(since)})
        else:  # unbreak
            unbroken = []
            for key in keys_given or list(since):
                if await registry.mark_ok(key, by="operator"):
                    unbroken.append(key)
                    if not as_json:
                        print(f"{key}: set back to ok; its next uplink tries its token again")
                else:
                    missing.append(key)
            if as_json:
                print_json({"unbroken": unbroken})
        for key in missing:
            print(f"no device {key} in the registry", file=sys.stderr)
        return 1 if missing else 0

    rc = _run(cfg, work)
    return 1 if rc is None else rc


def _print_devices(rows: list[Device], since: dict[str, int], as_json: bool) -> None:
    if as_json:
        print_json({"devices": [_device_row(dev, since.get(dev.key)) for dev in rows],
                    "broken": len(since)})
        return
    table = Table(title=f"devices ({len(rows)} shown, {len(since)} broken)")
    for col in ("key", "status", "since", "reason", "detail", "token"):
        table.add_column(col)
    for dev in rows:
        s = _device_row(dev, since.get(dev.key))
        table.add_row(s["key"], s["status"], s["broken_since"] or "-", s["reason"] or "-",
                      (s["detail"] or "-")[:80], s["token"])
    if not rows:
        table.add_row("-", "no broken device", "", "", "", "")
    _console().print(table)
