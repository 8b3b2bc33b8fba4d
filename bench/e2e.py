"""End-to-end benchmark: simulated TTS fleet → MQTT → blynk-bridge → Blynk emulator, against a
Node-RED flow doing the same bridging, measured in the same run.

    python -m bench.e2e --rate 5000 --duration 10 --devices 10000
    python -m bench.e2e --find-max                      # step the rate up, both systems

What runs (all on loopback, all child processes stopped on exit, Ctrl-C or error):

* a private Mosquitto (``max_queued_messages 0``, ``set_tcp_nodelay true``);
* the Blynk emulator as its own process, with one template (``temperature`` V1 double, ``seq`` V2
  integer, ``sent_ms`` V3 double), N devices with known tokens, no per-device rate limit;
* the bridge as OS processes (``--processes ingest-mqtt,transform,egress``, or ``run`` for one
  process), on a fresh Redis key prefix, with the N devices in its static device table;
* the baseline: Node-RED 4.1 with ``bench/nodered/flow.json`` (mqtt in → function → http request
  GET ``batch/update``), pointed at the same broker and emulator.

Method. The load generator is a child process publishing TTS v3 uplinks of N distinct devices,
round robin, at the offered rate over one MQTT connection with Nagle off. Each device's message is
built once by :func:`emulators.tts.make_uplink` and then only its per-uplink fields are filled in
(``f_cnt``, the ``as:up`` correlation id the bridge de-duplicates on, ``received_at``, and the
decoded ``seq`` and ``sent_ms``), and PUBLISH packets are written straight to the socket: the
generator must not be what limits the run, and ``emulators.tts.Fleet`` (one awaited aiomqtt
publish per uplink, 0.2–1 ms each on this machine) managed 600–1,800 uplinks/s here.
``sent_ms`` is the wall clock when the uplink is written; the emulator stamps each write's arrival
in its per-pin history.

An uplink counts as *delivered* when Blynk holds its ``seq`` or a newer one of the same device
(egress may coalesce; ``written`` counts the uplinks whose own value was written). Latency = the
first arrival of a ``seq`` ≥ the uplink's, minus its ``sent_ms``: publish → Blynk receipt. Before
measuring, each system gets a warm-up pass (one uplink per device) so the run measures steady
state, not provisioning or cold caches. CPU is the delta of ``/proc/<pid>/stat`` over the step
(send + drain) — also per uplink, which a busy machine distorts less than a rate — and RSS is read
at its end. A step is *ok* with delivered/sent = 1.0 and p99 ≤ 500 ms; what has not arrived
``--drain`` seconds after the load stopped counts as not delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.common import (
    BenchError,
    Proc,
    Processes,
    Usage,
    UsageProbe,
    fmt_mib,
    fmt_ms,
    free_port,
    interrupt_as_exception,
    machine,
    percentile,
    rss_bytes,
    start_mosquitto,
    table,
    wait_port,
)

#: Decoded key → Blynk pin, shared by the emulator model, the bridge template and the flow.
PINS = {"temperature": "V1", "seq": "V2", "sent_ms": "V3"}
SEQ_PIN = "v2"
#: Each step's ``seq`` values start at ``step * SEQ_STRIDE`` so steps never mix.
SEQ_STRIDE = 10_000_000
#: The goal of the issue: p99 at or under this, with nothing lost.
P99_LIMIT_MS = 500.0
#: With ``--all-written`` a step is ok only when every uplink's own value was written (none
#: superseded by a newer one of its device before egress sent it): issue 15 goal 2.
ALL_WRITTEN = False
REDIS_URL = "redis://127.0.0.1:6379/0"
TENANT = "ttn"
TEMPLATE_ID = "TMPLBENCH01"


# --- results --------------------------------------------------------------------------------


@dataclass
class StepResult:
    system: str
    offered: float
    duration_s: float
    sent: int
    send_s: float
    delivered: int
    written: int
    messages: int
    refused: int
    latencies_ms: list[float] = field(repr=False)
    span_s: float
    usage: list[Usage]

    @property
    def sent_rate(self) -> float:
        return self.sent / self.send_s if self.send_s > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Delivered uplinks per second, from the first send to the last arrival."""
        return self.delivered / self.span_s if self.span_s > 0 else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def pmax(self) -> float:
        return self.latencies_ms[-1] if self.latencies_ms else math.nan

    @property
    def lossless(self) -> bool:
        return self.sent > 0 and self.delivered == self.sent

    @property
    def ok(self) -> bool:
        return (self.lossless and self.p99 <= P99_LIMIT_MS
                and (not ALL_WRITTEN or self.written == self.sent))

    def summary(self) -> dict[str, Any]:
        return {"system": self.system, "offered_per_s": self.offered,
                "sent": self.sent, "sent_per_s": round(self.sent_rate, 1),
                "delivered": self.delivered, "written": self.written,
                "blynk_messages": self.messages, "refused": self.refused,
                "throughput_per_s": round(self.throughput, 1),
                "p50_ms": round(self.p50, 1), "p99_ms": round(self.p99, 1),
                "max_ms": round(self.pmax, 1), "ok": self.ok,
                "usage": [asdict(u) | {"cpu_pct": round(u.cpu_pct, 1)} for u in self.usage]}


def step_row(r: StepResult) -> list[object]:
    return [r.system, f"{r.offered:.0f}", f"{r.sent_rate:.0f}", r.sent,
            f"{r.delivered / r.sent:.4f}" if r.sent else "-", r.written, r.messages,
            f"{r.throughput:.0f}", fmt_ms(r.p50), fmt_ms(r.p99), fmt_ms(r.pmax),
            "yes" if r.ok else "NO"]


STEP_HEADERS = ["system", "offered/s", "sent/s", "sent", "deliv/sent", "written", "blynk msgs",
                "deliv/s", "p50 ms", "p99 ms", "max ms", "ok"]


def usage_rows(r: StepResult) -> list[list[object]]:
    per = 1000.0 / r.delivered if r.delivered else math.nan
    return [[f"{r.system} @ {r.offered:.0f}/s", u.name, f"{u.cpu_pct:.0f}", f"{u.cpu_s:.1f}",
             f"{u.cpu_s * per:.3f}", fmt_mib(u.rss), fmt_mib(u.peak_rss)] for u in r.usage]


#: CPU per *delivered* uplink: the cost of the work that was done, also when a step fell behind.
USAGE_HEADERS = ["step", "process", "CPU %", "CPU s", "CPU ms/deliv", "RSS MiB", "peak MiB"]


# --- the Blynk emulator ---------------------------------------------------------------------


def device_name(index: int, prefix: str = "dev") -> str:
    """Device ids as ``emulators.tts.Fleet.device_id`` makes them: ``{prefix}{index:04d}``."""
    return f"{prefix}{index:04d}"


def emulator_spec(port: int, devices: Sequence[tuple[str, str]],
                  history_len: int) -> dict[str, Any]:
    return {
        "regions": {"fra1": port},
        "host": "127.0.0.1",
        "settings": {"device_rps": None, "daily_updates": None, "history_len": history_len,
                     "request_log_len": 0, "monthly_messages": None},
        "templates": [{
            "id": TEMPLATE_ID, "name": "Bench",
            "datastreams": [
                {"id": 1, "pin": PINS["temperature"], "name": "temperature", "type": "double"},
                {"id": 2, "pin": PINS["seq"], "name": "seq", "type": "integer"},
                {"id": 3, "pin": PINS["sent_ms"], "name": "sent_ms", "type": "double"},
            ],
        }],
        "devices": [{"name": name, "token": token, "template": TEMPLATE_ID, "id": i + 1}
                    for i, (name, token) in enumerate(devices)],
    }


class Emulator:
    """The emulator process and its admin API (``/_admin/…``)."""

    def __init__(self, proc: Proc, url: str) -> None:
        self.proc = proc
        self.url = url
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def close(self) -> None:
        await self._http.close()

    async def _get(self, path: str) -> Any:
        async with self._http.get(self.url + path) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def reset(self) -> None:
        async with self._http.post(self.url + "/_admin/reset") as resp:
            resp.raise_for_status()

    async def counts(self) -> tuple[int, int]:
        """(organization messages, refused requests) so far."""
        data = await self._get("/_admin/counts")
        return int(data["organization"]["messages"]), sum(data.get("refused", {}).values())

    async def seq_histories(self) -> dict[str, list[tuple[int, int]]]:
        """Device name → [(arrival ms, seq)] in arrival order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for d in await self._get("/_admin/devices"):
            hist = d.get("history", {}).get(SEQ_PIN, [])
            out[d["name"]] = [(int(ts), int(v)) for ts, v in hist]
        return out


def start_emulator(procs: Processes, devices: Sequence[tuple[str, str]],
                   history_len: int) -> tuple[Proc, str]:
    port = free_port()
    spec_path = procs.dir / "blynk-emulator.yaml"
    # JSON is YAML; the emulator reads YAML.
    spec_path.write_text(json.dumps(emulator_spec(port, devices, history_len)))
    proc = procs.spawn("blynk-emulator", [sys.executable, "-m", "blynk_bridge", "emulate",
                                          "blynk", "-c", str(spec_path)])
    wait_port(port, timeout_s=60, proc=proc)
    return proc, f"http://127.0.0.1:{port}"


# --- the systems under test -----------------------------------------------------------------


class System(Protocol):
    name: str
    app_id: str

    def start(self) -> dict[str, Proc]:
        """Start the processes; returns name → process (for CPU/RSS)."""

    def stop(self) -> None: ...


@dataclass
class Env:
    procs: Processes
    mqtt_port: int
    blynk_url: str
    devices: list[tuple[str, str]]  # (device id, token), index = fleet device index
    #: Processes every system uses (broker, Redis): measured in every step too.
    shared_pids: dict[str, int] = field(default_factory=dict)


class Bridge:
    """blynk-bridge as OS processes: one per stage, or ``run`` for all in one."""

    name = "bridge"

    def __init__(self, env: Env, processes: Sequence[str], redis_url: str = REDIS_URL,
                 label: str | None = None, cprofile: Path | None = None, *,
                 variant: tuple[str, dict[str, Any]] | None = None,
                 loop_probe: Path | None = None) -> None:
        self.env = env
        self.processes = list(processes)
        if label is not None:
            self.name = f"bridge[{label}]"
        #: Run each bridge process under cProfile, stats written here on stop (run_cprofile).
        self.cprofile = cprofile
        #: Run each bridge process under the loop probe, summaries written here on stop.
        self.loop_probe = loop_probe
        self.redis_url = redis_url
        #: Config sections merged over the bench's (``--variant``); none: the defaults.
        self.overrides: dict[str, Any] = {}
        if variant is not None:
            self.name = f"{self.name} {variant[0]}"
            self.overrides = variant[1]
        self.app_id = f"bench-bridge-{secrets.token_hex(3)}"
        self.prefix = f"bbbench:{uuid.uuid4().hex[:8]}:"
        self.running: list[Proc] = []

    def config(self) -> dict[str, Any]:
        cfg = self._config()
        for section, values in self.overrides.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        return cfg

    def _config(self) -> dict[str, Any]:
        return {
            "redis": {"url": self.redis_url, "prefix": self.prefix},
            "blynk": {"servers": {"default": self.env.blynk_url}, "default_server": "default"},
            "templates": [{
                "name": "bench", "id": TEMPLATE_ID,
                "datastreams": [
                    {"name": "temperature", "pin": PINS["temperature"], "type": "double"},
                    {"name": "seq", "pin": PINS["seq"], "type": "integer"},
                    {"name": "sent_ms", "pin": PINS["sent_ms"], "type": "double"},
                ],
            }],
            "tts": [{"name": "bench", "app_id": self.app_id, "tenant": TENANT,
                     "host": "127.0.0.1", "port": self.env.mqtt_port, "insecure": True,
                     "api_key": "NNSXS.BENCH", "template": "bench"}],
            "devices": [{"source": "tts", "integration": "bench", "device": dev,
                         "token": token, "template": "bench"}
                        for dev, token in self.env.devices],
        }

    def start(self) -> dict[str, Proc]:
        from blynk_bridge.cli import STAGES

        cfg = self.env.procs.dir / f"{self.app_id}.yaml"
        cfg.write_text(json.dumps(self.config()))
        out: dict[str, Proc] = {}
        for i, stage in enumerate(self.processes):
            if stage == "run":
                keep = {"ingest-mqtt", "transform", "egress"}
                argv = ["run", "-c", str(cfg)]
                for other in STAGES:
                    if other not in keep:
                        argv += ["--skip", other]
            else:
                argv = [stage, "-c", str(cfg)]
            name = f"{stage}" if self.processes.count(stage) == 1 else f"{stage}-{i}"
            if self.cprofile is not None:
                self.cprofile.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "bench.e2e", "_cprofile",
                       str(self.cprofile / f"{name}.prof"), *argv]
            elif self.loop_probe is not None:
                self.loop_probe.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "bench.e2e", "_probe",
                       str(self.loop_probe / f"{name}.json"), *argv]
            else:
                cmd = [sys.executable, "-m", "blynk_bridge", *argv]
            proc = self.env.procs.spawn(name, cmd)
            out[name] = proc
            self.running.append(proc)
        return out

    def start_profiling(self) -> None:
        """With ``cprofile`` or ``loop_probe``: start the profilers now (after the warm-up; see
        cprofile_main and probe_main)."""
        import signal

        if self.cprofile is not None or self.loop_probe is not None:
            for proc in self.running:
                proc.popen.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        for proc in reversed(self.running):
            self.env.procs.stop(proc)
        self.running.clear()
        asyncio.run(_delete_prefix(self.redis_url, self.prefix))


async def _redis_pid(url: str) -> int | None:
    """The Redis server's pid when it runs on this machine (``INFO server``), else None."""
    from pipeline.streams import connect

    redis = connect(url)
    try:
        info = await redis.info("server")
    finally:
        await redis.aclose()
    return _local_pid(int(info.get("process_id", 0)))


def _local_pid(pid: int) -> int | None:
    return pid if pid and Path(f"/proc/{pid}").exists() else None


async def _delete_prefix(url: str, prefix: str) -> None:
    from pipeline.streams import connect

    redis = connect(url)
    try:
        batch: list[Any] = []
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await redis.delete(*batch)
                batch.clear()
        if batch:
            await redis.delete(*batch)
    finally:
        await redis.aclose()


class NodeRed:
    """The baseline: Node-RED 4.1 running ``bench/nodered/flow.json``."""

    name = "node-red"

    def __init__(self, env: Env) -> None:
        self.env = env
        self.app_id = f"bench-nodered-{secrets.token_hex(3)}"
        self.proc: Proc | None = None

    def start(self) -> dict[str, Proc]:
        from bench.nodered import runner

        self.proc = runner.start(
            self.env.procs, mqtt_port=self.env.mqtt_port,
            topic=f"v3/{self.app_id}@{TENANT}/devices/+/up", blynk_url=self.env.blynk_url,
            tokens=dict(self.env.devices), pins=PINS)
        return {"node-red": self.proc}

    def stop(self) -> None:
        if self.proc is not None:
            self.env.procs.stop(self.proc)
            self.proc = None


# --- one measured step ----------------------------------------------------------------------


# --- the load generator (a child process) --------------------------------------------------

# Placeholders in a device's message template, replaced per uplink. Each must occur exactly once
# (the received_at times may occur more than once) — checked when the template is built.
_P_FCNT = "1987654321"
_P_SEQ = "1876543219"
_P_SENT = "8765432109876.5"
_P_ASUP = "Q" * 26
_P_TEMP = "-76.54321"
_T0_NS = 1_600_000_000_123_456_789


def message_template(app_id: str, device: str) -> tuple[bytes, list[tuple[bytes, str]]]:
    """(topic, [(literal bytes, slot after it)]) for one device: an uplink from
    :func:`emulators.tts.make_uplink`, JSON-encoded once, split at the per-uplink fields."""
    import random
    import re

    from emulators.tts import make_uplink, rfc3339

    decoded = {"temperature": float(_P_TEMP), "seq": int(_P_SEQ), "sent_ms": float(_P_SENT)}
    msg = make_uplink(app_id, TENANT, device, int(_P_FCNT), decoded, gateways=1,
                      received_at=_T0_NS, rng=random.Random(device))
    msg["correlation_ids"][0] = f"as:up:{_P_ASUP}"
    text = json.dumps(msg, separators=(",", ":"))
    slots = {_P_FCNT: "fcnt", _P_SEQ: "seq", _P_SENT: "sent", _P_ASUP: "asup", _P_TEMP: "temp",
             rfc3339(_T0_NS): "at", rfc3339(_T0_NS - 30_000_000): "at_up"}
    for placeholder, slot in slots.items():
        want = text.count(placeholder)
        if want < 1 or (slot not in ("at", "at_up") and want != 1):
            raise BenchError(f"template for {device}: placeholder {slot} found {want} times")
    pieces = re.split("(" + "|".join(re.escape(k) for k in slots) + ")", text)
    parts: list[tuple[bytes, str]] = []
    for i in range(0, len(pieces) - 1, 2):
        parts.append((pieces[i].encode(), slots[pieces[i + 1]]))
    parts.append((pieces[-1].encode(), ""))
    return f"v3/{app_id}@{TENANT}/devices/{device}/up".encode(), parts


def fill(parts: Sequence[tuple[bytes, str]], values: dict[str, bytes]) -> bytes:
    """One uplink's JSON from a template of :func:`message_template` and the slots' values
    (``fcnt``, ``seq``, ``sent``, ``asup``, ``temp``, ``at``, ``at_up``)."""
    return b"".join([lit + values[slot] if slot else lit for lit, slot in parts])


def loadgen_main(job_path: str) -> int:
    """The load generator process: build templates, say ``ready``, wait for ``go``, publish
    ``count`` uplinks at ``rate`` (round robin over the devices), write each uplink's send time
    (ms, float64, in send order) to ``out``, print ``{"sent":…, "send_s":…}``."""
    from array import array

    from bench.common import Publisher, publish_packet
    from emulators.tts import rfc3339

    job = json.loads(Path(job_path).read_text())
    names: list[str] = job["names"]
    n, rate, count, base = len(names), float(job["rate"]), int(job["count"]), int(job["base"])
    templates = [message_template(job["app_id"], d) for d in names]
    run_id = secrets.token_hex(7).upper()  # 14 chars + 12 digits = a 26-char unique as:up id
    pub = Publisher("127.0.0.1", job["port"], f"bench-loadgen-{secrets.token_hex(4)}")
    sent_ms = array("d")
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    wall, mono, sleep = time.time, time.monotonic, time.sleep
    cpu0 = time.process_time()
    start = mono()
    j = 0
    while j < count:
        elapsed = mono() - start
        due = min(count, int(elapsed * rate) + 1)
        if due <= j:
            sleep((j + 1) / rate - elapsed)
            continue
        now_ns = time.time_ns()
        t_ms = wall() * 1000.0
        vals = {"sent": f"{t_ms:.1f}".encode(), "at": rfc3339(now_ns).encode(),
                "at_up": rfc3339(now_ns - 30_000_000).encode()}
        batch = []
        while j < due:
            index, k = j % n, j // n
            topic, parts = templates[index]
            vals["fcnt"] = str(k + 1).encode()
            vals["seq"] = str(base + k).encode()
            vals["asup"] = f"{run_id}{j:012d}".encode()
            # Every uplink a new value of every pin (issue 15's profile).
            vals["temp"] = f"{(j % 6000) / 100 - 10:.2f}".encode()
            batch.append(publish_packet(topic, fill(parts, vals)))
            sent_ms.append(t_ms)
            j += 1
        pub.send(b"".join(batch))
    send_s = mono() - start
    cpu_s = time.process_time() - cpu0
    pub.close()
    with open(job["out"], "wb") as f:
        sent_ms.tofile(f)
    rss, peak = rss_bytes(os.getpid())
    print(json.dumps({"sent": j, "send_s": send_s, "cpu_s": cpu_s, "rss": rss, "peak": peak}),
          flush=True)
    return 0


def _read_f64(path: Path) -> list[float]:
    from array import array

    values = array("d")
    values.frombytes(path.read_bytes())
    path.unlink()
    return values.tolist()


class Sender:
    """Runs the load generator process for one step; see :func:`loadgen_main`."""

    def __init__(self, env: Env, app_id: str) -> None:
        self.env = env
        self.app_id = app_id
        self.proc: Proc | None = None
        self._stdout: asyncio.StreamReader | None = None
        self.usage: Usage | None = None
        self._out = env.procs.dir / f"sent-{secrets.token_hex(4)}.f64"

    async def prepare(self, rate: float, count: int, base: int) -> Proc:
        """Start the generator and wait until its templates are built and it is connected."""
        job = self.env.procs.dir / f"loadgen-{secrets.token_hex(4)}.json"
        job.write_text(json.dumps({"names": [d for d, _ in self.env.devices],
                                   "app_id": self.app_id, "port": self.env.mqtt_port,
                                   "rate": rate, "count": count, "base": base,
                                   "out": str(self._out)}))
        self.proc = self.env.procs.spawn("loadgen", [sys.executable, "-m", "bench.e2e",
                                                     "_loadgen", str(job)], pipes=True)
        line = await self._readline(60.0)
        if line != "ready":
            raise BenchError(f"load generator did not start: {line!r}\n{self.proc.tail()}")
        return self.proc

    async def go(self, timeout_s: float) -> tuple[list[float], float]:
        """Publish; returns (send time in ms of every uplink in send order, seconds sending).
        The generator's own CPU and memory are in ``self.usage`` afterwards."""
        assert self.proc is not None and self.proc.popen.stdin is not None
        self.proc.popen.stdin.write(b"go\n")
        self.proc.popen.stdin.flush()
        line = await self._readline(timeout_s)
        if not line.startswith("{"):
            raise BenchError(f"load generator failed: {line!r}\n{self.proc.tail()}")
        done = json.loads(line)
        self.usage = Usage("loadgen", float(done["cpu_s"]), float(done["send_s"]),
                           int(done["rss"]), int(done["peak"]))
        self.env.procs.stop(self.proc)
        sent = await asyncio.to_thread(_read_f64, self._out)
        return sent, float(done["send_s"])

    async def _readline(self, timeout_s: float) -> str:
        """The generator's next line, read on the event loop (no thread: a Ctrl-C must not
        wait for a blocked read)."""
        assert self.proc is not None and self.proc.popen.stdout is not None
        if self._stdout is None:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), self.proc.popen.stdout)
            self._stdout = reader
        try:
            raw = await asyncio.wait_for(self._stdout.readline(), timeout_s)
        except TimeoutError:
            raise BenchError(f"load generator silent for {timeout_s:.0f} s") from None
        return raw.decode().strip()

    async def send(self, rate: float, count: int, base: int) -> tuple[list[float], float]:
        await self.prepare(rate, count, base)
        return await self.go(timeout_s=count / rate + 60.0)


async def collect(emu: Emulator, sent_ms: Sequence[float], names: Sequence[str], base: int,
                  timeout_s: float, quiet_s: float = math.inf) -> Matched:
    """Wait until Blynk holds every sent uplink (or a newer one of its device), nothing new
    arrived for ``quiet_s``, or ``timeout_s`` passed; then pair sends with arrivals.

    The emulator's message count is cheap to poll but is only a hint (a retried request counts
    twice, a coalesced one not at all), so completion is confirmed on the devices' histories.
    """
    deadline = time.monotonic() + timeout_s
    expected = len(sent_ms)
    last, last_change = -1, time.monotonic()
    while True:
        messages, _ = await emu.counts()
        now = time.monotonic()
        if messages != last:
            last, last_change = messages, now
        quiet = now - last_change > quiet_s
        if messages >= expected or quiet or now > deadline:
            got = match(sent_ms, await emu.seq_histories(), names, base)
            if got.delivered == expected or quiet or time.monotonic() > deadline:
                return got
        await asyncio.sleep(0.25)


@dataclass
class Matched:
    latencies_ms: list[float]  # sorted
    delivered: int
    written: int
    last_arrival_ms: float
    #: Blynk's receipt time of each delivered uplink (the first arrival covering it).
    arrivals_ms: list[float] = field(default_factory=list, repr=False)


def match(sent_ms: Sequence[float], histories: dict[str, list[tuple[int, int]]],
          names: Sequence[str], base: int) -> Matched:
    """Pair what was sent with what Blynk received.

    ``sent_ms`` is in send order: uplink ``j`` came from device ``j % N`` with ``seq = base +
    j // N``. Returns (sorted latencies of delivered uplinks, delivered, written, last arrival ms).
    """
    n_dev = len(names)
    latencies: list[float] = []
    arrivals: list[float] = []
    written = 0
    last_arrival = 0.0
    for index, name in enumerate(names):
        times = sent_ms[index::n_dev]
        n = len(times)
        covered = 0
        seen: set[int] = set()
        for ts, seq in histories.get(name, ()):
            k = seq - base
            if k < 0 or k >= n:
                continue
            seen.add(k)
            last_arrival = max(last_arrival, ts)
            while covered <= k:
                latencies.append(ts - times[covered])
                arrivals.append(ts)
                covered += 1
        written += len(seen)
    latencies.sort()
    return Matched(latencies, len(latencies), written, last_arrival, arrivals)


def start_profilers(env: Env, pids: dict[str, int], out_dir: Path, label: str,
                    seconds: float) -> list[tuple[str, Path, Proc]]:
    """py-spy (``pip install py-spy``) on every Python process of the step, collapsed stacks."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy: pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for name, pid in pids.items():
        if name == "node-red":
            continue
        out = out_dir / f"{label}-{name}.txt"
        proc = env.procs.spawn(f"py-spy-{name}", [spy, "record", "--pid", str(pid), "--format",
                                                   "raw", "--rate", "200", "--duration",
                                                   str(max(1, round(seconds))), "--output",
                                                   str(out), "--nonblocking"])
        running.append((name, out, proc))
    return running


#: The frame py-spy shows while an event loop waits in its C poll (uvloop): idle, not work.
_IDLE_FRAMES = ("Runner.run (asyncio/runners.py", "run (uvloop/__init__.py")
_OWN_CODE = ("(workers/", "(pipeline/", "(emulators/")


@dataclass
class Profile:
    busy: float  # share of samples not idle in the event loop
    self_top: list[tuple[float, str]]  # (share of busy samples, frame) by self time
    own_top: list[tuple[float, str]]  # (share of busy samples, frame) of our code, inclusive


def read_profile(collapsed: Path, n: int = 10) -> Profile:
    """Summarize py-spy's collapsed stacks: how busy, and where the busy time went."""
    from collections import Counter

    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        c = int(count)
        if frames[-1].startswith(_IDLE_FRAMES):
            idle += c
            continue
        busy += c
        own[frames[-1]] += c
        for f in set(frames):
            if f.startswith(_IDLE_FRAMES) or not any(m in f for m in _OWN_CODE):
                continue
            inclusive[f] += c
    if not busy:
        return Profile(0.0, [], [])
    return Profile(busy / (busy + idle), [(c / busy, f) for f, c in own.most_common(n)],
                   [(c / busy, f) for f, c in inclusive.most_common(n)])


async def run_step(system: System, env: Env, emu: Emulator, pids: dict[str, int], rate: float,
                   duration_s: float, step: int, drain_s: float,
                   profile: Path | None = None) -> StepResult:
    await emu.reset()
    names = [d for d, _ in env.devices]
    base = step * SEQ_STRIDE
    count = max(1, round(rate * duration_s))
    sender = Sender(env, system.app_id)
    await sender.prepare(rate, count, base)
    usage = UsageProbe({**pids, **env.shared_pids, "blynk-emulator": emu.proc.pid})
    usage.start()
    spies = (start_profilers(env, {**pids, "blynk-emulator": emu.proc.pid}, profile,
                             f"{system.name}-{rate:.0f}", duration_s) if profile else [])
    t_first = time.time() * 1000.0
    sent_ms, send_s = await sender.go(timeout_s=duration_s * 3 + 60.0)
    got = await collect(emu, sent_ms, names, base, timeout_s=drain_s, quiet_s=5.0)
    used = usage.stop()
    if sender.usage is not None:
        used.append(sender.usage)
    messages, refused = await emu.counts()
    for name, out, spy in spies:
        await asyncio.to_thread(spy.popen.wait, 30)
        env.procs.stop(spy)
        if out.exists():
            prof = read_profile(out)
            print(f"\n# py-spy {system.name}/{name} @ {rate:.0f}/s: busy {100 * prof.busy:.0f}% "
                  f"of samples ({out})\n  self time:")
            for share, frame in prof.self_top:
                print(f"  {100 * share:5.1f}%  {frame}")
            print("  our code, inclusive:")
            for share, frame in prof.own_top:
                print(f"  {100 * share:5.1f}%  {frame}")
    span_s = max(1e-3, (got.last_arrival_ms - t_first) / 1000.0) if got.delivered else 0.0
    return StepResult(system.name, rate, duration_s, len(sent_ms), send_s, got.delivered,
                      got.written, messages, refused, got.latencies_ms, span_s, used)


async def warm_up(system: System, env: Env, emu: Emulator, rate: float, timeout_s: float) -> None:
    """Wait until the system bridges at all (probe until one uplink lands), then send one
    uplink per device so caches, pools and JITs are warm; raise if that does not all arrive."""
    names = [d for d, _ in env.devices]
    await emu.reset()
    deadline = time.monotonic() + timeout_s
    probe = Sender(env, system.app_id)
    await probe.prepare(rate=5.0, count=1_000_000, base=SEQ_STRIDE - 1_000_000)
    go = asyncio.ensure_future(probe.go(timeout_s))
    try:
        while (await emu.counts())[0] == 0:
            if time.monotonic() > deadline:
                raise BenchError(f"{system.name}: no uplink reached the emulator within "
                                 f"{timeout_s:.0f} s; see the logs in {env.procs.dir}")
            env.procs.check_alive()
            await asyncio.sleep(0.2)
    finally:
        go.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await go
        if probe.proc is not None:
            env.procs.stop(probe.proc)
    await emu.reset()
    n = len(env.devices)
    sent_ms, _ = await Sender(env, system.app_id).send(min(rate, 5000.0), count=n, base=0)
    got = await collect(emu, sent_ms, names, 0, timeout_s=timeout_s)
    if got.delivered < n:
        raise BenchError(f"{system.name}: warm-up delivered {got.delivered} of {n} uplinks in "
                         f"{timeout_s:.0f} s; see the logs in {env.procs.dir}")


# --- overload (issue 15 goal 4) -------------------------------------------------------------


@dataclass
class Sample:
    t_s: float  # since the load started
    rss: dict[str, int]  # process → RSS bytes
    #: Bridge only: Redis ``used_memory``, entries ever added to the uplinks stream (what ingest
    #: took from the broker), the transform and egress groups' lag (entries not read yet).
    redis: dict[str, int] = field(default_factory=dict)


async def _bridge_state(redis: Any, prefix: str) -> dict[str, int]:
    from pipeline import keys as keynames

    keys = keynames.Keys(prefix)
    out = {"used_memory": int((await redis.info("memory"))["used_memory"])}
    for name, group, label in ((keynames.UPLINKS, keynames.GROUP_TRANSFORM, "uplinks"),
                               (keynames.WRITES, keynames.GROUP_EGRESS, "writes")):
        added = lag = 0
        for stream in keys.streams(name):
            with contextlib.suppress(Exception):  # not created yet
                added += int((await redis.xinfo_stream(stream))["entries-added"])
                for g in await redis.xinfo_groups(stream):
                    gname = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                    if gname == group and isinstance(g.get("lag"), int):
                        lag += g["lag"]
        out[f"{label}_added"], out[f"{label}_lag"] = added, lag
    return out


class Sampler:
    """Once a second: every process's RSS and, for the bridge, its Redis state (see Sample)."""

    def __init__(self, pids: dict[str, int], redis_url: str | None, prefix: str | None) -> None:
        self.pids = pids
        self.redis_url = redis_url
        self.prefix = prefix
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[Sample]:
        # An event, not cancel(): a Redis client cancelled in the middle of a command hung in
        # aclose() afterwards.
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.samples

    async def _run(self) -> None:
        from pipeline.streams import connect

        redis = connect(self.redis_url) if self.redis_url and self.prefix else None
        t0 = time.monotonic()
        try:
            while not self._stop.is_set():
                rss = {}
                for name, pid in self.pids.items():
                    with contextlib.suppress(OSError):
                        rss[name] = rss_bytes(pid)[0]
                state = await _bridge_state(redis, self.prefix or "") if redis else {}
                self.samples.append(Sample(time.monotonic() - t0, rss, state))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
        finally:
            if redis is not None:
                await redis.aclose()


def rss_rows(samples: Sequence[Sample], duration_s: float) -> list[list[object]]:
    """Per process: RSS at the start, at the end of the load, its peak, and the peak of the
    load's first and last thirds (bounded = the last third does not keep climbing)."""
    rows: list[list[object]] = []
    names = sorted({n for s in samples for n in s.rss})
    load = [s for s in samples if s.t_s <= duration_s]
    third = duration_s / 3
    for name in names:
        def peak(xs: Sequence[Sample], name: str = name) -> int:
            return max((s.rss.get(name, 0) for s in xs), default=0)
        rows.append([name, fmt_mib(samples[0].rss.get(name, 0)),
                     fmt_mib(peak([s for s in load if s.t_s <= third])),
                     fmt_mib(peak([s for s in load if s.t_s >= 2 * third])),
                     fmt_mib(load[-1].rss.get(name, 0) if load else 0),
                     fmt_mib(peak(samples)), fmt_mib(samples[-1].rss.get(name, 0))])
    return rows


async def overload_step(system: System, env: Env, emu: Emulator, pids: dict[str, int],
                        rate: float, duration_s: float, drain_s: float,
                        redis_url: str) -> dict[str, Any]:
    """One long step at ``rate`` (meant: 2x the highest sustained rate), sampled every second;
    then wait up to ``drain_s`` for the backlog to drain. Prints and returns the figures."""
    await emu.reset()
    names = [d for d, _ in env.devices]
    base = 90 * SEQ_STRIDE
    count = max(1, round(rate * duration_s))
    sender = Sender(env, system.app_id)
    await sender.prepare(rate, count, base)
    all_pids = {**pids, **env.shared_pids, "blynk-emulator": emu.proc.pid}
    usage = UsageProbe(all_pids)
    prefix = getattr(system, "prefix", None)
    sampler = Sampler({**all_pids, "loadgen": sender.proc.pid if sender.proc else 0},
                      redis_url, prefix)
    before: dict[str, int] = {}
    if prefix is not None:  # what the warm-up put in, so "ingested" counts this step only
        from pipeline.streams import connect

        redis = connect(redis_url)
        try:
            before = await _bridge_state(redis, prefix)
        finally:
            await redis.aclose()
    usage.start()
    sampler.start()
    t_first = time.time() * 1000.0
    sent_ms, send_s = await sender.go(timeout_s=duration_s * 3 + 60.0)
    t_end = t_first + send_s * 1000.0
    got = await collect(emu, sent_ms, names, base, timeout_s=drain_s, quiet_s=30.0)
    samples = await sampler.stop()
    used = usage.stop()
    in_window = sum(1 for a in got.arrivals_ms if a <= t_end)
    drained_s = max(0.0, (got.last_arrival_ms - t_end) / 1000.0) if got.delivered else math.nan
    sent = len(sent_ms)
    print(f"\n# overload: {system.name} at {rate:.0f}/s offered for {duration_s:.0f} s "
          f"(sent {sent} at {sent / send_s:.0f}/s)")
    print(f"delivered during the load: {in_window / send_s:.0f}/s = "
          f"{in_window / send_s / rate:.2f} of offered (goal >= 0.90); delivered in all "
          f"{got.delivered} of {sent} ({got.delivered / sent:.4f}), own value written "
          f"{got.written}; backlog drained {drained_s:.1f} s after the load stopped"
          + ("" if got.delivered == sent else f" — NOT ALL within {drain_s:.0f} s"))
    print(f"latency p50 / p99 / max: {fmt_ms(percentile(got.latencies_ms, 50))} / "
          f"{fmt_ms(percentile(got.latencies_ms, 99))} / "
          f"{fmt_ms(got.latencies_ms[-1] if got.latencies_ms else math.nan)} ms")
    print(table(["process", "RSS start MiB", "peak 1st third", "peak last third",
                 "at load end", "peak", "after drain"], rss_rows(samples, send_s)))
    if samples and samples[0].redis:
        every = max(1, len(samples) // 12)
        rows = []
        for i, smp in enumerate(samples):
            if i % every and i != len(samples) - 1:
                continue
            expect = min(sent, rate * smp.t_s)
            r = smp.redis
            ingested = r["uplinks_added"] - before.get("uplinks_added", 0)
            rows.append([f"{smp.t_s:.0f}", f"{expect:.0f}", ingested,
                         f"{expect - ingested:.0f}", r["uplinks_lag"],
                         r["writes_lag"], fmt_mib(r["used_memory"])])
        print("ingest vs broker (published ≈ offered rate x time; behind = published - taken "
              "by ingest), backlogs and Redis memory (nothing trims the streams here: no "
              "monitor stage runs, so acknowledged entries stay):")
        print(table(["t s", "published", "ingested", "behind", "transform lag", "egress lag",
                     "Redis used MiB"], rows))
    per = 1000.0 / got.delivered if got.delivered else math.nan
    print(table(["process", "CPU %", "CPU ms/deliv"],
                [[u.name, f"{u.cpu_pct:.0f}", f"{u.cpu_s * per:.3f}"] for u in used]))
    return {"system": system.name, "offered": rate, "sent": sent, "delivered": got.delivered,
            "in_window_per_s": in_window / send_s, "drained_s": drained_s,
            "peak_rss": {n: max(s.rss.get(n, 0) for s in samples) for n in all_pids}}


async def overload(system: System, env: Env, emu: Emulator, args: argparse.Namespace
                   ) -> dict[str, Any]:
    pids = {name: p.pid for name, p in system.start().items()}
    try:
        await warm_up(system, env, emu, 1000.0, timeout_s=45.0)
        return await overload_step(system, env, emu, pids, args.rate, args.duration, args.drain,
                                   args.redis_url)
    finally:
        await asyncio.to_thread(system.stop)


# --- cProfile of the bridge (issue 15 goal 2) ------------------------------------------------


def print_cprofile(path: Path, delivered: int, top: int = 25) -> None:
    """The top of a bridge process's cProfile (CPU time, profiled from the first measured
    step): by own time, and our functions by cumulative time, with µs per delivered uplink
    (the profiler's own cost is in them: compare shares, not absolute figures)."""
    import pstats

    if not path.exists():
        print(f"(no profile at {path})")
        return
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    per = 1e6 / delivered if delivered else math.nan
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
    print(f"\n# cProfile {path.name}: {total:.1f} s profiled, {delivered} uplinks delivered; "
          f"top {top} by own time")
    out = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows[:top]:
        where = f"{Path(file).name}:{line}({fn})" if file != "~" else fn
        out.append([where[:70], nc, f"{tt:.2f}", f"{100 * tt / total:.1f}", f"{tt * per:.1f}",
                    f"{ct:.2f}"])
    print(table(["function", "calls", "own s", "own %", "own µs/uplink", "cum s"], out))
    ours = [kv for kv in stats.stats.items()  # type: ignore[attr-defined]
            if "/workers/" in kv[0][0] or "/pipeline/" in kv[0][0]]
    ours.sort(key=lambda kv: -kv[1][3])
    print(f"our functions by cumulative time (top {top}):")
    print(table(["function", "calls", "cum s", "cum µs/uplink"],
                [[f"{Path(f).parts[-2]}/{Path(f).name}:{ln}({fn})"[:70], v[1], f"{v[3]:.2f}",
                  f"{v[3] * per:.1f}"] for (f, ln, fn), v in ours[:top]]))


# --- the run --------------------------------------------------------------------------------


@dataclass
class Plan:
    rates: list[float]
    duration_s: float
    find_max: bool
    drain_s: float
    profile: Path | None = None


async def measure(system: System, env: Env, emu: Emulator, plan: Plan,
                  report: Callable[[StepResult], None]) -> list[StepResult]:
    pids = {name: p.pid for name, p in system.start().items()}
    results: list[StepResult] = []
    try:
        await warm_up(system, env, emu, max(plan.rates[0], 1000.0), timeout_s=45.0)
        if isinstance(system, Bridge):
            system.start_profiling()
        for step, rate in enumerate(plan.rates, start=1):
            env.procs.check_alive()
            r = await run_step(system, env, emu, pids, rate, plan.duration_s, step, plan.drain_s,
                               plan.profile)
            results.append(r)
            report(r)
            if plan.find_max and not r.ok:
                break
    finally:
        await asyncio.to_thread(system.stop)
    return results


def systems_table(results: Sequence[StepResult], at_rate: float) -> str:
    """Issue 15's table: per system the highest passing step, p50/p99 there, p50/p99 at
    ``at_rate``, CPU per uplink there (the system's own processes: not Redis, broker, emulator
    or load generator), and the ratio to Node-RED's highest rate."""
    systems = list(dict.fromkeys(r.system for r in results))
    top = {name: best([r for r in results if r.system == name]) for name in systems}
    nodered = top.get("node-red")
    shared = {"mosquitto", "redis", "redis (shared)", "blynk-emulator", "loadgen"}
    rows = []
    for name in systems:
        b = top[name]
        at = next((r for r in results if r.system == name and r.offered == at_rate), None)
        if b is None:
            rows.append([name, "none passed", "", "", "", ""])
            continue
        own = sum(u.cpu_s for u in b.usage if u.name not in shared)
        redis = sum(u.cpu_s for u in b.usage if u.name in ("redis", "redis (shared)"))
        rows.append([
            name, f"{b.throughput:,.0f}/s at {b.offered:,.0f} offered (written "
                  f"{b.written / b.sent:.3f})",
            f"{fmt_ms(b.p50)} / {fmt_ms(b.p99)}",
            f"{fmt_ms(at.p50)} / {fmt_ms(at.p99)}" if at else "-",
            f"{1000 * own / b.delivered:.3f} (+ Redis {1000 * redis / b.delivered:.3f})",
            f"{b.throughput / nodered.throughput:.2f}x" if nodered else "-"])
    return table(["system", f"highest rate, no loss, p99 <= {P99_LIMIT_MS:.0f} ms"
                  + (", all written" if ALL_WRITTEN else ""), "p50 / p99 ms there",
                  f"at {at_rate:.0f}/s: p50 / p99 ms", "CPU ms per uplink there",
                  "x Node-RED"], rows)


def best(results: Sequence[StepResult]) -> StepResult | None:
    ok = [r for r in results if r.ok]
    return max(ok, key=lambda r: r.throughput) if ok else None


async def amain(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    n = args.devices
    devices = [(device_name(i), secrets.token_urlsafe(24)) for i in range(n)]
    global P99_LIMIT_MS, ALL_WRITTEN
    P99_LIMIT_MS, ALL_WRITTEN = args.p99_limit, args.all_written
    rates = [float(r) for r in args.rates] if args.find_max else [float(args.rate)]
    per_device = max(rates) * args.duration / n
    history_len = max(1000, int(per_device * 2) + 100)
    print(f"# e2e: {n} devices, rates {', '.join(f'{r:.0f}' for r in rates)}/s, "
          f"{args.duration:.0f} s per step; bridge processes: "
          f"{'; '.join(','.join(b) for b in args.bridges)}; "
          f"baseline: {args.baseline}", flush=True)
    print(f"# machine: {machine()}", flush=True)
    load1 = os.getloadavg()[0]
    print(f"# load average before the run: {load1:.2f}"
          + ("  (busy machine: figures are not comparable)" if load1 > 1.0 else ""), flush=True)

    if args.private_redis:
        from bench.transform import start_redis

        port, _ = start_redis(procs)
        args.redis_url = f"redis://127.0.0.1:{port}/0"
    broker, mqtt_port = start_mosquitto(procs)
    emu_proc, blynk_url = start_emulator(procs, devices, history_len)
    env = Env(procs, mqtt_port, blynk_url, devices, {"mosquitto": broker.pid})
    redis_pid = await _redis_pid(args.redis_url)
    if redis_pid is not None:
        env.shared_pids["redis" if args.private_redis else "redis (shared)"] = redis_pid
    emu = Emulator(emu_proc, blynk_url)
    plan = Plan(rates, args.duration, args.find_max, args.drain, args.profile)

    def report(r: StepResult) -> None:
        print(table(STEP_HEADERS, [step_row(r)]), flush=True)

    all_results: list[StepResult] = []
    overloads: list[dict[str, Any]] = []
    try:
        systems: list[System] = []
        if not args.skip_bridge:
            several = len(args.bridges) > 1
            for processes in args.bridges:
                label = ("run" if processes == ["run"] else f"{len(processes)} processes")
                for variant in (args.variant or [None]):
                    systems.append(Bridge(env, processes, args.redis_url,
                                          label=label if several else None,
                                          cprofile=args.cprofile, variant=variant,
                                          loop_probe=args.loop_probe))
        if args.baseline == "nodered":
            systems.append(NodeRed(env))
        for system in systems:
            print(f"\n## {system.name}", flush=True)
            if args.overload:
                overloads.append(await overload(system, env, emu, args))
                continue
            results = await measure(system, env, emu, plan, report)
            all_results += results
            if args.cprofile is not None and isinstance(system, Bridge) and results:
                for proc_name in system.processes:
                    print_cprofile(args.cprofile / f"{proc_name}.prof",
                                   sum(r.delivered for r in results))
            if args.loop_probe is not None and isinstance(system, Bridge) and results:
                for proc_name in system.processes:
                    print_probe(args.loop_probe / f"{proc_name}.json", system.name)
    finally:
        await emu.close()
    if args.overload:
        return {"machine": machine(), "load_before": load1, "devices": n,
                "duration_s": args.duration, "overload": overloads}

    print("\n## results", flush=True)
    print(table(STEP_HEADERS, [step_row(r) for r in all_results]))
    print()
    print(table(USAGE_HEADERS, [row for r in all_results for row in usage_rows(r)]))
    summary: dict[str, Any] = {"machine": machine(), "load_before": load1,
                               "devices": n, "duration_s": args.duration,
                               "processes": args.processes,
                               "steps": [r.summary() for r in all_results]}
    bridge = [r for r in all_results if r.system.startswith("bridge")]
    base = [r for r in all_results if r.system == "node-red"]
    print()
    if args.find_max and len(args.bridges) > 1:
        print(systems_table(all_results, args.at_rate))
    elif args.find_max:
        bb, bn = best(bridge), best(base)
        for label, b, ran in (("bridge", bb, bridge), ("node-red", bn, base)):
            if not ran:
                continue
            if b is None:
                print(f"{label}: no rate met delivered/sent = 1.0 and p99 <= {P99_LIMIT_MS:.0f} ms")
            else:
                print(f"{label}: max {b.throughput:.0f} uplinks/s delivered at offered "
                      f"{b.offered:.0f}/s (p99 {b.p99:.1f} ms, no loss)")
        if bb and bn:
            print(f"ratio bridge/node-red (max throughput at p99 <= {P99_LIMIT_MS:.0f} ms, no "
                  f"loss): {bb.throughput / bn.throughput:.2f}x")
            summary["ratio"] = bb.throughput / bn.throughput
    elif bridge and base:
        b, n_ = bridge[0], base[0]
        if b.ok and n_.ok:
            print(f"ratio bridge/node-red throughput at {b.offered:.0f}/s offered: "
                  f"{b.throughput / n_.throughput:.2f}x (both: no loss, p99 <= "
                  f"{P99_LIMIT_MS:.0f} ms)")
            summary["ratio"] = b.throughput / n_.throughput
        else:
            failing = [r.system for r in (b, n_) if not r.ok]
            print(f"no ratio: {', '.join(failing)} did not meet no-loss and p99 <= "
                  f"{P99_LIMIT_MS:.0f} ms at {b.offered:.0f}/s (use --find-max); delivered/s "
                  f"bridge {b.throughput:.0f} vs node-red {n_.throughput:.0f}, p99 "
                  f"{fmt_ms(b.p99)} vs {fmt_ms(n_.p99)} ms")
    return summary


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, raw = text.partition("={")  # names may hold '=' themselves
    overrides = json.loads("{" + raw) if sep else None
    if not name or not isinstance(overrides, dict) or not all(
            isinstance(v, dict) for v in overrides.values()):
        raise argparse.ArgumentTypeError("NAME={\"section\": {\"key\": value}}")
    return name, overrides


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=5000.0, help="offered uplinks/s (whole fleet)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load per step (default 10, or 8 with --find-max)")
    p.add_argument("--devices", type=int, default=10_000, help="distinct devices")
    p.add_argument("--baseline", choices=["nodered", "none"], default="nodered")
    p.add_argument("--processes", type=lambda s: [x for x in s.split(",") if x],
                   default=["ingest-mqtt", "transform", "egress"],
                   help="bridge processes: comma-separated stages (repeat one for replicas), "
                        "or 'run' for every stage in one process")
    p.add_argument("--find-max", action="store_true",
                   help="step the rate up (--rates) until a step loses uplinks or p99 > 500 ms")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                   default=[250.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0,
                            8000.0],
                   help="--find-max steps (uplinks/s)")
    p.add_argument("--drain", type=float, default=15.0,
                   help="max seconds to wait for delivery after the load stops")
    p.add_argument("--skip-bridge", action="store_true", help="measure the baseline only")
    p.add_argument("--variant", type=_variant, action="append", metavar="NAME=JSON",
                   help="measure the bridge with these config sections merged over the "
                   "bench's, e.g. 'age100={\"egress\": {\"flush_age_ms\": 100}}'; repeat to "
                   "measure several in the same run ('default={}': the bridge's defaults)")
    p.add_argument("--redis-url", default=REDIS_URL, help="Redis the bridge uses (a fresh key "
                   "prefix is made and deleted)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample every Python process with py-spy during each step (needs "
                        "`pip install py-spy`); collapsed stacks go to DIR, top frames printed")
    p.add_argument("--keep-logs", action="store_true", help="keep the scratch dir with logs")
    p.add_argument("--bridges", type=lambda s: [[x for x in one.split(",") if x]
                                                for one in s.split(";") if one],
                   help="several bridge set-ups, each measured in turn: --processes lists "
                        "separated by ';', e.g. 'run;ingest-mqtt,transform,egress'")
    p.add_argument("--p99-limit", type=float, default=P99_LIMIT_MS,
                   help="a step passes with p99 at or under this many ms (and no loss)")
    p.add_argument("--all-written", action="store_true",
                   help="a step passes only if every uplink's own value was written (none "
                        "superseded by a newer one before egress sent it)")
    p.add_argument("--at-rate", type=float, default=1000.0,
                   help="with --bridges: the table also shows p50/p99 at this offered rate")
    p.add_argument("--overload", action="store_true",
                   help="one long step at --rate (2x the highest sustained rate) sampled every "
                        "second: throughput during the load, RSS of every process, ingest vs "
                        "the broker, backlogs, drain time (issue 15 goal 4)")
    p.add_argument("--cprofile", type=Path, metavar="DIR",
                   help="run each bridge process under cProfile (stats in DIR) and print the "
                        "top of each profile after its steps")
    p.add_argument("--loop-probe", type=Path, metavar="DIR",
                   help="run each bridge process under a probe of its event loop (how late a "
                        "5 ms timer fires, CPU spent between two ticks: the synchronous slices) "
                        "and of its cyclic GC (pauses per generation, CPU clock), from the "
                        "first measured step to the end; summaries in DIR, printed")
    p.add_argument("--private-redis", action="store_true",
                   help="start a redis-server of the run's own (free port, no persistence), so "
                        "its CPU per uplink is the bridge's alone")
    p.add_argument("--issue15", action="store_true",
                   help="issue 15's table in one command: 1,000 devices, 20 s steps, p99 <= "
                        "1 s, Node-RED, `run` and the three stage processes, --find-max over "
                        "500..6000/s (--all-written to count superseded values as not written)")
    args = p.parse_args(argv)
    if args.issue15:
        args.find_max = True
        args.devices = 1000 if args.devices == 10_000 else args.devices
        args.duration = 20.0 if args.duration is None else args.duration
        if args.p99_limit == P99_LIMIT_MS:
            args.p99_limit = 1000.0
        if args.bridges is None:
            args.bridges = [["run"], ["ingest-mqtt", "transform", "egress"]]
        args.private_redis = True
        if "--rates" not in (argv or sys.argv):
            args.rates = [500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 4000.0, 5000.0,
                          6000.0]
    if args.bridges is None:
        args.bridges = [args.processes]
    if args.overload:
        args.find_max = False
        if args.duration is None:
            args.duration = 60.0
        if args.drain == 15.0:
            args.drain = 180.0
    if args.duration is None:
        args.duration = 8.0 if args.find_max else 10.0
    from blynk_bridge.cli import STAGES

    for name in [n for processes in args.bridges for n in processes]:
        if name != "run" and name not in STAGES:
            p.error(f"--processes: unknown stage {name!r}")
    if args.devices < 1 or args.rate <= 0 or args.duration <= 0:
        p.error("--devices, --rate and --duration must be positive")
    return args


def cprofile_main(out: str, argv: list[str]) -> int:
    """A bridge process (``blynk-bridge`` with ``argv``) whose CPU time (``process_time``: not
    wall time, which a loaded machine inflates) is profiled from SIGUSR1 until it exits;
    stats go to ``out``. Starting late keeps startup (config parsing) out of the profile."""
    import cProfile
    import signal

    from blynk_bridge.cli import main as bridge_main

    prof = cProfile.Profile(time.process_time)
    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
    try:
        return bridge_main(argv)
    finally:
        prof.disable()
        prof.dump_stats(out)


#: The loop probe's tick: a timer this often, how late it fires, the CPU used in between.
PROBE_TICK_S = 0.005


def probe_main(out: str, argv: list[str]) -> int:
    """A bridge process (``blynk-bridge`` with ``argv``) whose event loop and cyclic GC are
    watched from SIGUSR1 until it exits; a JSON summary goes to ``out``.

    The loop: a timer every :data:`PROBE_TICK_S`; its lateness (wall: includes time the machine
    gave to other processes) and the process CPU time between two ticks (what the loop ran
    without yielding to the timer: the long synchronous slices; CPU clock, so a busy machine does
    not inflate it). The GC: each collection's CPU time by generation (``gc.callbacks``)."""
    import gc
    import signal

    from blynk_bridge import cli

    on = False
    lags: list[float] = []
    slices: list[float] = []
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if not on:
            return
        if phase == "start":
            started[0] = time.process_time()
        else:
            pauses[info["generation"]].append(time.process_time() - started[0])

    def enable(*_: Any) -> None:
        nonlocal on
        on = True

    async def watched(coro: Any) -> Any:
        loop = asyncio.get_running_loop()
        last_cpu = [time.process_time()]

        def tick(due: float) -> None:
            now, cpu = loop.time(), time.process_time()
            if on:
                lags.append(now - due)
                slices.append(cpu - last_cpu[0])
            last_cpu[0] = cpu
            loop.call_at(now + PROBE_TICK_S, tick, now + PROBE_TICK_S)

        loop.call_soon(tick, loop.time())
        return await coro

    real_run = cli._asyncio_run
    cli._asyncio_run = lambda coro: real_run(watched(coro))
    gc.callbacks.append(on_gc)
    signal.signal(signal.SIGUSR1, enable)
    try:
        return cli.main(argv)
    finally:
        ms = [1000 * x for x in sorted(lags)]
        cpu = [1000 * x for x in sorted(slices)]
        Path(out).write_text(json.dumps({
            "ticks": len(ms),
            "lag_ms": {"p50": percentile(ms, 50), "p99": percentile(ms, 99),
                       "p999": percentile(ms, 99.9), "max": ms[-1] if ms else math.nan},
            "slice_cpu_ms": {"p50": percentile(cpu, 50), "p99": percentile(cpu, 99),
                             "p999": percentile(cpu, 99.9), "max": cpu[-1] if cpu else math.nan,
                             "over_10": sum(1 for x in cpu if x > 10),
                             "over_20": sum(1 for x in cpu if x > 20),
                             "over_50": sum(1 for x in cpu if x > 50)},
            "gc": {str(g): {"n": len(p), "cpu_ms": 1000 * sum(p),
                            "max_ms": 1000 * max(p, default=0.0)} for g, p in pauses.items()},
            "gc_threshold": list(gc.get_threshold()), "gc_frozen": gc.get_freeze_count(),
        }))


def print_probe(path: Path, system: str) -> None:
    """The loop probe's summary of one bridge process (see probe_main)."""
    if not path.exists():
        print(f"(no loop probe at {path})")
        return
    p = json.loads(path.read_text())
    lag, cpu = p["lag_ms"], p["slice_cpu_ms"]
    print(f"\n# loop probe {system}/{path.stem}: {p['ticks']} ticks of {1000 * PROBE_TICK_S:.0f} "
          f"ms; timer late p50/p99/p99.9/max {lag['p50']:.1f} / {lag['p99']:.1f} / "
          f"{lag['p999']:.1f} / {lag['max']:.1f} ms (wall)")
    print(f"  CPU between ticks p50/p99/p99.9/max {cpu['p50']:.2f} / {cpu['p99']:.2f} / "
          f"{cpu['p999']:.2f} / {cpu['max']:.2f} ms; slices over 10/20/50 ms: "
          f"{cpu['over_10']} / {cpu['over_20']} / {cpu['over_50']}")
    for g, v in p["gc"].items():
        print(f"  GC gen{g}: {v['n']} collections, {v['cpu_ms']:.1f} ms CPU in all, longest "
              f"{v['max_ms']:.2f} ms")
    print(f"  thresholds {tuple(p['gc_threshold'])}, {p['gc_frozen']} objects frozen")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_loadgen"]:
        return loadgen_main(argv[1])
    if argv[:1] == ["_cprofile"]:
        return cprofile_main(argv[1], argv[2:])
    if argv[:1] == ["_probe"]:
        return probe_main(argv[1], argv[2:])
    args = parse_args(argv)
    if args.baseline == "nodered":
        from bench.nodered import runner

        runner.ensure_installed()
    try:
        with interrupt_as_exception(), Processes(keep_dir=args.keep_logs) as procs:
            try:
                import uvloop

                summary = uvloop.run(amain(args, procs))
            except ImportError:  # pragma: no cover
                summary = asyncio.run(amain(args, procs))
    except KeyboardInterrupt:
        print("bench: interrupted; processes stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
