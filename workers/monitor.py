"""monitor: backlog gauges, integration statuses, trimming and idle-consumer removal.

Every ``interval_s`` the stage samples each stream partition and consumer group (``XINFO``) into
the ``bb_stream_*`` gauges, copies integration statuses into ``bb_integration_status``, then
keeps memory bounded:

* a stream is trimmed (``XTRIM MINID``) only below what **every** group has acknowledged: the
  floor is the minimum over groups of the oldest pending id, or the next id after the group's
  last-delivered id when nothing is pending. A stream without groups is never trimmed. The floor
  is computed and applied in one Lua script, so no read, ack or group change can slip between
  them;
* the dead stream has no groups (operators read it with ``blynk-bridge dead``); it is trimmed by
  age (``monitor.dead_retention_s``) and length (``monitor.dead_max_len``, oldest first, logged);
* consumers idle past ``monitor.consumer_idle_s`` with nothing pending are removed, also checked
  and done atomically (a consumer that took an entry meanwhile is kept: deleting it would drop
  its pending entries). A live consumer removed this way is recreated by its next read.

Several monitor replicas are harmless: every step is idempotent. Metrics are served by the
process's metrics server (``metrics.port``), where the monitor adds its status page
(:mod:`pipeline.status_page`: ``/``, ``/status.json``, ``POST /dead/replay``); the monitor opens
no port of its own.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from pipeline import metrics
from pipeline.backlog import STREAM_NAMES, StreamInfo, as_str, by_node, snapshot
from pipeline.context import Context
from pipeline.lifecycle import wait_event
from pipeline.metrics_http import Handler
from pipeline.status import StatusBoard, export_state
from pipeline.status_page import StatusPage
from pipeline.streams import now_ms

log = logging.getLogger("blynk_bridge.monitor")

# Stream ids are compared and incremented as decimal strings: sequence numbers go up to 2**64-1,
# past what a Lua number holds exactly.
_ID_LIB = """
local function split(id)
  return string.match(id, '^(%d+)-(%d+)$')
end
local function num_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_lt(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  if am ~= bm then return num_lt(am, bm) end
  return num_lt(as, bs)
end
local function incr(digits)
  local out, carry = {}, 1
  for i = #digits, 1, -1 do
    local d = string.byte(digits, i) - 48 + carry
    if d == 10 then d, carry = 0, 1 else carry = 0 end
    out[i] = string.char(48 + d)
  end
  local s = table.concat(out)
  if carry == 1 then s = '1' .. s end
  return s
end
local function next_id(id)
  local ms, seq = split(id)
  if seq == '18446744073709551615' then return incr(ms) .. '-0' end
  return ms .. '-' .. incr(seq)
end
local function field(row, name)
  for i = 1, #row, 2 do
    if row[i] == name then return row[i + 1] end
  end
  return nil
end
"""

#: KEYS[1] stream → {entries trimmed, floor id or ''}. Never trims a stream without groups.
_TRIM_ACKED = (
    _ID_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {0, ''} end
local floor = nil
for _, g in ipairs(groups) do
  local name = field(g, 'name')
  local pending = redis.call('XPENDING', KEYS[1], name)
  local candidate
  if pending[1] > 0 then
    candidate = pending[2]
  else
    candidate = next_id(field(g, 'last-delivered-id'))
  end
  if floor == nil or id_lt(candidate, floor) then floor = candidate end
end
return {redis.call('XTRIM', KEYS[1], 'MINID', floor), floor}
"""
)

#: KEYS[1] stream, ARGV[1] min idle ms → names of the removed consumers (as "group/consumer").
_REMOVE_IDLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local function field(row, name)
  for i = 1, #row, 2 do
    if row[i] == name then return row[i + 1] end
  end
  return nil
end
local min_idle = tonumber(ARGV[1])
local removed = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = field(g, 'name')
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], group)) do
    local name = field(c, 'name')
    if field(c, 'pending') == 0 and field(c, 'idle') >= min_idle then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, name)
      table.insert(removed, group .. '/' .. name)
    end
  end
end
return removed
"""


class MonitorStage:
    """Samples backlog into gauges and trims acknowledged entries every ``interval_s``."""

    name = "monitor"

    def __init__(self, ctx: Context, *, interval_s: float | None = None) -> None:
        cfg = ctx.config.monitor
        self._redis = ctx.redis
        self._keys = ctx.keys
        self._board = StatusBoard(ctx.redis, ctx.keys)
        self.interval_s = cfg.interval_s if interval_s is None else interval_s
        self.trim = cfg.trim
        self.dead_retention_ms = int(cfg.dead_retention_s * 1000)
        self.dead_max_len = cfg.dead_max_len
        self.consumer_idle_ms = int(cfg.consumer_idle_s * 1000)
        self._trim_acked = ctx.redis.register_script(_TRIM_ACKED)
        self._remove_idle = ctx.redis.register_script(_REMOVE_IDLE)
        self._latest: list[StreamInfo] = []
        self.page = StatusPage(ctx.redis, ctx.keys,
                               templates=[t.name for t in ctx.config.templates],
                               admin_token=cfg.admin_token, allowed_hosts=cfg.allowed_hosts,
                               latest_streams=lambda: self._latest)

    def routes(self) -> dict[tuple[str, str], Handler]:
        """The status page, served on the metrics port (:class:`pipeline.metrics_http.Serves`)."""
        return self.page.routes()

    async def startup(self) -> None:
        log.info("monitor: sampling every %.1fs, trimming %s", self.interval_s,
                 "on" if self.trim else "off")

    async def main_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self.sample_once()
                if self.trim:
                    await self.trim_once()
                await self.remove_idle_consumers()
                failures = 0
            except RedisError as exc:
                failures += 1
                log.warning("monitor: cycle failed (%s); %d in a row", exc, failures)
            await wait_event(stop, self.interval_s)

    async def shutdown(self) -> None:
        return None

    async def sample_once(self) -> list[StreamInfo]:
        """Read every stream and group into the gauges; returns what it read."""
        streams = await snapshot(self._redis, self._keys)
        now = now_ms()
        for s in streams:
            stream = self._keys.label(s.key)
            metrics.STREAM_LENGTH.labels(stream).set(s.length)
            for g in s.groups:
                metrics.STREAM_LAG.labels(stream, g.name).set(g.lag)
                metrics.STREAM_PENDING.labels(stream, g.name).set(g.pending)
                metrics.STREAM_CONSUMERS.labels(stream, g.name).set(g.consumers)
                metrics.STREAM_OLDEST_PENDING.labels(stream, g.name).set(
                    g.oldest_pending_age_s(now)
                )
        # A node that no longer holds a stream (a slot moved) must not keep its last value.
        metrics.NODE_LAG.clear()
        metrics.NODE_PENDING.clear()
        for t in by_node(streams):
            metrics.NODE_LAG.labels(t.node, t.group).set(t.lag)
            metrics.NODE_PENDING.labels(t.node, t.group).set(t.pending)
        for status in await self._board.all():
            export_state(status.kind, status.name, status.state)
        self._latest = streams
        self.page.sampled(streams, now)
        return streams

    async def trim_once(self) -> dict[str, int]:
        """Trim what every group acknowledged, and dead letters past retention.

        Returns entries removed per stream key (streams where nothing was removed included).
        """
        removed: dict[str, int] = {}
        for name in STREAM_NAMES:
            for key in self._keys.streams(name):
                count, _floor = await self._trim_acked(keys=[key])
                removed[key] = int(count)
        cutoff = now_ms() - self.dead_retention_ms
        for dead in self._keys.dead_streams():  # one per partition too in the cluster layout
            aged = int(await self._redis.xtrim(dead, minid=f"{max(cutoff, 0)}-0",
                                               approximate=False))
            capped = int(await self._redis.xtrim(dead, maxlen=self.dead_max_len,
                                                 approximate=False))
            if capped:
                log.warning("monitor: dead stream %s over %d letters: dropped the %d oldest",
                            self._keys.label(dead), self.dead_max_len, capped)
            removed[dead] = aged + capped
        for key, count in removed.items():
            if count:
                metrics.TRIMMED.labels(self._keys.label(key)).inc(count)
        return removed

    async def remove_idle_consumers(self) -> list[str]:
        """Remove consumers idle past the limit with nothing pending; returns ``key group/name``."""
        out: list[str] = []
        for name in STREAM_NAMES:
            for key in self._keys.streams(name):
                gone = await self._remove_idle(keys=[key], args=[self.consumer_idle_ms])
                if gone:
                    metrics.CONSUMERS_REMOVED.labels(self._keys.label(key)).inc(len(gone))
                    log.info("monitor: removed idle consumers of %s: %s", key,
                             ", ".join(as_str(g) for g in gone))
                out.extend(f"{key} {as_str(g)}" for g in gone)
        return out


def build(ctx: Context) -> MonitorStage:
    return MonitorStage(ctx)
