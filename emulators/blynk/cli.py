"""``blynk-bridge emulate blynk [-c FILE] [--port P] [--regions fra1=8081,ny3=8082]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from emulators.blynk.settings import SpecError

log = logging.getLogger("emulators.blynk")

#: Young-generation threshold of the garbage collector in an emulator process. Each request
#: leaves a few long-lived objects (history points) among a few dozen short-lived ones; at
#: CPython's default (700) collections took ~8% of the emulator's CPU under
#: ``bench/blynk_emulator.py``, ~5% at this threshold (46,400 -> 48,500 requests per CPU-second).
GC_GEN0_THRESHOLD = 5000


def _regions(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, port = part.partition("=")
        if not sep or not port.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected name=port, got {part!r}")
        out[name.strip()] = int(port)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blynk-bridge emulate blynk",
                                description="A local Blynk cloud (device + platform API).")
    p.add_argument("-c", "--config", help="emulator YAML (default: the built-in demo model)")
    p.add_argument("--host", help="address to bind (default from the file, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port of the default (first) region")
    p.add_argument("--regions", type=_regions, help="region ports, e.g. fra1=8081,ny3=8082")
    p.add_argument("--advertise-host",
                   help="host name other regions' 308 Location headers use when binding 0.0.0.0 "
                        "(e.g. the compose service name; default from the file, else 127.0.0.1)")
    p.add_argument("--access-log", action="store_true", help="log every request (slower)")
    return p


async def _serve(args: argparse.Namespace) -> None:
    from emulators.blynk.server import BlynkEmulator
    from pipeline.lifecycle import collect_young_less_often

    emu = BlynkEmulator.from_file(args.config) if args.config else BlynkEmulator.demo()
    if args.advertise_host:
        emu.settings.advertise_host = args.advertise_host
    ports = {n: r.port for n, r in emu.regions.items()}
    if args.regions:
        ports = args.regions
        for name in ports:
            if name not in emu.regions:
                from emulators.blynk.settings import RegionSpec

                emu.regions[name] = RegionSpec(port=ports[name])
    if args.port is not None:
        first = next(iter(ports))
        ports[first] = args.port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    collect_young_less_often(GC_GEN0_THRESHOLD)  # after the model is built: it gets frozen
    async with emu.serve(ports, host=args.host, access_log=args.access_log) as urls:
        for region, url in urls.items():
            log.info("blynk emulator region %s at %s", region, url)
        for region, (host, port) in emu.mqtt.addresses.items():
            log.info("blynk emulator region %s device MQTT at %s:%d", region, host, port)
        log.info("%d templates, %d devices; admin at %s/_admin/",
                 len(emu.model.templates), len(emu.model.devices), next(iter(urls.values())))
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        import uvloop

        run: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:  # pragma: no cover - platforms without uvloop
        run = asyncio.run
    try:
        run(_serve(args))
    except SpecError as exc:
        print(f"emulator configuration error: {exc}", file=sys.stderr)
        return 2
    return 0
