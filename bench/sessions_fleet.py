"""Many Blynk device sessions across blynk-sessions replicas on one machine.

``--replicas`` ``blynk-bridge blynk-sessions`` processes share the sessions of ``--devices``
devices of a ``downlinks: mqtt`` template; the Blynk emulator's device MQTT endpoint is split
over ``--emulators`` processes (one region and port each, devices dealt round-robin), because
one process holds at most ``ulimit -Hn`` sockets. Every child runs with RLIMIT_NOFILE raised to
its hard limit.

Steps: start the emulators and the replicas; wait until the replicas hold every partition
lease, each at most its fair share (so no replica opens another's sessions first); register
the devices (registry rows) and make them live with one BlynkWrite each; wait until the
emulators count every session; read each process's RSS. Open time runs from the first
BlynkWrite to the last session counted, paced by the stage's global ``--connect-rate``.

    .venv/bin/python -m bench.sessions_fleet --devices 100000 --replicas 8 --emulators 8

When the machine cannot hold ``--devices``, the run stops at ``--open-timeout`` and prints how
far it got and each process's state (the limit: fds, memory or CPU) instead of a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench.common import (
    BenchError,
    Processes,
    cpu_seconds,
    fmt_mib,
    free_port,
    machine,
    rss_bytes,
    table,
    wait_port,
)

if TYPE_CHECKING:
    from pipeline.keys import Keys

REDIS_URL = "redis://127.0.0.1:6379/0"

#: The emulator's file for one region (``{region}``) of valves (V2 Switch, V3 Setpoint).
EMULATOR = """\
regions:
  {region}: {{port: {http_port}, mqtt_port: {mqtt_port}}}
settings: {{request_log_len: 0, device_rps: null, daily_updates: null}}
templates:
  - id: TMPL01
    name: Valve
    datastreams:
      - {{id: 1, pin: V2, name: Switch, type: integer, min: 0, max: 1}}
      - {{id: 2, pin: V3, name: Setpoint, type: integer}}
devices:
{devices}
"""

#: The bridge's side of the same valves: downlinks over the device sessions, V3 writable.
VALVE_TEMPLATE = """\
templates:
  - name: valve
    id: TMPL01
    downlinks: mqtt
    datastreams:
      - {{name: Switch, pin: V2, type: integer, min: 0, max: 1}}
      - {{name: Setpoint, pin: V3, type: integer}}
    downlink: {{pins: [V3]}}
"""

BRIDGE = """\
redis: {{url: "{redis}", prefix: "{prefix}"}}
streams: {{block_ms: 1000}}
metrics: {{host: 127.0.0.1, port: "${{METRICS_PORT}}"}}
blynk:
  servers: {{{servers}}}
  default_server: r0
blynk_sessions:
  servers: {{{mqtt}}}
  connect_rate: {rate}
  connect_burst: {burst}
  partitions: {partitions}
""" + VALVE_TEMPLATE

#: Sets RLIMIT_NOFILE to the hard limit, then runs the CLI (limits pass on through exec).
_RAISE_NOFILE = ("import resource, runpy, sys; s, h = resource.getrlimit(resource.RLIMIT_NOFILE);"
                 " resource.setrlimit(resource.RLIMIT_NOFILE, (h, h)); sys.argv = {argv!r};"
                 " runpy.run_module('blynk_bridge', run_name='__main__', alter_sys=True)")


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-c",
            _RAISE_NOFILE.format(argv=["blynk_bridge", "--log-level", "WARNING",
                                       "--log-format", "text", *argv])]


def token_of(i: int) -> str:
    return f"fleet{i:07d}".ljust(32, "x")


def name_of(i: int) -> str:
    return f"valve-{i:07d}"


def _sessions(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/_admin/mqtt", timeout=30) as r:
        return int(json.loads(r.read())["sessions"])


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def _balanced(prefix: str, partitions: int, replicas: int) -> bool:
    """Every partition lease held, by ``replicas`` owners, none over its fair share."""
    from pipeline.keys import Keys
    from pipeline.lease import owner_of
    from pipeline.streams import connect

    redis = connect(REDIS_URL)
    keys = Keys(prefix)
    try:
        owners = await redis.mget([keys.lease("sessions", str(p)) for p in range(partitions)])
    finally:
        await redis.aclose()
    count: dict[str, int] = {}
    for o in owners:  # the values are tokens per acquisition: count their owners
        if o is None:
            return False
        count[owner_of(o)] = count.get(owner_of(o), 0) + 1
    share = -(-partitions // replicas)
    return len(count) == replicas and max(count.values()) <= share


async def go_live(redis: Any, keys: Keys, devices: int, token: Callable[[int], str],
                  name: Callable[[int], str], server: Callable[[int], str]) -> None:
    """One BlynkWrite (V2 = 0) per device ``tts:fleet:{name(i)}`` onto the writes stream, in
    pipelines of 5000: what makes the sessions stage open each device's session."""
    from pipeline import events
    from pipeline.keys import WRITES

    now = time.time_ns() // 1_000_000
    for start in range(0, devices, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(devices, start + 5000)):
                w = events.BlynkWrite(token=token(i), server=server(i),
                                      device_key=f"tts:fleet:{name(i)}",
                                      pins={"V2": 0}, event_ts_ms=now, received_ts_ms=now,
                                      event_id=f"bench:{i}")
                pipe.xadd(keys.stream(WRITES), {events.FIELD: events.encode(w)})
            await pipe.execute()


async def _register_and_go_live(prefix: str, devices: int, servers: list[str]) -> None:
    from pipeline.config import DeviceEntry
    from pipeline.keys import Keys
    from pipeline.redact import Secret
    from pipeline.registry import Registry
    from pipeline.streams import connect

    redis = connect(REDIS_URL)
    keys = Keys(prefix)
    try:
        reg = Registry(redis, keys)
        rows = [DeviceEntry(source="tts", integration="fleet", device=name_of(i),
                            token=Secret(token_of(i)), template="valve",
                            server=f"r{i % len(servers)}") for i in range(devices)]
        # Rows name the region (``blynk.servers``); writes carry its URL, as egress sees it.
        await reg.load_static(rows)
        await go_live(redis, keys, devices, token_of, name_of, lambda i: servers[i % len(servers)])
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--emulators", type=int, default=8)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--connect-rate", type=float, default=2000.0)
    ap.add_argument("--connect-burst", type=int, default=200)
    ap.add_argument("--open-timeout", type=float, default=900.0)
    ap.add_argument("--idle-s", type=float, default=60.0,
                    help="after all are open, idle this long and report CPU (keepalives)")
    ap.add_argument("--settle-s", type=float, default=3.0,
                    help="after all are open, wait this long before reading RSS and CPU")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(machine())
    print(f"RLIMIT_NOFILE hard {hard} (soft was {soft}); children raise theirs to it")
    from bench.common import delete_prefix

    prefix = f"bbbench:fleet:{os.getpid()}:"
    with Processes(keep_dir=args.keep_logs) as procs:
        print(f"logs: {procs.dir}", file=sys.stderr)
        emus: list[tuple[int, int]] = []
        emu_procs = []
        for j in range(args.emulators):
            devs = "\n".join(
                f"  - {{name: {name_of(i)}, token: {token_of(i)}, template: TMPL01, "
                f"id: {i + 1}}}" for i in range(j, args.devices, args.emulators))
            for attempt in range(5):  # free ports are racy on a shared machine: retry
                http_port, mqtt_port = free_port(), free_port()
                path = procs.dir / f"blynk{j}.yaml"
                path.write_text(EMULATOR.format(region=f"r{j}", http_port=http_port,
                                                mqtt_port=mqtt_port, devices=devs))
                p = procs.spawn(f"blynk{j}-{attempt}", _cli("emulate", "blynk", "-c", str(path)))
                try:
                    wait_port(http_port, proc=p, timeout_s=300)
                    wait_port(mqtt_port, proc=p, timeout_s=60)
                except BenchError:
                    if attempt == 4:
                        raise
                    procs.stop(p)
                    continue
                break
            emu_procs.append(p)
            emus.append((http_port, mqtt_port))
        servers = [f"http://127.0.0.1:{h}" for h, _ in emus]
        bridge_cfg = procs.dir / "bridge.yaml"
        bridge_cfg.write_text(BRIDGE.format(
            redis=REDIS_URL, prefix=prefix, rate=args.connect_rate, burst=args.connect_burst,
            partitions=args.partitions,
            servers=", ".join(f'r{j}: "{s}"' for j, s in enumerate(servers)),
            mqtt=", ".join(f'r{j}: "mqtt://127.0.0.1:{m}"' for j, (_, m) in enumerate(emus))))
        reps = []
        for r in range(args.replicas):
            mp = free_port()
            reps.append((procs.spawn(f"sessions{r}", _cli("blynk-sessions", "-c",
                                                          str(bridge_cfg)),
                                     env={"METRICS_PORT": str(mp)}), mp))
        for p, mp in reps:
            wait_port(mp, proc=p, timeout_s=300)
        t0 = time.monotonic()
        while not asyncio.run(_balanced(prefix, args.partitions, args.replicas)):
            procs.check_alive()
            if time.monotonic() - t0 > 120:
                raise BenchError("replicas did not share the partitions within 120 s")
            time.sleep(0.5)
        print(f"partitions shared by {args.replicas} replicas after {time.monotonic() - t0:.1f} s")
        rss0 = {p.name: rss_bytes(p.pid)[0] for p in procs.procs}
        cpu0 = {p.name: cpu_seconds(p.pid) for p in procs.procs}
        t0 = time.monotonic()
        asyncio.run(_register_and_go_live(prefix, args.devices, servers))
        live_s = time.monotonic() - t0
        last, last_at, held = 0, time.monotonic(), 0
        while True:
            procs.check_alive()
            held = sum(_sessions(h) for h, _ in emus)
            now = time.monotonic()
            if held >= args.devices:
                break
            if held > last:
                last, last_at = held, now
            if now - t0 > args.open_timeout or now - last_at > 120:
                break
            time.sleep(0.25)
        open_s = time.monotonic() - t0
        time.sleep(args.settle_s)
        rows = []
        cpu1 = {p.name: cpu_seconds(p.pid) for p in procs.procs}
        for p in procs.procs:
            rss = rss_bytes(p.pid)[0]
            rows.append([p.name, fmt_mib(rss0[p.name]), fmt_mib(rss), _open_fds(p.pid),
                         f"{cpu1[p.name] - cpu0[p.name]:.1f}"])
        print(f"registry rows + {args.devices} BlynkWrites written in {live_s:.1f} s; "
              f"{held} of {args.devices} sessions open after {open_s:.1f} s "
              f"({held / open_s:.0f}/s; stage connect rate {args.connect_rate:.0f}/s)")
        print(table(["process", "RSS before", "RSS after (MiB)", "open fds", "CPU s to open"],
                    rows))
        rep_rss = sum(rss_bytes(p.pid)[0] - rss0[p.name] for p, _ in reps)
        emu_rss = sum(rss_bytes(p.pid)[0] - rss0[p.name] for p in emu_procs)
        if held:
            print(f"per session: replicas {rep_rss / held / 1024:.2f} KiB, emulators "
                  f"{emu_rss / held / 1024:.2f} KiB (RSS growth / sessions held)")
        if args.idle_s > 0 and held:
            c0 = {p.name: cpu_seconds(p.pid) for p in procs.procs}
            time.sleep(args.idle_s)
            c1 = {p.name: cpu_seconds(p.pid) for p in procs.procs}
            rep = sum(c1[p.name] - c0[p.name] for p, _ in reps)
            emu = sum(c1[p.name] - c0[p.name] for p in emu_procs)
            print(f"idle {args.idle_s:.0f} s with {held} sessions: replicas {rep / args.idle_s:.1%}"
                  f" of a core, emulators {emu / args.idle_s:.1%} (keepalives every 45 s); "
                  f"still open: {sum(_sessions(h) for h, _ in emus)}")
        print(f"load average {os.getloadavg()[0]:.2f}; MemAvailable "
              f"{_meminfo('MemAvailable') // 1024} MiB")
    asyncio.run(delete_prefix(REDIS_URL, prefix))
    return 0 if held >= args.devices else 1


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
