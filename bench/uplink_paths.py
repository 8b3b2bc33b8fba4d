"""The two wires a device's coalesced values could take to Blynk: HTTPS ``batch/update`` (what
egress sends) vs one ``batch_ds`` publish on the device's MQTT session (``uplinks: mqtt``,
designed in docs/DESIGN.md, not built). Only the last hop is measured, not the Redis hop the
MQTT path would add (egress → the session owner's stream): this bench says what the wire costs.

The Blynk emulator (one process, HTTP and device MQTT endpoints) holds ``--devices`` devices
of a template with ``--values`` datastreams. A sender child process sends ``--updates``
updates, round-robin over the devices, each carrying every datastream (distinct values):

* ``https`` — :meth:`pipeline.blynk.client.BlynkClient.batch_update` (egress's client: the lean
  keep-alive HTTP client), ``--concurrency`` requests in flight;
* ``mqtt`` — :class:`pipeline.blynk.device_mqtt.Session` (the sessions stage's client), one
  session per device opened first (not measured), then ``batch_ds`` (JSON name → value) at
  QoS 0; done when the emulator counted every publish.

Reported: the sender's CPU and the emulator's CPU per value (from /proc), messages on the
wire per update. Runs alternate (``--repeat``) on the same processes' code.

    .venv/bin/python -m bench.uplink_paths --devices 1000 --updates 20000 --values 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request

from bench.common import (
    BenchError,
    Processes,
    SessionCounter,
    cpu_seconds,
    free_port,
    machine,
    table,
    wait_port,
)

EMULATOR = """\
regions:
  fra1: {{port: {http_port}, mqtt_port: {mqtt_port}}}
settings: {{request_log_len: 0, device_rps: null, daily_updates: null}}
templates:
  - id: TMPL01
    name: Meter
    datastreams:
{datastreams}
devices:
{devices}
"""


def token_of(i: int) -> str:
    return f"uplink{i:06d}".ljust(32, "x")


def _stats(http_port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/_admin/mqtt", timeout=30) as r:
        return dict(json.loads(r.read()).get("stats", {}))


def sender(kind: str, http_port: int, mqtt_port: int, devices: int, updates: int, values: int,
           concurrency: int) -> None:
    """Run in a child: print ``{"cpu": sender CPU s for the updates, "bad": n}``."""
    import uvloop

    async def https() -> tuple[float, int]:
        from pipeline.blynk.client import BlynkClient
        from pipeline.config import BlynkConfig
        from pipeline.keys import Keys
        from pipeline.streams import connect

        redis = connect("redis://127.0.0.1:6379/0")
        cfg = BlynkConfig(servers={"fra1": f"http://127.0.0.1:{http_port}"},
                          default_server="fra1")
        client = BlynkClient(cfg, redis, Keys(f"bbbench:uplink:{os.getpid()}:"))
        server = f"http://127.0.0.1:{http_port}"
        bad = 0
        sem = asyncio.Semaphore(concurrency)

        async def one(k: int) -> None:
            nonlocal bad
            pins = {f"V{v}": k * values + v for v in range(values)}
            async with sem:
                out = await client.batch_update(server, token_of(k % devices), pins)
            if getattr(out, "status", 0) != 200:
                bad += 1

        # Warm: every device's region known, connections open (not measured).
        await asyncio.gather(*(one(k) for k in range(min(devices, 200))))
        bad = 0
        _ready()
        t0 = time.process_time()
        await asyncio.gather(*(one(k) for k in range(updates)))
        cpu = time.process_time() - t0
        await client.close()
        await redis.aclose()
        return cpu, bad

    async def mqtt() -> tuple[float, int]:
        import msgspec

        from pipeline.blynk.device_mqtt import Session, open_session

        h = SessionCounter(devices)
        sessions = [Session(f"k{i}", token_of(i), h) for i in range(devices)]
        sem = asyncio.Semaphore(100)

        async def open_one(s: Session) -> None:
            async with sem:
                await open_session(s, "127.0.0.1", mqtt_port)

        await asyncio.gather(*(open_one(s) for s in sessions))
        await asyncio.wait_for(h.ready.wait(), 300)
        enc = msgspec.json.Encoder()
        bad = 0
        _ready()
        t0 = time.process_time()
        for k in range(updates):
            body = enc.encode({f"D{v}": k * values + v for v in range(values)})
            if not sessions[k % devices].publish("batch_ds", body):
                bad += 1
            if k % 500 == 499:
                await asyncio.sleep(0)  # let the transports write, as a live owner would
        # Written once every transport's buffer is empty.
        while any(s.transport is not None and s.transport.get_write_buffer_size()  # noqa: ASYNC110
                  for s in sessions):  # no event says "written": poll the buffers
            await asyncio.sleep(0.01)
        cpu = time.process_time() - t0
        print(json.dumps({"cpu": cpu, "bad": bad + h.closed}), flush=True)
        sys.stdin.readline()  # keep sessions open until the emulator counted every publish
        return cpu, bad + h.closed

    def _ready() -> None:
        """Say so and wait for the go: what came before (connects, warm-up) is not measured."""
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()

    async def main() -> None:
        if kind == "https":
            cpu, bad = await https()
            print(json.dumps({"cpu": cpu, "bad": bad}), flush=True)
        else:
            await mqtt()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--updates", type=int, default=20_000)
    ap.add_argument("--values", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    from bench.downlinks import _python

    print(machine())
    rows = []
    with Processes() as procs:
        http_port, mqtt_port = free_port(), free_port()
        ds = "\n".join(f"      - {{id: {v + 1}, pin: V{v}, name: D{v}, type: integer}}"
                       for v in range(args.values))
        devs = "\n".join(f"  - {{name: m{i}, token: {token_of(i)}, template: TMPL01, "
                         f"id: {i + 1}}}" for i in range(args.devices))
        cfg = procs.dir / "blynk.yaml"
        cfg.write_text(EMULATOR.format(http_port=http_port, mqtt_port=mqtt_port,
                                       datastreams=ds, devices=devs))
        emu = procs.spawn("blynk", [sys.executable, "-m", "blynk_bridge", "--log-level",
                                    "WARNING", "emulate", "blynk", "-c", str(cfg)])
        wait_port(http_port, proc=emu, timeout_s=120)
        wait_port(mqtt_port, proc=emu, timeout_s=60)
        for _ in range(args.repeat):
            for kind in ("https", "mqtt"):
                code = (f"from bench.uplink_paths import sender; sender({kind!r}, {http_port}, "
                        f"{mqtt_port}, {args.devices}, {args.updates}, {args.values}, "
                        f"{args.concurrency})")
                before = _stats(http_port).get("publish:batch_ds", 0)
                child = procs.spawn(f"send-{kind}", _python(code), pipes=True)
                assert child.popen.stdout is not None and child.popen.stdin is not None
                if not json.loads(child.popen.stdout.readline()).get("ready"):
                    raise BenchError(f"{kind} sender did not start\n{child.tail()}")
                emu0 = cpu_seconds(emu.pid)
                child.popen.stdin.write(b"\n")
                child.popen.stdin.flush()
                out = json.loads(child.popen.stdout.readline())
                if kind == "mqtt":
                    # Written; done once the emulator counted every publish.
                    t0 = time.monotonic()
                    while _stats(http_port).get("publish:batch_ds", 0) - before < args.updates:
                        if time.monotonic() - t0 > 300:
                            raise BenchError("the emulator did not count every batch_ds")
                        time.sleep(0.05)
                emu_cpu = cpu_seconds(emu.pid) - emu0
                if kind == "mqtt":  # the sessions may close now
                    child.popen.stdin.write(b"\n")
                    child.popen.stdin.flush()
                child.popen.wait(60)
                n = args.updates * args.values
                msgs = "1 request + 1 answer" if kind == "https" else "1 PUBLISH (QoS 0)"
                rows.append([kind, n, out["bad"], f"{out['cpu'] / n * 1e6:.1f}",
                             f"{emu_cpu / n * 1e6:.1f}", msgs])
    print(f"{args.devices} devices, {args.updates} updates of {args.values} values; load "
          f"average {os.getloadavg()[0]:.2f}")
    print(table(["wire", "values", "failed", "sender µs/value", "emulator µs/value",
                 "messages/update"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
