"""``blynk-bridge lag --watch`` and ``blynk-bridge top``: live views of the streams.

Both sample the streams every ``--interval`` seconds (:func:`pipeline.backlog.snapshot`: length,
and per consumer group lag, pending, consumers) and derive rates from two samples: a stream's
``entries-added`` gives what was appended per second, a group's ``entries-read`` what it read per
second (Redis >= 7; ``-`` where Redis cannot tell). Reads only: no group is joined, nothing
acked. ``lag --watch`` is the ``lag`` table, refreshed, with those rates; ``top`` is one row per
stage (ingest, transform, egress, downlink, dead letters) with the integration statuses below.

On a terminal the view refreshes in place (rich ``Live``); otherwise (a pipe, a log file) each
sample prints plain lines, or one JSON object per line with ``--json``. ``--count N`` stops
after N samples; Ctrl-C (or SIGTERM) stops with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from blynk_bridge.output import print_json_line
from pipeline import config as config_mod
from pipeline.backlog import GroupInfo, StreamInfo, snapshot
from pipeline.keys import (
    DEAD,
    DOWNLINKS,
    GROUP_DOWNLINK,
    GROUP_EGRESS,
    GROUP_TRANSFORM,
    UPLINKS,
    WRITES,
    Keys,
)
from pipeline.lifecycle import wait_event
from pipeline.redact import redact_url, safe_url
from pipeline.status import IntegrationStatus, StatusBoard
from pipeline.streams import Redis, connect, now_ms


@dataclass(frozen=True, slots=True)
class Sample:
    """The streams at one moment (monotonic seconds and wall-clock ms)."""

    at: float
    now_ms: int
    streams: list[StreamInfo]
    statuses: list[IntegrationStatus]


def _rate(cur: int | None, prev: int | None, seconds: float) -> float | None:
    if cur is None or prev is None or seconds <= 0:
        return None
    return max(0, cur - prev) / seconds


def added_rates(cur: Sample, prev: Sample | None) -> dict[str, float | None]:
    """Stream key → entries appended per second since ``prev`` (``None``: not known yet)."""
    before = {s.key: s.entries_added for s in prev.streams} if prev else {}
    dt = cur.at - prev.at if prev else 0.0
    return {s.key: _rate(s.entries_added, before.get(s.key), dt) for s in cur.streams}


def _read(s: StreamInfo, g: GroupInfo) -> int | None:
    """Entries ever delivered to the group. Redis leaves ``entries-read`` nil until a group
    has read (and after some deletions); lag is appended minus read, so that is the read count
    wherever the lag is exact."""
    if g.entries_read is not None:
        return g.entries_read
    if s.entries_added is not None and g.lag_exact:
        return s.entries_added - g.lag
    return None


def read_rates(cur: Sample, prev: Sample | None) -> dict[tuple[str, str], float | None]:
    """(stream key, group) → entries the group read per second since ``prev``."""
    before = ({(s.key, g.name): _read(s, g) for s in prev.streams for g in s.groups}
              if prev else {})
    dt = cur.at - prev.at if prev else 0.0
    return {(s.key, g.name): _rate(_read(s, g), before.get((s.key, g.name)), dt)
            for s in cur.streams for g in s.groups}


def _sum(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _show(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


#: ``top``'s rows: stage → (the stream it reads, its group); ingest and dead only append.
STAGE_READS: dict[str, tuple[str, str]] = {
    "transform": (UPLINKS, GROUP_TRANSFORM),
    "egress": (WRITES, GROUP_EGRESS),
    "downlink": (DOWNLINKS, GROUP_DOWNLINK),
}


def stage_rows(cur: Sample, prev: Sample | None) -> list[dict[str, Any]]:
    """One row per stage: in/s, out/s, lag, pending, consumers, oldest pending (s)."""
    added = added_rates(cur, prev)
    read = read_rates(cur, prev)

    def appended(name: str) -> float | None:
        return _sum([added[s.key] for s in cur.streams if s.name == name])

    rows: list[dict[str, Any]] = [{
        "stage": "ingest", "in_per_s": None,
        "out_per_s": _sum([appended(UPLINKS), appended(DOWNLINKS)]),
        "lag": None, "pending": None, "consumers": None, "oldest_pending_s": None,
    }]
    outputs = {"transform": appended(WRITES), "egress": None, "downlink": None}
    for stage, (stream, group) in STAGE_READS.items():
        groups = [(s, g) for s in cur.streams if s.name == stream for g in s.groups
                  if g.name == group]
        rows.append({
            "stage": stage,
            "in_per_s": _sum([read[(s.key, g.name)] for s, g in groups]),
            "out_per_s": outputs[stage],
            "lag": sum(g.lag for _, g in groups) if groups else None,
            "pending": sum(g.pending for _, g in groups) if groups else None,
            "consumers": sum(g.consumers for _, g in groups) if groups else None,
            "oldest_pending_s": round(max((g.oldest_pending_age_s(cur.now_ms)
                                           for _, g in groups), default=0.0), 1),
        })
    dead = [s for s in cur.streams if s.name == DEAD]
    rows.append({"stage": "dead letters", "in_per_s": appended(DEAD), "out_per_s": None,
                 "lag": None, "pending": None, "consumers": None, "oldest_pending_s": None,
                 "length": sum(s.length for s in dead)})
    return rows


def lag_rows(cur: Sample, prev: Sample | None) -> list[dict[str, Any]]:
    """One row per stream and group (streams without groups: one row), with rates."""
    added = added_rates(cur, prev)
    read = read_rates(cur, prev)
    rows = []
    for s in cur.streams:
        base = {"stream": s.key, "length": s.length, "added_per_s": added[s.key]}
        if not s.groups:
            rows.append(base | {"group": None})
        for g in s.groups:
            rows.append(base | {
                "group": g.name, "lag": g.lag, "pending": g.pending, "consumers": g.consumers,
                "read_per_s": read[(s.key, g.name)],
                "oldest_pending_s": round(g.oldest_pending_age_s(cur.now_ms), 1)})
    return rows


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return _show(v) if isinstance(v, float) else str(v)


def lag_table(cur: Sample, prev: Sample | None) -> Table:
    table = Table(title=f"blynk-bridge streams at {_clock(cur.now_ms)} UTC")
    cols = ("stream", "group", "length", "added/s", "lag", "pending", "read/s", "consumers",
            "oldest pending s")
    for col in cols:
        table.add_column(col, justify="left" if col in ("stream", "group") else "right")
    for r in lag_rows(cur, prev):
        table.add_row(r["stream"], r["group"] or "-", str(r["length"]),
                      _show(r["added_per_s"]), *(_cell(r.get(k)) for k in (
                          "lag", "pending", "read_per_s", "consumers", "oldest_pending_s")))
    return table


def top_view(cur: Sample, prev: Sample | None) -> RenderableType:
    stages = Table(title=f"blynk-bridge top at {_clock(cur.now_ms)} UTC (Ctrl-C quits)")
    for col in ("stage", "in/s", "out/s", "lag", "pending", "consumers", "oldest pending s"):
        stages.add_column(col, justify="left" if col == "stage" else "right")
    for r in stage_rows(cur, prev):
        stages.add_row(r["stage"], *(_cell(r[k]) for k in (
            "in_per_s", "out_per_s", "lag", "pending", "consumers", "oldest_pending_s")))
    statuses = Table(title="integrations")
    for col in ("integration", "state", "since", "last error"):
        statuses.add_column(col)
    for st in cur.statuses:
        statuses.add_row(f"{st.kind}:{st.name}", str(st.state),
                         f"{max(0, cur.now_ms - st.since_ms) / 1000:.0f}s ago",
                         redact_url(st.last_error or "-"))
    if not cur.statuses:
        statuses.add_row("-", "no integration has reported yet", "", "")
    return Group(stages, statuses)


def top_line(cur: Sample, prev: Sample | None) -> str:
    """``top`` off a terminal: one line per sample."""
    parts = []
    for r in stage_rows(cur, prev):
        if r["stage"] == "ingest":
            parts.append(f"ingest {_show(r['out_per_s'])}/s")
        elif r["stage"] == "dead letters":
            parts.append(f"dead {_show(r['in_per_s'])}/s (total {r['length']})")
        else:
            parts.append(f"{r['stage']} {_show(r['in_per_s'])}/s lag {_cell(r['lag'])} "
                         f"pending {_cell(r['pending'])}")
    return f"{_clock(cur.now_ms)} " + "; ".join(parts)


def lag_lines(cur: Sample, prev: Sample | None) -> str:
    """``lag --watch`` off a terminal: one line per stream/group, per sample."""
    out = []
    for r in lag_rows(cur, prev):
        line = (f"{_clock(cur.now_ms)} {r['stream']} length={r['length']} "
                f"added/s={_show(r['added_per_s'])}")
        if r["group"] is not None:
            line += (f" group={r['group']} lag={r['lag']} pending={r['pending']} "
                     f"read/s={_show(r['read_per_s'])} consumers={r['consumers']}")
        out.append(line)
    return "\n".join(out)


async def take(redis: Redis, keys: Keys) -> Sample:
    streams = await snapshot(redis, keys)
    return Sample(time.monotonic(), now_ms(), streams, await StatusBoard(redis, keys).all())


@dataclass(frozen=True, slots=True)
class View:
    """How one command shows a sample: on a terminal, as text lines, as a JSON object."""

    rich: Callable[[Sample, Sample | None], RenderableType]
    text: Callable[[Sample, Sample | None], str]
    doc: Callable[[Sample, Sample | None], dict[str, Any]]


LAG = View(lag_table, lag_lines, lambda c, p: {"time": _iso(c.now_ms),
                                               "streams": lag_rows(c, p)})
TOP = View(top_view, top_line, lambda c, p: {
    "time": _iso(c.now_ms), "stages": stage_rows(c, p),
    "integrations": [{"kind": s.kind, "name": s.name, "state": str(s.state),
                      "last_error": redact_url(s.last_error or "") or None}
                     for s in c.statuses]})


async def watch(redis: Redis, keys: Keys, view: View, *, interval_s: float, count: int | None,
                as_json: bool, stop: asyncio.Event, tty: bool) -> None:
    """Sample and show until ``stop`` (or ``count`` samples)."""
    prev: Sample | None = None
    shown = 0
    live = (Live(console=Console(), refresh_per_second=4, transient=False) if tty and not as_json
            else contextlib.nullcontext())
    with live as screen:
        while not stop.is_set() and (count is None or shown < count):
            cur = await take(redis, keys)
            if screen is not None:
                screen.update(view.rich(cur, prev))
            elif as_json:
                print_json_line(view.doc(cur, prev))
            else:
                print(view.text(cur, prev), flush=True)
            prev = cur
            shown += 1
            if count is not None and shown >= count:
                break
            await wait_event(stop, interval_s)


def run_live(url: str, body: Callable[[Redis, asyncio.Event], Awaitable[None]], *,
             cluster: bool = False) -> int:
    """Run ``body(redis, stop)`` until it returns; SIGINT/SIGTERM set ``stop`` (so Ctrl-C ends a
    live command cleanly, not with a traceback). A Redis error is said on stderr, URL redacted,
    and gives exit status 1; otherwise 0. Shared by the live views and ``tail``."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        redis = connect(url, cluster=cluster)
        try:
            await body(redis, stop)
        finally:
            await redis.aclose()

    try:
        asyncio.run(main())
    except RedisError as exc:
        print(f"Redis at {safe_url(url)}: {exc}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, view: View) -> int:
    """Run a live view for a command line (``lag --watch``, ``top``)."""
    cfg = config_mod.load(args.config)
    keys = cfg.redis.keys()

    async def body(redis: Redis, stop: asyncio.Event) -> None:
        await watch(redis, keys, view, interval_s=args.interval, count=args.count,
                    as_json=bool(args.json), stop=stop, tty=sys.stdout.isatty())

    return run_live(cfg.redis.url, body, cluster=cfg.redis.is_cluster)


def cmd_top(args: argparse.Namespace) -> int:
    return run(args, TOP)


def cmd_lag_watch(args: argparse.Namespace) -> int:
    return run(args, LAG)
