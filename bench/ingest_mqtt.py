"""MQTT ingest throughput on one core, as a ratio to a bare aiomqtt loop that only counts.

    .venv/bin/python -m bench.ingest_mqtt [--messages 100000] [--rounds 3]

Both receivers run in turn, in the same run, as child processes pinned to CPU 0 (uvloop, as the
CLI runs), subscribed to a private Mosquitto (``max_queued_messages 0``, ``set_tcp_nodelay
true``: it queues for a slow reader instead of dropping). Once a receiver is subscribed, a raw
socket publisher (Nagle off) on the other core blasts N realistic TTS uplinks (~1.9 KB each, from
the TTS emulator) faster than either receiver reads, so each is measured at its own ceiling:

* **bare**: ``async for message in client.messages: count += 1`` — what a user's own script
  costs at the least;
* **ingest-mqtt**: the real stage (``workers.ingest_mqtt``): parse, encode, batched appends to
  the real Redis; done when all N entries are in the stream.

Rate = N / (last message done − first message received), and N / CPU seconds of the receiver
process (robust when other work shares the machine). The best round of each is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.common import pin_cpu

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"


# --- the raw publisher ---------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def publish_raw(port: int, packets: list[bytes], total: int) -> float:
    """Send ``total`` QoS 0 PUBLISH packets (cycling ``packets``) as fast as TCP takes them;
    returns the seconds it took."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connect = _str("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _str(
        f"bench-pub-{uuid.uuid4().hex[:6]}")
    sock.sendall(_packet(0x10, connect))
    if sock.recv(4)[:2] != b"\x20\x02":
        raise RuntimeError("publisher: no CONNACK")
    chunk = b"".join(packets)
    start = time.perf_counter()
    sent = 0
    while sent + len(packets) <= total:
        sock.sendall(chunk)
        sent += len(packets)
    if sent < total:
        sock.sendall(b"".join(packets[: total - sent]))
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    elapsed = time.perf_counter() - start
    sock.close()
    return elapsed


def uplink_packets(user: str, count: int = 500) -> list[bytes]:
    from emulators.tts import default_decoded, make_uplink

    out = []
    for i in range(count):
        device = f"dev{i % 50:04d}"
        msg = make_uplink(user.split("@")[0], user.split("@")[1], device, i // 50,
                          default_decoded(i % 50, i // 50), gateways=1 + i % 3,
                          packet_broker=i % 5 == 0)
        body = _str(f"v3/{user}/devices/{device}/up") + json.dumps(msg).encode()
        out.append(_packet(0x30, body))
    return out


# --- receivers (child processes) -----------------------------------------------------------------


async def _bare(port: int, user: str, total: int) -> dict[str, float]:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bare-{os.getpid()}") as client:
        await client.subscribe(f"v3/{user}/devices/+/up")
        print("ready", flush=True)
        cpu0 = time.process_time()
        count = 0
        first = 0.0
        async for _ in client.messages:
            if count == 0:
                first = time.perf_counter()
            count += 1
            if count == total:
                break
        return {"seconds": time.perf_counter() - first, "cpu": time.process_time() - cpu0}


async def _stage(port: int, user: str, total: int) -> dict[str, float]:
    from pipeline.config import Config, RedisConfig, TtsApplication
    from pipeline.context import Context
    from pipeline.events import decode_uplink
    from pipeline.keys import Keys
    from pipeline.streams import StreamWriter, connect
    from workers.ingest_mqtt import IngestMqtt

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    app_id, tenant = user.split("@")
    app = TtsApplication(name="bench", app_id=app_id, tenant=tenant, host="127.0.0.1",
                         port=port, insecure=True)
    cfg = Config(redis=RedisConfig(url=REDIS_URL, prefix=prefix), tts=[app])
    redis = connect(REDIS_URL)
    keys = Keys(prefix)
    ctx = Context(config=cfg, redis=redis, keys=keys, consumer="bench", writer=StreamWriter(redis))
    done = asyncio.Event()
    appended = 0

    def on_appended(n: int) -> None:
        nonlocal appended
        appended += n
        if appended >= total:
            done.set()

    stage = IngestMqtt(ctx, on_appended=on_appended)
    stop = asyncio.Event()
    task = asyncio.create_task(stage.main_loop(stop))
    await stage.subscribed["bench"].wait()
    stream = keys.stream("uplinks")
    print("ready", flush=True)
    cpu0 = time.process_time()
    await done.wait()
    cpu = time.process_time() - cpu0
    # From the first message's receipt (its received_ts_ms) to the last entry in Redis.
    first_entry = await redis.xrange(stream, count=1)
    assert first_entry and first_entry[0][1] is not None
    first = first_entry[0][1][b"d"]
    assert isinstance(first, bytes)
    seconds = time.time() - decode_uplink(first).received_ts_ms / 1000
    stop.set()
    await task
    await redis.delete(stream, keys.status(), keys.lease("tts", "bench"))
    await redis.aclose()
    return {"seconds": seconds, "cpu": cpu}


def child(role: str, port: int, user: str, total: int) -> None:
    pin_cpu(0)
    import uvloop

    fn = _bare if role == "bare" else _stage
    result = uvloop.run(fn(port, user, total))
    print(json.dumps(result), flush=True)


# --- the run -------------------------------------------------------------------------------------


def run_round(role: str, port: int, total: int) -> tuple[float, float]:
    """One receiver, one burst: (messages per wall second, messages per CPU second)."""
    user = f"bench{uuid.uuid4().hex[:6]}@ttn"
    packets = uplink_packets(user)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ingest_mqtt", "--child", role, "--port", str(port),
         "--user", user, "--messages", str(total)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{role} receiver did not start")
        publish_raw(port, packets, total)
        line = proc.stdout.readline()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not line:
        raise RuntimeError(f"{role} receiver gave no result (rc {proc.returncode})")
    result = json.loads(line)
    return total / float(result["seconds"]), total / float(result["cpu"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=["bare", "stage"])
    p.add_argument("--port", type=int)
    p.add_argument("--user")
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.port, args.user, args.messages)
        return 0

    from bench.common import machine, table
    from emulators.tts import Mosquitto

    pin_cpu(1)
    wall: dict[str, list[float]] = {"bare": [], "stage": []}
    cpu: dict[str, list[float]] = {"bare": [], "stage": []}
    with Mosquitto(bench=True) as broker:
        for _ in range(args.rounds):
            for role in ("bare", "stage"):
                w, c = run_round(role, broker.port, args.messages)
                wall[role].append(w)
                cpu[role].append(c)
                print(f"  {role:5s} {w:>10,.0f} msg/s wall  {c:>10,.0f} msg/cpu-s", flush=True)
    bw, sw = max(wall["bare"]), max(wall["stage"])
    bc, sc = max(cpu["bare"]), max(cpu["stage"])
    print()
    print(f"MQTT ingest, {args.messages:,} TTS uplinks (~1.9 KB) per round, best of "
          f"{args.rounds}; receiver pinned to one core")
    print(machine())
    print(table(["receiver", "msg/s", "ratio", "msg/CPU-s", "ratio"], [
        ["bare aiomqtt loop (counts only)", f"{bw:,.0f}", "1.00", f"{bc:,.0f}", "1.00"],
        ["ingest-mqtt (parse + XADD)", f"{sw:,.0f}", f"{sw / bw:.2f}", f"{sc:,.0f}",
         f"{sc / bc:.2f}"],
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
