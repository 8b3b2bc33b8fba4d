"""HTTP ingest throughput on one core, as a ratio to a bare aiohttp handler that does nothing.

    .venv/bin/python -m bench.ingest_http [--seconds 5] [--rounds 3] [--connections 128]
                                          [--together]

Both servers run in turn, in the same run, as child processes pinned to CPU 0 (uvloop, access
log off, as the CLI runs them):

* **bare**: ``async def handler(request): return web.Response()`` — the least any aiohttp
  webhook receiver costs;
* **ingest-http**: the real stage (``blynk-bridge ingest-http``): header auth, parse a Particle
  product webhook (default JSON fields plus product fields, ``data`` holding JSON), encode,
  ``XADD`` to the real Redis (group-committed), answer 200 only after Redis has it.

The load generator is a separate process pinned to CPU 1: raw asyncio protocols over
keep-alive connections (Nagle off), each with one request outstanding, replaying ~200-byte
webhook bodies for 1,000 devices. It is cheaper per request than either server, so each server
runs at its own ceiling. After a warm-up second the bench counts responses for ``--seconds``; a
non-200 answer fails the run, and after each ingest round every answered request must be an
entry in the stream. Rounds alternate bare/ingest; the best round of each is reported.

On a shared machine req/s swings with whatever else runs; the server's CPU time per answered
request (warm-up and tail included, lowest of the rounds) is steadier, so the ratio is printed
both ways: by req/s and by CPU per request (what one saturated core would do).

``--together`` runs both servers at the same time instead, each with its own load generator:
each gets about half of CPU 0 (so fewer requests per Redis batch than alone), but both see the
same machine, and each round's ratio by CPU per request is printed. On a loaded machine the
alternating rounds' CPU per request moves ±20% between rounds; the together rounds' ratio
moves a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

from bench.common import (
    BenchError,
    Proc,
    Processes,
    Usage,
    UsageProbe,
    delete_prefix,
    free_port,
    machine,
    pin_cpu,
    table,
    wait_port,
)

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
SECRET = "bench-secret-4f2a"
PRODUCT = "bench"

CONFIG = """\
redis: {{url: "{redis}", prefix: "{prefix}"}}
ingest_http: {{host: 127.0.0.1, port: {port}, backlog_high_water: 1000000000,
              max_connections_per_peer: 0}}  # one load generator: every connection is one peer
particle:
  - {{name: {product}, product_id: "30301", auth: {{header: X-Particle-Secret, secret: {secret}}}}}
"""


#: The two servers, in the order a round runs them.
KINDS = ("bare", "ingest-http")


# --- servers (child processes) -------------------------------------------------------------------


def serve_bare(port: int) -> None:
    pin_cpu(0)
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/particle/{integration}", handler)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_ingest(config: str) -> None:
    pin_cpu(0)
    from blynk_bridge.cli import main

    raise SystemExit(main(["--log-level", "WARNING", "ingest-http", "-c", config]))


# --- the load generator (child process) ----------------------------------------------------------


def requests(port: int, n: int = 1000) -> list[bytes]:
    """Particle product webhooks (default JSON + product fields) for ``n`` devices."""
    out = []
    for i in range(n):
        body = json.dumps({
            "event": "sensor",
            "data": json.dumps({"temp": round(15 + (i * 7 % 150) / 10, 1), "hum": 20 + i % 60,
                                "bat": 3.7}, separators=(",", ":")),
            "published_at": f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
            "coreid": f"e00fce68{i:016x}",
            "userid": "5e6ad98d764c6d00014be177",
            "fw_version": 6,
            "public": False,
        }, separators=(",", ":")).encode()
        head = (f"POST /particle/{PRODUCT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"User-Agent: ParticleBot/1.1 (https://docs.particle.io/webhooks)\r\n"
                f"Accept: application/json\r\nContent-Type: application/json\r\n"
                f"X-Particle-Secret: {SECRET}\r\nContent-Length: {len(body)}\r\n\r\n")
        out.append(head.encode() + body)
    return out


class _Conn(asyncio.Protocol):
    def __init__(self, gen: _Load, offset: int) -> None:
        self.gen = gen
        self.i = offset
        self.buf = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        reqs = self.gen.reqs
        assert self.transport is not None
        self.transport.write(reqs[self.i % len(reqs)])
        self.i += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.gen.done(head[9:12])
            if not self.gen.stopped:
                self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost += 1


class _Load:
    def __init__(self, reqs: list[bytes]) -> None:
        self.reqs = reqs
        self.ok = 0
        self.bad: dict[bytes, int] = {}
        self.lost = 0
        self.stopped = False

    def done(self, status: bytes) -> None:
        if status == b"200":
            self.ok += 1
        else:
            self.bad[status] = self.bad.get(status, 0) + 1


async def _load(port: int, connections: int, warmup_s: float,
                seconds: float) -> dict[str, float | str]:
    gen = _Load(requests(port))
    loop = asyncio.get_running_loop()
    conns = []
    def connection(offset: int) -> Callable[[], _Conn]:
        return lambda: _Conn(gen, offset)

    for c in range(connections):
        transport, _ = await loop.create_connection(connection(c * 17), "127.0.0.1", port)
        conns.append(transport)
    await asyncio.sleep(warmup_s)
    ok0, t0 = gen.ok, time.monotonic()
    await asyncio.sleep(seconds)
    ok1, t1 = gen.ok, time.monotonic()
    gen.stopped = True
    await asyncio.sleep(0.5)  # let the last answers arrive, so every sent request is counted
    for t in conns:
        t.close()
    return {"rps": (ok1 - ok0) / (t1 - t0), "answered": gen.ok, "lost": gen.lost,
            "bad": sum(gen.bad.values()), "bad_statuses": str({k.decode(): v for k, v in
                                                               gen.bad.items()})}


def run_load(port: int, connections: int, warmup_s: float, seconds: float) -> None:
    pin_cpu(1)
    try:
        import uvloop

        result = uvloop.run(_load(port, connections, warmup_s, seconds))
    except ImportError:
        result = asyncio.run(_load(port, connections, warmup_s, seconds))
    print(json.dumps(result), flush=True)


# --- orchestration -------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"]


def _server(procs: Processes, kind: str, prefix: str) -> tuple[Proc, int]:
    port = free_port()
    if kind == "bare":
        server = procs.spawn("bare", _python(f"from bench.ingest_http import serve_bare; "
                                             f"serve_bare({port})"))
    else:
        config = procs.dir / f"bridge-{port}.yaml"
        config.write_text(CONFIG.format(redis=REDIS_URL, prefix=prefix, port=port,
                                        product=PRODUCT, secret=SECRET))
        server = procs.spawn("ingest-http", _python(f"from bench.ingest_http import "
                                                    f"serve_ingest; serve_ingest({str(config)!r})"))
    wait_port(port, proc=server)
    return server, port


def _loader(procs: Processes, port: int, args: argparse.Namespace) -> Proc:
    return procs.spawn("load", _python(
        f"from bench.ingest_http import run_load; run_load({port}, {args.connections}, "
        f"{args.warmup}, {args.seconds})"), pipes=True)


def _result(kind: str, server: Proc, loader: Proc, out: str, usage: Usage) -> dict[str, float]:
    if not out.strip():
        raise BenchError(f"load generator printed nothing; log: {loader.log_path}\n"
                         f"{loader.tail()}")
    result: dict[str, float] = json.loads(out)
    if result["bad"]:
        raise BenchError(f"{kind}: non-200 answers {result['bad_statuses']}; server log:\n"
                         f"{server.tail()}")
    result["cpu_pct"] = usage.cpu_pct
    result["cpu_us"] = 1e6 * usage.cpu_s / max(1.0, result["answered"])
    result["rss_mib"] = usage.peak_rss / 1048576
    return result


def one_round(procs: Processes, kind: str, args: argparse.Namespace,
              prefix: str) -> dict[str, float]:
    server, port = _server(procs, kind, prefix)
    probe = UsageProbe({"server": server.pid})
    loader = _loader(procs, port, args)
    probe.start()
    assert loader.popen.stdout is not None
    out = loader.popen.stdout.read().decode()
    usage = probe.stop()[0]
    loader.popen.wait()
    procs.stop(loader)
    procs.stop(server)
    return _result(kind, server, loader, out, usage)


def together_round(procs: Processes, args: argparse.Namespace,
                   prefix: str) -> dict[str, dict[str, float]]:
    """Both servers at the same time (both on CPU 0, each with its own load generator on CPU
    1): each gets about half of the core, but both see the same machine, where alternating
    rounds each see whatever else ran then."""
    servers = {kind: _server(procs, kind, prefix) for kind in KINDS}
    probe = UsageProbe({kind: server.pid for kind, (server, _) in servers.items()})
    loaders = {kind: _loader(procs, port, args) for kind, (_, port) in servers.items()}
    probe.start()
    outs = {}
    for kind, loader in loaders.items():
        assert loader.popen.stdout is not None
        outs[kind] = loader.popen.stdout.read().decode()
    usages = dict(zip(KINDS, probe.stop(), strict=True))
    results = {}
    for kind, (server, _) in servers.items():
        loaders[kind].popen.wait()
        procs.stop(loaders[kind])
        procs.stop(server)
        results[kind] = _result(kind, server, loaders[kind], outs[kind], usages[kind])
    return results


async def _stream_length(prefix: str) -> int:
    from pipeline.streams import connect

    redis = connect(REDIS_URL)
    try:
        return int(await redis.xlen(f"{prefix}uplinks"))
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--together", action="store_true",
                        help="serve bare and ingest-http at the same time (see together_round)")
    args = parser.parse_args(argv)
    best: dict[str, dict[str, float]] = {}
    cheapest: dict[str, float] = {}
    with Processes() as procs:
        for r in range(args.rounds):
            prefix = f"bbbench:{uuid.uuid4().hex[:8]}:"
            try:
                if args.together:
                    results = together_round(procs, args, prefix)
                else:
                    results = {kind: one_round(procs, kind, args, prefix) for kind in KINDS}
                stored = asyncio.run(_stream_length(prefix))
                if stored != results["ingest-http"]["answered"]:
                    raise BenchError(f"{results['ingest-http']['answered']:.0f} answered 200 "
                                     f"but {stored} entries in the stream")
            finally:
                asyncio.run(delete_prefix(REDIS_URL, prefix))
            for kind, res in results.items():
                print(f"round {r + 1} {kind:12s} {res['rps']:9.0f} req/s  "
                      f"server CPU {res['cpu_pct']:3.0f}%  {res['cpu_us']:5.1f} CPU µs/req",
                      file=sys.stderr)
                if kind not in best or res["rps"] > best[kind]["rps"]:
                    best[kind] = res
                cheapest[kind] = min(cheapest.get(kind, res["cpu_us"]), res["cpu_us"])
            print(f"round {r + 1} ratio by CPU per request "
                  f"{results['bare']['cpu_us'] / results['ingest-http']['cpu_us']:.2f}",
                  file=sys.stderr)
    bare, ingest = best["bare"], best["ingest-http"]
    rows = [(k, f"{v['rps']:.0f}", f"{100 * v['rps'] / bare['rps']:.0f}%",
             f"{v['cpu_pct']:.0f}%", f"{cheapest[k]:.1f}", f"{v['rss_mib']:.0f}")
            for k, v in best.items()]
    together = ", both servers at once" if args.together else ""
    print(f"HTTP ingest, one core (server pinned to CPU 0, load generator on CPU 1){together}, "
          f"{args.connections} keep-alive connections, best of {args.rounds} x "
          f"{args.seconds:g} s")
    print(machine())
    print(table(["receiver", "req/s", "of bare", "server CPU", "CPU µs/req", "peak RSS MiB"],
                rows))
    print(f"ratio ingest-http / bare = {ingest['rps'] / bare['rps']:.2f} by req/s, "
          f"{cheapest['bare'] / cheapest['ingest-http']:.2f} by CPU per request (goal >= 0.70)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
