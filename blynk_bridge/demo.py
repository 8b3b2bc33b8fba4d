"""``blynk-bridge demo``: the whole pipeline on emulated clouds with a simulated fleet.

Starts, in one process: the Blynk emulator (``blynk_bridge/examples/blynk-emulator.yaml``, on
free ports), every stage of the bridge (``blynk_bridge/examples/bridge.yaml``, under its own
Redis prefix), a TTS fleet publishing to the local Mosquitto and a Particle fleet posting
webhooks to ingest-http. Unknown devices are created in the emulated Blynk as their first uplinks
arrive. A live table shows what came in, what reached Blynk, the lag of every stream and the
integration statuses (the parts that fit the terminal's height: :func:`_render`).

Downlinks run too: every ``--flip-every`` seconds the demo flips the valve switch (V8) of one of
``--switches`` TTS devices in the emulated Blynk app (``POST /_admin/devices/{id}/app-write``,
what a user's tap causes); the emulator's webhook (in ``blynk_bridge/examples/blynk-emulator.yaml``,
Blynk's 10 requests a minute per webhook included) posts the change to ingest-http, the downlink
stage sends it on TTS ``down/push`` (one byte, by the example's encode rule), the emulated TTS
answers ``down/sent`` and its simulated device applies the value and reports it in its next
uplink, which the bridge writes back to Blynk (that write's webhook is dropped as an echo). The
table shows flips, webhooks, commands sent and delivered, echoes dropped, each switch as set in
the app, as the device reports it, and the round trips (app → device → Blynk) with their latency.

Ctrl-C (or ``--duration``) stops the fleets and the switches (a flag each checks between two
messages), lets the pipeline drain — for at most a few seconds after Ctrl-C — stops the stages,
and prints a summary; a second Ctrl-C skips the drain and exits with 130 (see :class:`Demo`).
Whatever ends the run, its Redis keys are removed once the emulators have closed. Off a terminal
(``make demo | tee demo.log``) it prints a progress line every ``--progress-s`` seconds instead
of the live table, and a stdout closed under it (``tee`` killed by the same Ctrl-C) does not
stop the clean-up. It starts by printing the status page and metrics URLs and a ready-to-paste
``BB_PREFIX=… blynk-bridge lag -c .demo/bridge.yaml`` line for the operator commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import Counter
from redis.exceptions import RedisError
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from blynk_bridge.output import say
from pipeline import config as config_mod
from pipeline import metrics
from pipeline.backlog import snapshot
from pipeline.context import Context
from pipeline.lifecycle import run_stages, until_stopped, wait_event
from pipeline.logs import setup_logging
from pipeline.redact import Secret
from pipeline.status import StatusBoard

#: Package data (pyproject.toml), so an installed wheel runs the demo from any directory.
EXAMPLES = Path(__file__).resolve().parent / "examples"
LOG = Path(".demo") / "blynk-bridge.log"
log = logging.getLogger("blynk_bridge.demo")
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _station3_token(emu: Any) -> str:
    """The token of the emulated device that the example's static table names (its TTS id)."""
    for dev in emu.model.devices.values():
        if "eui-526973696e671256" in dev.metafields.values():
            return str(dev.token)
    return "no-such-device-in-the-emulator"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _total(counter: Counter, **match: str) -> float:
    """Sum of a labelled counter's ``_total`` samples whose labels match ``match``."""
    total = 0.0
    for family in counter.collect():
        for s in family.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in match.items()):
                total += s.value
    return total


def _by_label(counter: Counter, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in counter.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


#: The switch the demo flips, and the fleet's device ids (metafield "TheThingsNetwork Device").
SWITCH_PIN = "V8"
FLEET_PREFIX = "eui-70b3d57ed000"


class Switches:
    """Flips the switch of a few provisioned fleet devices in the emulated Blynk app, over the
    emulator's HTTP admin API, and times each flip's round trip: the app's change until the
    device's next uplink carried the new value back into Blynk."""

    def __init__(self, emu: Any, blynk_url: str, count: int, every_s: float) -> None:
        self.emu = emu
        self.blynk_url = blynk_url
        self.count = count
        self.every_s = every_s
        self.flips = 0
        #: Blynk device name → the value last set in the app.
        self.set_to: dict[str, int] = {}
        #: Blynk device name → (value, Blynk time of the app's write) not yet back from it.
        self.waiting: dict[str, tuple[int, int]] = {}
        #: Round-trip latencies (ms): app write → the device's write of that value in Blynk.
        self.trips: list[int] = []
        self.last_trip: dict[str, int] = {}

    def devices(self) -> list[Any]:
        found = [d for d in self.emu.model.devices.values()
                 if any(str(v).startswith(FLEET_PREFIX) for v in d.metafields.values())
                 and SWITCH_PIN in d.template.by_pin]
        return sorted(found, key=lambda d: d.id)[: self.count]

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp

        turn = 0
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                await wait_event(stop, self.every_s)
                if stop.is_set():
                    return
                devices = self.devices()
                if not devices:
                    continue  # not provisioned yet: the fleet's first uplinks create them
                dev = devices[turn % len(devices)]
                turn += 1
                value = 0 if dev.value(SWITCH_PIN) == 1 else 1
                # What the app does: a datastream update, which fires the webhook.
                async with http.post(f"{self.blynk_url}/_admin/devices/{dev.id}/app-write",
                                     json={"pin": SWITCH_PIN.lower(), "value": value}) as resp:
                    answer = await resp.json()
                if resp.status != 200:
                    continue
                self.set_to[dev.name] = value
                self.waiting[dev.name] = (value, int(answer["ts_ms"]))
                self.flips += 1

    def observe(self) -> None:
        """Complete the round trips whose value the device has written back to Blynk since."""
        for dev in self.devices():
            waiting = self.waiting.get(dev.name)
            if waiting is None:
                continue
            value, since = waiting
            back = next((ts for ts, v in dev.history.get(SWITCH_PIN, ())
                         if ts > since and v == value), None)
            if back is not None:
                del self.waiting[dev.name]
                self.trips.append(back - since)
                self.last_trip[dev.name] = back - since


@dataclass
class Snapshot:
    sent_tts: int = 0
    sent_particle: int = 0
    ingested: float = 0
    transformed: float = 0
    written: float = 0
    blynk_messages: int = 0
    blynk_devices: int = 0
    dead: dict[str, float] = field(default_factory=dict)
    #: Inputs dead-lettered or refused at ingest (they never became uplinks on the stream).
    refused_at_ingest: float = 0
    lag: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    statuses: list[tuple[str, str, str, str]] = field(default_factory=list)
    devices: list[tuple[str, str, str, str]] = field(default_factory=list)
    flips: int = 0
    webhooks: dict[str, int] = field(default_factory=dict)
    down_in: float = 0
    down_sent: float = 0
    down_acked: float = 0
    down_failed: float = 0
    echoes: float = 0
    switches: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    #: Round trips completed (app → device → Blynk) and their latencies (ms), sorted.
    trips: list[int] = field(default_factory=list)


async def _lag(ctx: Context) -> list[tuple[str, str, int, int, int]]:
    return [(s.key, g.name, s.length, g.lag, g.pending)
            for s in await snapshot(ctx.redis, ctx.keys)
            if s.name in ("uplinks", "writes", "downlinks")
            for g in s.groups]


def _render(snap: Snapshot, started: float, draining: bool, console: Console) -> Group:
    """The live view, cut to the terminal's height: the flow table and the footer always; the
    streams, switches, integrations and last devices while they fit, dropped in the reverse
    of that order (a view taller than the terminal would show only its top, then "...")."""
    elapsed = max(time.monotonic() - started, 1e-6)
    sent = snap.sent_tts + snap.sent_particle
    # Labels short enough not to wrap in an 80-column terminal: one line per row.
    flow = Table(title="blynk-bridge demo", title_style="bold", show_edge=False)
    for col in ("", "total", "per second"):
        flow.add_column(col, justify="right" if col else "left")
    flow.add_row("sent by the fleets (TTS + Particle)",
                 f"{snap.sent_tts} + {snap.sent_particle}", f"{sent / elapsed:,.0f}")
    flow.add_row("ingested onto bb:uplinks", f"{snap.ingested:,.0f}",
                 f"{snap.ingested / elapsed:,.0f}")
    flow.add_row("transformed into Blynk writes", f"{snap.transformed:,.0f}",
                 f"{snap.transformed / elapsed:,.0f}")
    flow.add_row("datastream values written to Blynk", f"{snap.written:,.0f}",
                 f"{snap.written / elapsed:,.0f}")
    flow.add_row("Blynk messages (batch/update)", f"{snap.blynk_messages:,}",
                 f"{snap.blynk_messages / elapsed:,.0f}")
    flow.add_row("devices in Blynk (created on uplink)", f"{snap.blynk_devices}", "")
    dead = ", ".join(f"{k}={v:.0f}" for k, v in sorted(snap.dead.items())) or "none"
    flow.add_row("dead letters by reason", dead, "")
    hooks = snap.webhooks
    flow.add_row("switch flips in the Blynk app (V8)", f"{snap.flips}", "")
    flow.add_row("  webhooks (dropped over 10/min)",
                 f"{hooks.get('sent', 0)} ({hooks.get('dropped_rate', 0)})", "")
    flow.add_row("  commands to TTS sent/acked/failed",
                 f"{snap.down_sent:.0f} / {snap.down_acked:.0f} / {snap.down_failed:.0f}", "")
    flow.add_row("  echoes of own writes, not sent down", f"{snap.echoes:.0f}", "")
    flow.add_row("  round trips (p50 / max latency)",
                 f"{len(snap.trips)} ({_trip_latency(snap.trips)})", "")

    lag = Table(title="streams", show_edge=False)
    for col in ("stream", "group", "length", "lag", "pending"):
        lag.add_column(col)
    for stream, group, length, lg, pending in snap.lag:
        lag.add_row(stream, group, str(length), str(lg), str(pending))

    status = Table(title="integrations", show_edge=False)
    for col in ("integration", "state", "since", "last error"):
        status.add_column(col)
    for row in snap.statuses:
        status.add_row(*row)

    devices = Table(title="the devices Blynk heard from last", show_edge=False)
    for col in ("device", "temperature (V0)", "humidity (V1)", "RSSI (V5)"):
        devices.add_column(col)
    for row in snap.devices:
        devices.add_row(*row)
    switches = Table(title="switches flipped in the app", show_edge=False)
    for col in ("device", "set in the app", "device reports", "valve (V8) in Blynk",
                "last round trip"):
        switches.add_column(col)
    for switch in snap.switches:
        switches.add_row(*switch)
    footer = ("[yellow]draining: fleets stopped, waiting for the pipeline to catch up…[/]"
              if draining else "[dim]Ctrl-C stops the fleets, drains the pipeline and exits[/]")
    parts: list[Any] = [Panel(flow), lag, switches, status, devices, footer]
    for optional in (devices, status, switches, lag):
        if _height(console, Group(*parts)) <= console.size.height:
            break
        parts.remove(optional)
    return Group(*parts)


def _height(console: Console, renderable: Any) -> int:
    return len(console.render_lines(renderable, console.options, pad=False))


#: After Ctrl-C the pipeline gets this long to drain before it is stopped anyway.
CTRL_C_DRAIN_S = 3.0
#: How long each stage may take to finish what it holds once asked to stop.
STAGE_GRACE_S = 3.0
#: How long a part that was asked to stop (then cancelled) is waited for before it is left.
STOP_WAIT_S = 3.0
#: After a second Ctrl-C, the process exits by force this long later if it has not yet.
FORCE_EXIT_S = 5.0


class Demo:
    """One run of the demo. Ctrl-C once: the fleets stop (a flag), the pipeline drains for at
    most :data:`CTRL_C_DRAIN_S` (or ``--drain-s`` when ``--duration`` ended the run), the stages
    stop within :data:`STAGE_GRACE_S`, the summary is printed, exit 0. Ctrl-C twice: no drain,
    exit 130; if the process is still alive :data:`FORCE_EXIT_S` later it removes its keys and
    exits from a thread, whatever the event loop is doing. Either way the run's Redis keys are
    removed after the emulators closed."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.stop_fleets = asyncio.Event()
        self.stop_pipeline = asyncio.Event()
        #: A second Ctrl-C: skip the drain, stop everything now, exit 130.
        self.force = asyncio.Event()
        self.interrupts = 0
        self.started = time.monotonic()
        #: Redis URL and key prefix of this run, once known (for the forced exit's clean-up).
        self.keyspace: tuple[str, str] | None = None
        #: Tasks that did not stop when cancelled: the process exits without waiting for them.
        self.left: list[str] = []
        self.tty = sys.stdout.isatty()
        #: The emulated Blynk's base URL (the app's changes go to its admin API).
        self.blynk_url = ""

    # ---- stopping --------------------------------------------------------------------------

    def interrupt(self) -> None:
        """The SIGINT/SIGTERM handler: only sets flags (and arms the forced exit)."""
        self.interrupts += 1
        self.stop_fleets.set()
        if self.interrupts == 1:
            _note("stopping: fleets stopped, draining for a few seconds "
                  "(Ctrl-C again to quit at once)")
            return
        self.force.set()
        if self.interrupts == 2:
            _note("quitting without draining")
            timer = threading.Timer(FORCE_EXIT_S, self.hard_exit)
            timer.daemon = True
            timer.start()
        else:
            self.hard_exit()

    def hard_exit(self) -> None:
        """Remove the run's keys with a client of its own, then end the process (130)."""
        if self.keyspace is not None:
            url, prefix = self.keyspace
            try:
                forget_sync(url, prefix)
            except (OSError, RedisError) as exc:  # exiting anyway: say why keys remain
                _note(f"could not remove the demo's keys {prefix}*: {exc}")
        _note("forced exit")
        logging.shutdown()
        os._exit(130)

    async def _settle(self, task: asyncio.Future[Any], what: str, wait_s: float) -> None:
        """Wait up to ``wait_s`` for ``task``; then cancel it and wait :data:`STOP_WAIT_S` more;
        a task still running after that is left behind (named in :attr:`left`)."""
        if not task.done() and wait_s > 0 and not self.force.is_set():
            forced = asyncio.ensure_future(self.force.wait())
            await asyncio.wait({task, forced}, timeout=wait_s,
                               return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_WAIT_S)
        if not task.done():
            self.left.append(what)
        elif not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %r", what, task.exception())

    # ---- the table -------------------------------------------------------------------------

    async def snapshot(self, ctx: Context, emu: Any, fleet: Any, particle: Any,
                       switches: Switches) -> Snapshot:
        switches.observe()
        board = StatusBoard(ctx.redis, ctx.keys)
        now = time.time() * 1000
        statuses = [(f"{s.kind}:{s.name}", str(s.state), f"{(now - s.since_ms) / 1000:.0f}s ago",
                     s.last_error or "") for s in await board.all()]
        devices = []
        # The most recently updated devices: the table shows the data moving.
        recent = sorted(emu.model.devices.values(),
                        key=lambda d: max((ts for _v, ts in d.values.values()), default=0),
                        reverse=True)
        for d in recent[:6]:
            vals = {p.upper(): v for p, (v, _ts) in d.values.items()}
            devices.append((d.name, str(vals.get("V0", "-")), str(vals.get("V1", "-")),
                            str(vals.get("V5", "-"))))
        return Snapshot(
            sent_tts=fleet.published,
            sent_particle=particle.stats.sent,
            # uplinks only: Blynk webhooks are counted as downlinks below
            ingested=_total(metrics.INGESTED) - _total(metrics.INGESTED, source="blynk"),
            transformed=_total(metrics.TRANSFORMED),
            written=_total(metrics.WRITTEN),
            blynk_messages=emu.org_messages,
            blynk_devices=len(emu.model.devices),
            dead=_by_label(metrics.DEAD, "reason"),
            refused_at_ingest=_total(metrics.REJECTED),
            lag=await _lag(ctx),
            statuses=statuses,
            devices=devices,
            flips=switches.flips,
            webhooks={k: sum(h[k] for h in emu.webhooks.stats().values())
                      for k in ("sent", "ok", "dropped_rate")},
            down_in=_total(metrics.INGESTED, source="blynk"),
            down_sent=_total(metrics.DOWNLINKS, outcome="sent"),
            down_acked=_total(metrics.DOWNLINK_OUTCOMES, outcome="sent"),
            down_failed=_total(metrics.DOWNLINK_OUTCOMES, outcome="failed")
            + _total(metrics.DOWNLINK_OUTCOMES, outcome="nack"),
            echoes=_total(metrics.DOWNLINKS, outcome="echo"),
            switches=_switch_rows(switches),
            trips=sorted(switches.trips),
        )

    async def _connected(self, ctx: Context, kind: str, name: str) -> None:
        board = StatusBoard(ctx.redis, ctx.keys)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = await board.get(kind, name)
            if status is not None and status.state == "Connected":
                return
            await asyncio.sleep(0.1)  # a bounded wait on a real condition, not a guess

    async def drained(self, ctx: Context) -> bool:
        rows = await _lag(ctx)
        answered = (_total(metrics.DOWNLINK_OUTCOMES, outcome="sent")
                    + _total(metrics.DOWNLINK_OUTCOMES, outcome="failed")
                    + _total(metrics.DOWNLINK_OUTCOMES, outcome="nack"))
        return (bool(rows) and all(lg == 0 and pending == 0 for *_, lg, pending in rows)
                and answered >= _total(metrics.DOWNLINKS, outcome="sent"))

    # ---- the run ---------------------------------------------------------------------------

    async def run(self) -> int:
        from emulators.blynk import BlynkEmulator
        from emulators.particle import ParticleFleet
        from emulators.tts import DownlinkAnswerer, Fleet

        console = Console()
        if not _reachable(MQTT_HOST, MQTT_PORT):
            console.print(f"[red]Mosquitto is not reachable on {MQTT_HOST}:{MQTT_PORT}[/]: run "
                          "`make demo` (it starts one) or `scripts/services.sh`.")
            return 1
        http_port = _free_port()
        # Blynk allows only letters, digits and a few signs in a webhook header: hex.
        webhook_secret = secrets.token_hex(16)
        emu = BlynkEmulator.from_spec(_emulator_spec(http_port, webhook_secret))
        ctx: Context | None = None
        emulators = contextlib.AsyncExitStack()
        try:
            urls = await emulators.enter_async_context(emu.serve(dict.fromkeys(emu.regions, 0)))
            self.blynk_url = urls["fra1"]
            run_id = secrets.token_hex(3)
            env = dict(os.environ) | {
                "BLYNK_FRA1_URL": urls["fra1"],
                "BLYNK_NY3_URL": urls.get("ny3", urls["fra1"]),
                "BLYNK_PLATFORM_URL": urls["fra1"],
                "TTS_APP_ID": f"demo-farm-{run_id}",
                "BB_PREFIX": f"bbdemo:{run_id}:",
                "INGEST_HTTP_HOST": "127.0.0.1",
                "INGEST_HTTP_PORT": str(http_port),
                "METRICS_PORT": str(self.opts.metrics_port or _free_port()),
                # examples/bridge.yaml has no secrets: the demo's own, the emulated clouds'.
                "PARTICLE_WEBHOOK_SECRET": secrets.token_urlsafe(24),
                "BLYNK_WEBHOOK_SECRET": webhook_secret,
                "TTS_API_KEY": f"NNSXS.DEMO-{run_id}",  # the local broker takes anyone
                "BLYNK_CLIENT_ID": emu.spec_clients[0].client_id,
                "BLYNK_CLIENT_SECRET": emu.spec_clients[0].client_secret,
                "STATION3_TOKEN": _station3_token(emu),
            }
            cfg = config_mod.load(EXAMPLES / "bridge.yaml", env=env)
            # The status page's replay button needs a token: this run's own, kept in a file
            # (never printed), like the other secrets the demo makes up.
            cfg = msgspec.structs.replace(cfg, monitor=msgspec.structs.replace(
                cfg.monitor, admin_token=Secret(_write_admin_token())))
            cfg = _provision_at_once(cfg, self.opts.devices + self.opts.particle_devices)
            cfg = _stop_at_once(cfg)
            ctx = Context.create(cfg)
            self.keyspace = (cfg.redis.url, cfg.redis.prefix)
            return await self._run(console, ctx, cfg, emu, http_port, Fleet, ParticleFleet,
                                   DownlinkAnswerer)
        finally:
            # The emulators first (their webhook senders post to ingest-http), then the keys.
            closing = asyncio.ensure_future(emulators.aclose())
            await self._settle(closing, "the Blynk emulator", STOP_WAIT_S)
            if ctx is not None:
                try:
                    await forget(ctx.redis, ctx.keys.prefix)
                except RedisError as exc:
                    _note(f"could not remove the demo's keys {ctx.keys.prefix}*: {exc}")
                await self._settle(asyncio.ensure_future(ctx.close()), "Redis and HTTP clients",
                                   STOP_WAIT_S)

    async def _run(self, console: Console, ctx: Context, cfg: config_mod.Config, emu: Any,
                   http_port: int, fleet_cls: Any, particle_cls: Any, answerer_cls: Any) -> int:
        import importlib

        from blynk_bridge.cli import STAGES
        from pipeline.metrics_http import MetricsServer
        from pipeline.stats import StatsPublisher

        stages = [importlib.import_module(m).build(ctx) for m in STAGES.values()]
        # The status page's plots come from every process's counters (pipeline.stats).
        stages.append(StatsPublisher(ctx.redis, ctx.keys, f"demo@{ctx.consumer}"))
        ready = asyncio.Event()
        pipeline = asyncio.create_task(run_stages(
            stages, stop=self.stop_pipeline, grace_s=STAGE_GRACE_S, install_signals=False,
            on_started=ready.set))
        started = asyncio.ensure_future(ready.wait())
        await until_stopped(asyncio.wait({started, pipeline},
                                         return_when=asyncio.FIRST_COMPLETED), self.stop_fleets)
        started.cancel()
        if pipeline.done():
            pipeline.result()  # a stage that failed to start: its error, not a hang
        server = MetricsServer(ctx.redis, StatusBoard(ctx.redis, ctx.keys), stages)
        assert cfg.metrics.port is not None  # examples/bridge.yaml sets it
        base = await server.start("127.0.0.1", cfg.metrics.port)
        try:
            self._header(console, base.rstrip("/"), ctx.keys.prefix)
            return await self._with_pipeline(console, ctx, cfg, emu, http_port, pipeline,
                                             fleet_cls, particle_cls, answerer_cls)
        finally:
            self.stop_pipeline.set()
            await self._settle(pipeline, "the pipeline's stages", STAGE_GRACE_S + STOP_WAIT_S)
            await self._settle(asyncio.ensure_future(server.close()), "the metrics server",
                               STOP_WAIT_S)

    def _header(self, console: Console, base: str, prefix: str) -> None:
        """Where to look while it runs: the status page, the metrics, the CLI on this run."""
        ops = _write_ops_config()
        lines = [
            f"status page  {base}/   (replay token: in {ADMIN_TOKEN_FILE})",
            f"metrics      {base}/metrics",
            f"watch it     BB_PREFIX={prefix} {_cli()} lag -c {ops}",
            "             (or: status, dead list, top, tail uplinks; with the same BB_PREFIX, -c)",
        ]
        # (The log file's path was printed first, by main(), when the logs go there.)
        if self.tty:
            for line in lines:
                console.print(line, highlight=False, soft_wrap=True)
        else:
            for line in lines:
                say(line)

    async def _with_pipeline(self, console: Console, ctx: Context, cfg: config_mod.Config,
                             emu: Any, http_port: int, pipeline: asyncio.Task[None],
                             fleet_cls: Any, particle_cls: Any, answerer_cls: Any) -> int:
        app = cfg.tts[0]
        # TTS keeps no messages for absent subscribers (QoS 0): start publishing only once
        # ingest-mqtt holds the application and is subscribed.
        await until_stopped(self._connected(ctx, "tts", app.name), self.stop_fleets)
        auth = cfg.particle[0].auth
        secret = auth.secret if isinstance(auth, config_mod.HttpAuth) else None
        fleet = fleet_cls(MQTT_HOST, MQTT_PORT, app.app_id, app.tenant,
                          devices=self.opts.devices, rate_per_s=self.opts.rate,
                          missing_decoded_ratio=0.01, packet_broker_ratio=0.2, record=False,
                          device_prefix="eui-70b3d57ed000", state=_valves())
        particle = particle_cls(f"http://127.0.0.1:{http_port}/particle/{cfg.particle[0].name}",
                                devices=self.opts.particle_devices,
                                rate_per_s=self.opts.particle_rate, fmt="json",
                                auth={"X-Bridge-Secret": str(secret)} if secret else None)
        # The emulated TTS answers each down/push with down/queued then down/sent; the fleet's
        # devices apply the valve byte (f_port 8) and report it in their next uplink.
        answerer = answerer_cls(MQTT_HOST, MQTT_PORT, app.app_id, app.tenant,
                                devices=fleet.state)
        answering = asyncio.create_task(answerer.run())
        switches = Switches(emu, self.blynk_url, self.opts.switches, self.opts.flip_every)
        stop_switches = asyncio.Event()
        duration = self.opts.duration
        fleets = [asyncio.create_task(fleet.run(duration_s=duration, stop=self.stop_fleets)),
                  asyncio.create_task(particle.run(duration_s=duration, stop=self.stop_fleets))]
        flipping = asyncio.create_task(switches.run(stop_switches))
        wake = asyncio.ensure_future(self.stop_fleets.wait())
        draining = False
        drain_deadline = 0.0
        next_line = time.monotonic() + self.opts.progress_s
        live_ctx = (Live(console=console, refresh_per_second=4, transient=False)
                    if self.tty else contextlib.nullcontext())
        try:
            with live_ctx as live:
                while True:
                    snap = await self.snapshot(ctx, emu, fleet, particle, switches)
                    if live is not None:
                        live.update(_render(snap, self.started, draining, console))
                    elif time.monotonic() >= next_line:
                        next_line = time.monotonic() + self.opts.progress_s
                        say(_progress(snap, self.started, draining))
                    if pipeline.done() or self.force.is_set():
                        break
                    if not draining and (self.stop_fleets.is_set()
                                         or all(t.done() for t in fleets)):
                        draining = True
                        self.stop_fleets.set()
                        stop_switches.set()
                        for t in fleets:
                            await self._settle(t, "a simulated fleet", STOP_WAIT_S)
                        await self._settle(flipping, "the switch flipper", STOP_WAIT_S)
                        ctrl_c = self.interrupts > 0
                        drain_deadline = time.monotonic() + (
                            min(self.opts.drain_s, CTRL_C_DRAIN_S) if ctrl_c
                            else self.opts.drain_s)
                        wake = asyncio.ensure_future(self.force.wait())
                    if draining and (await self.drained(ctx)
                                     or time.monotonic() > drain_deadline):
                        break
                    await asyncio.wait({wake}, timeout=0.25)
                if live is not None:
                    live.update(_render(snap, self.started, False, console))
        finally:
            wake.cancel()
            stop_switches.set()
            self.stop_fleets.set()
            for t in [*fleets, flipping]:
                await self._settle(t, "a simulated fleet", 0)
            self.stop_pipeline.set()
            await self._settle(pipeline, "the pipeline's stages", STAGE_GRACE_S + STOP_WAIT_S)
            await self._settle(answering, "the TTS downlink answerer", 0)
        snap = await self.snapshot(ctx, emu, fleet, particle, switches)
        if self.left:
            _note(f"did not stop when asked, left behind: {', '.join(self.left)}")
        if self.tty:
            _summary(console, snap, time.monotonic() - self.started)
        else:
            text = io.StringIO()
            _summary(Console(file=text, width=200, highlight=False), snap,
                     time.monotonic() - self.started)
            for line in text.getvalue().splitlines():
                say(line)
        return 130 if self.force.is_set() else 0


def _note(text: str) -> None:
    """A word to the person at the terminal, on stderr (stdout may be a closed pipe)."""
    with contextlib.suppress(OSError):
        print(f"demo: {text}", file=sys.stderr, flush=True)


def _progress(snap: Snapshot, started: float, draining: bool) -> str:
    """The one-line summary printed every few seconds when stdout is not a terminal."""
    elapsed = max(time.monotonic() - started, 1e-6)
    sent = snap.sent_tts + snap.sent_particle
    lag = " ".join(f"{stream.rsplit(':', 1)[-1].strip('{}')}/{group}={lg}+{pending}"
                   for stream, group, _n, lg, pending in snap.lag)
    dead = sum(snap.dead.values())
    return (f"progress {elapsed:.0f}s{' draining' if draining else ''}: sent {sent} "
            f"({sent / elapsed:,.0f}/s); ingested {snap.ingested:.0f}; transformed "
            f"{snap.transformed:.0f}; {snap.written:.0f} values written in "
            f"{snap.blynk_messages} Blynk messages; {snap.blynk_devices} devices; dead {dead:.0f}; "
            f"downlinks {snap.down_sent:.0f} sent, {snap.down_acked:.0f} acked; "
            f"lag+pending {lag or '-'}")


def _summary(console: Console, snap: Snapshot, elapsed: float) -> None:
    sent = snap.sent_tts + snap.sent_particle
    dead = sum(snap.dead.values())
    console.print(
        f"\n[bold]demo summary[/] after {elapsed:.0f}s: sent {sent} "
        f"(TTS {snap.sent_tts}, Particle {snap.sent_particle}); ingested {snap.ingested:.0f}; "
        f"transformed {snap.transformed:.0f}; {snap.written:.0f} values written to Blynk in "
        f"{snap.blynk_messages} messages; {snap.blynk_devices} devices in Blynk; "
        f"dead letters {dead:.0f}"
        + (f" ({', '.join(f'{k}={v:.0f}' for k, v in sorted(snap.dead.items()))})" if dead else "")
    )
    hooks = snap.webhooks
    console.print(
        f"downlinks: {snap.flips} switch flips in the app; {hooks.get('sent', 0)} webhooks sent "
        f"to the bridge ({hooks.get('dropped_rate', 0)} dropped over Blynk's limit); "
        f"{snap.down_in:.0f} received; {snap.down_sent:.0f} commands sent down; "
        f"{snap.down_acked:.0f} delivered by TTS (down/sent); {snap.down_failed:.0f} failed; "
        f"{snap.echoes:.0f} echoes not sent back")
    console.print(
        f"round trips: {len(snap.trips)} of {snap.flips} flips came back from the device (its "
        f"next uplink wrote the new value to Blynk), latency {_trip_latency(snap.trips)}")
    missing = sent - snap.ingested - snap.refused_at_ingest
    drained = all(lg == 0 and p == 0 for *_, lg, p in snap.lag)
    if drained and missing <= 0:
        console.print("delivered: every uplink was written to Blynk, refused, or dead-lettered "
                      "with a reason")
    elif missing <= 0:
        waiting = sum(lg + p for *_, lg, p in snap.lag)
        console.print(f"[yellow]stopped before the pipeline drained: {waiting} entries were "
                      "still waiting in the streams (removed with the demo's keys)[/]")
    else:
        console.print(f"[yellow]not fully accounted for: {missing:.0f} sent but not ingested; "
                      f"streams drained: {drained}[/]")


def _valves() -> Any:
    """The fleet's simulated devices: they apply the valve byte the bridge packs (the example's
    encode rule: uint8 on f_port 8) and report it once, in their next uplink."""
    from emulators.tts import SimulatedDevices

    return SimulatedDevices(port_keys={8: "valve"}, report_once=True)


def _switch_rows(switches: Switches) -> list[tuple[str, str, str, str, str]]:
    """Per switch: set in the app, reported by the device (once the round trip completed), in
    Blynk now, the last round trip's latency."""
    return [(d.name, str(switches.set_to.get(d.name, "-")),
             "waiting" if d.name in switches.waiting else str(switches.set_to.get(d.name, "-")),
             str(_or_dash(d.value(SWITCH_PIN))),
             f"{switches.last_trip[d.name] / 1000:.2f} s" if d.name in switches.last_trip
             else "-") for d in switches.devices()]


def _or_dash(value: Any) -> Any:
    """``-`` for a value Blynk does not have yet (not ``None``)."""
    return "-" if value is None else value


def _trip_latency(trips: list[int]) -> str:
    if not trips:
        return "-"
    return f"{trips[len(trips) // 2] / 1000:.2f} s / {trips[-1] / 1000:.2f} s"


def _emulator_spec(http_port: int, webhook_secret: str) -> Any:
    """``examples/blynk-emulator.yaml`` with its webhooks pointed at ingest-http's port and
    sending this run's secret, through the variables its webhook names (and nothing from the
    caller's environment: a BRIDGE_URL set there is not this run's)."""
    from emulators.blynk.settings import load_spec

    return load_spec(EXAMPLES / "blynk-emulator.yaml", {
        "BRIDGE_URL": f"http://127.0.0.1:{http_port}", "BLYNK_WEBHOOK_SECRET": webhook_secret})


def _match(prefix: str) -> str:
    """A SCAN pattern for keys starting with ``prefix`` (glob characters in it escaped)."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix) + "*"


async def forget(redis: Any, prefix: str) -> int:
    """The demo keeps nothing: every key under its run's prefix is removed (``UNLINK``, in
    batches); returns how many."""
    removed = 0
    batch: list[Any] = []
    async for key in redis.scan_iter(match=_match(prefix), count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += await redis.unlink(*batch)
            batch = []
    if batch:
        removed += await redis.unlink(*batch)
    return removed


def forget_sync(url: str, prefix: str) -> int:
    """:func:`forget` from any thread, with a connection of its own (the forced exit)."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=_match(prefix), count=1000))
        return sum(int(client.unlink(*keys[i:i + 500])) for i in range(0, len(keys), 500))
    finally:
        client.close()


#: What the operator commands need to watch a demo run (no secrets: the run's own config has
#: them, and they change every run).
OPS_CONFIG = Path(".demo") / "bridge.yaml"
ADMIN_TOKEN_FILE = Path(".demo") / "admin-token"


def _provision_at_once(cfg: config_mod.Config, devices: int) -> config_mod.Config:
    """The integrations may create every fleet device in the emulated Blynk at once.

    The example's limits (1 device a second, 10 at once) protect a real Blynk organisation; here
    they would park a 60-device fleet's uplinks for a minute or more (parked entries wait
    ``claim_idle_ms``), and the table would show a backlog that is only the rate limit."""
    def lifted(integ: Any) -> Any:
        return msgspec.structs.replace(
            integ, provision_rate=max(integ.provision_rate, float(devices)),
            provision_burst=max(integ.provision_burst, devices),
            provision_max=max(integ.provision_max, devices))

    return msgspec.structs.replace(cfg, tts=[lifted(a) for a in cfg.tts],
                                   particle=[lifted(p) for p in cfg.particle])


#: The demo's blocking stream reads (the example's: the 2 s default).
DEMO_BLOCK_MS = 200


def _stop_at_once(cfg: config_mod.Config) -> config_mod.Config:
    """Short blocking reads, so the stages stop at once after the drain.

    A stopping stage finishes the read it has in flight (:func:`pipeline.consumer.consume`),
    which with the default ``block_ms`` held the summary up to 2 s after the pipeline had
    drained; one process on one machine can afford the extra idle reads."""
    return msgspec.structs.replace(cfg, streams=msgspec.structs.replace(
        cfg.streams, block_ms=min(cfg.streams.block_ms, DEMO_BLOCK_MS)))


def _cli() -> str:
    """How to run ``blynk-bridge`` from where the demo was started: its name when ``PATH`` finds
    this one, else its path (``make demo`` runs ``.venv/bin/blynk-bridge``, not on ``PATH``
    until the venv is activated), else ``python -m blynk_bridge``."""
    argv0 = Path(sys.argv[0])
    if argv0.name != "blynk-bridge" or not argv0.exists():
        return f"{shlex.quote(sys.executable)} -m blynk_bridge"
    found = shutil.which("blynk-bridge")
    if found is not None and Path(found).resolve() == argv0.resolve():
        return "blynk-bridge"
    if argv0.is_absolute() or argv0.parent != Path():
        return shlex.quote(str(argv0))
    return f"./{argv0}"


def _write_ops_config() -> Path:
    """Write :data:`OPS_CONFIG`: Redis, the key prefix from ``BB_PREFIX``, the templates."""
    import yaml

    example = yaml.safe_load((EXAMPLES / "bridge.yaml").read_text())
    OPS_CONFIG.parent.mkdir(exist_ok=True)
    OPS_CONFIG.write_text(
        "# Written by `blynk-bridge demo` for the operator commands: BB_PREFIX=<the prefix the "
        "demo printed>\n"
        + yaml.safe_dump({"redis": example["redis"], "templates": example["templates"]},
                         sort_keys=False))
    return OPS_CONFIG


def _write_admin_token() -> str:
    """A fresh status page token for this run, in :data:`ADMIN_TOKEN_FILE` (owner-only)."""
    token = secrets.token_hex(16)
    ADMIN_TOKEN_FILE.parent.mkdir(exist_ok=True)
    ADMIN_TOKEN_FILE.unlink(missing_ok=True)
    fd = os.open(ADMIN_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blynk-bridge demo",
        description="The whole pipeline on emulated clouds (Blynk, TTS, Particle) with a "
        "simulated fleet, in one process, under a Redis key prefix of its own (removed at the "
        "end). A live table (piped: a progress line every few seconds) shows what came in, what "
        "reached Blynk, the downlink round trips of the valve switches it flips in the app, "
        "lags and statuses. Ctrl-C stops the fleets, drains for a few seconds and prints a "
        "summary; a second Ctrl-C quits at once.")
    p.add_argument("--devices", type=int, default=50, help="simulated TTS devices")
    p.add_argument("--rate", type=float, default=100.0, help="TTS uplinks per second, in all")
    p.add_argument("--particle-devices", type=int, default=10, help="simulated Particle devices")
    p.add_argument("--particle-rate", type=float, default=10.0, help="Particle events per second")
    p.add_argument("--duration", type=float, default=None,
                   help="stop the fleets after this many seconds (default: until Ctrl-C)")
    p.add_argument("--drain-s", type=float, default=30.0,
                   help="how long to wait for the pipeline to drain after --duration "
                   f"(after Ctrl-C: at most {CTRL_C_DRAIN_S:g} s)")
    p.add_argument("--progress-s", type=float, default=5.0,
                   help="seconds between two progress lines when stdout is not a terminal")
    p.add_argument("--switches", type=int, default=3,
                   help="TTS devices whose valve switch (V8) the demo flips in the app")
    p.add_argument("--flip-every", type=float, default=15.0,
                   help="seconds between two flips (Blynk sends 10 webhooks a minute at most, "
                        "and each flip costs two: the app's change and the device's echo)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of the status page and /metrics (default: a free one)")
    return p


def main(argv: Sequence[str]) -> int:
    opts = build_parser().parse_args(argv)
    if sys.stderr.isatty():
        # The live table owns the terminal; the stages' logs go to a file beside it.
        LOG.parent.mkdir(exist_ok=True)
        setup_logging(logging.getLevelName(logging.getLogger().level), "text", str(LOG))
        Console(stderr=True).print(f"[dim]logs: {LOG}[/]")

    async def amain() -> int:
        demo = Demo(opts)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, demo.interrupt)
        rc = await demo.run()
        if demo.left:
            # A part ignored its cancellation: asyncio.run would wait for it for ever. The keys
            # are gone and the summary printed: end here.
            with contextlib.suppress(OSError):
                sys.stdout.flush()
            logging.shutdown()
            os._exit(rc)
        return rc

    try:
        import uvloop

        return uvloop.run(amain())
    except ImportError:  # pragma: no cover
        return asyncio.run(amain())
