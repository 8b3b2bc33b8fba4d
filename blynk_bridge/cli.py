"""``blynk-bridge`` command line: run stages, inspect streams, run emulators.

Stages are modules of ``workers`` with a ``build(ctx) -> Stage`` function; ``run`` runs all of
them in one process, ``blynk-bridge <stage>`` runs one. Same code either way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blynk_bridge.output import EXIT_PIPE, stdout_closed
from pipeline import config as config_mod
from pipeline.errors import ConfigError, ConfigProblem
from pipeline.logs import setup_logging

#: Stage name → module under ``workers`` exposing ``build(ctx) -> Stage``.
STAGES: dict[str, str] = {
    "ingest-http": "workers.ingest_http",
    "ingest-mqtt": "workers.ingest_mqtt",
    "transform": "workers.transform",
    "egress": "workers.egress",
    "downlink": "workers.downlink",
    "blynk-sessions": "workers.blynk_sessions",
    "monitor": "workers.monitor",
}

#: Emulator name → module under ``emulators`` exposing ``main(argv) -> int``.
EMULATORS: dict[str, str] = {
    "blynk": "emulators.blynk",
    "tts": "emulators.tts",
    "particle": "emulators.particle",
}

DEFAULT_CONFIG = "bridge.yaml"

#: What ``--help`` says first (the module docstring is for developers).
DESCRIPTION = (
    "Device clouds (Particle, The Things Stack) to Blynk through Redis Streams. Run every stage "
    "in one process (run) or one each (ingest-http, transform, ...), watch and operate them "
    "(lag, top, status, tail, dead, devices), check a configuration (check-config, config, map), "
    "or try it all locally on emulated clouds (demo, emulate).")


def _load_config(path: str) -> config_mod.Config:
    return config_mod.load(path)


async def _run_stages(names: Sequence[str], cfg: config_mod.Config, grace_s: float) -> None:
    from pipeline.context import Context
    from pipeline.lifecycle import run_stages

    ctx = Context.create(cfg)
    try:
        stages = [importlib.import_module(STAGES[n]).build(ctx) for n in names]
        # Every process adds its counters to the status page's short history (pipeline.stats).
        from pipeline.stats import StatsPublisher

        stages.append(StatsPublisher(ctx.redis, ctx.keys, f"{'+'.join(names)}@{ctx.consumer}"))
        server = None
        if cfg.metrics.port is not None:
            from pipeline.metrics_http import MetricsServer
            from pipeline.status import StatusBoard

            server = MetricsServer(ctx.redis, StatusBoard(ctx.redis, ctx.keys), stages)
            await server.start(cfg.metrics.host, cfg.metrics.port)
        try:
            await run_stages(stages, grace_s=grace_s)
        finally:
            if server is not None:
                await server.close()
    finally:
        await ctx.close()


def _asyncio_run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    names = [n for n in STAGES if n not in (args.skip or [])]
    _asyncio_run(_run_stages(names, cfg, args.grace))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    _asyncio_run(_run_stages([args.command], cfg, args.grace))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.config is not None and args.config_file is not None:
        print("check-config: give the file once (positional or -c)", file=sys.stderr)
        return 2
    args.config = args.config or args.config_file or DEFAULT_CONFIG
    if not args.json:
        print(explain(_load_config(args.config), args.config))
        return 0
    # One JSON document either way: {"ok", "file", "errors": [{message, key, line, column}]}.
    try:
        _load_config(args.config)
        errors: list[dict[str, Any]] = []
    except ConfigError as exc:
        errors = [dataclasses.asdict(p) for p in exc.problems or (ConfigProblem(str(exc)),)]
    print(json.dumps({"ok": not errors, "file": args.config, "errors": errors}, indent=2))
    return 2 if errors else 0


def cmd_config(args: argparse.Namespace) -> int:
    from pipeline import config_schema

    if args.what == "schema":
        print(json.dumps(config_schema.json_schema(), indent=2))
    else:
        sys.stdout.write(config_schema.default_yaml())
    return 0


def explain(cfg: config_mod.Config, origin: str) -> str:
    """A short human summary of a valid configuration (no secrets)."""
    from pipeline.redact import safe_url

    lines = [f"{origin}: OK"]
    lines.append(f"  redis      {safe_url(cfg.redis.url)} prefix={cfg.redis.prefix!r} "
                 f"partitions={cfg.redis.partitions}")
    servers = ", ".join(f"{k}={safe_url(v)}" for k, v in cfg.blynk.servers.items())
    platform = cfg.blynk.platform
    lines.append(f"  blynk      {servers} (default {cfg.blynk.default_server})"
                 f"{'; platform API ' + safe_url(platform.url) if platform else ''}")
    for t in cfg.templates:
        pins = ", ".join(f"{d.name}={d.pin.upper()}:{d.type}" for d in t.datastreams)
        lines.append(f"  template   {t.name}{' (' + t.id + ')' if t.id else ''}: {pins or '-'}")
    for a in cfg.tts:
        lines.append(
            f"  tts        {a.name}: {a.username} @ {a.host}:{a.effective_port} "
            f"{'insecure' if a.insecure else 'TLS'}; template={a.template} "
            f"provision={'on' if a.provision else 'off'}; api key "
            f"{'set' if a.api_key else 'MISSING'}"
        )
    for p in cfg.particle:
        lines.append(
            f"  particle   {p.name}: POST /particle/{p.name}; template={p.template} "
            f"provision={'on' if p.provision else 'off'}; auth "
            f"{_auth_kind(p.auth)}"
        )
    for w in cfg.blynk_webhooks:
        lines.append(f"  downlinks  Blynk webhook {w.name}: POST /blynk/{w.name}; auth "
                     f"{_auth_kind(w.auth)}")
    sessions = [t.name for t in cfg.templates if t.downlinks == "mqtt"]
    if sessions:
        lines.append("  downlinks  Blynk device sessions (blynk-sessions) for templates "
                     + ", ".join(sessions))
    lines.append(f"  devices    {len(cfg.devices)} in the static table")
    return "\n".join(lines)


def _auth_kind(auth: config_mod.HttpAuth | str | None) -> str:
    if isinstance(auth, config_mod.HttpAuth):
        return "basic" if auth.username else "header"
    return "NONE (anyone may post)"


def cmd_map(args: argparse.Namespace) -> int:
    """``map``: exit 0 when the message would be written (or skipped as valid), 1 when it would
    be refused, dead-lettered (also in part) or map nothing."""
    from blynk_bridge import dryrun
    from blynk_bridge.output import print_json
    from pipeline.streams import now_ms

    cfg = _load_config(args.config)
    try:
        body = (sys.stdin.buffer.read() if args.sample == "-"
                else Path(args.sample).read_bytes())
    except OSError as exc:
        print(f"map: cannot read the sample: {exc}", file=sys.stderr)
        return 2
    run = dryrun.dry_run(cfg, body, source=args.source, integration=args.integration,
                         content_type=args.content_type, query=args.query,
                         received_ts_ms=now_ms())
    if args.json:
        print_json(run.as_json())
    else:
        print(dryrun.explain(run))
    return 0 if run.outcome in ("write", "skipped") and not run.rejected else 1


def cmd_emulate(args: argparse.Namespace) -> int:
    module = importlib.import_module(EMULATORS[args.emulator])
    main: Callable[[list[str]], int] = module.main
    return main(list(args.rest))


def _ops(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from blynk_bridge import ops

        fn: Callable[[argparse.Namespace], int] = getattr(ops, name)
        return fn(args)

    return run


def _module_cmd(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command implemented in ``blynk_bridge.<module>``, imported only when run."""

    def run(args: argparse.Namespace) -> int:
        fn: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(f"blynk_bridge.{module}"), name)
        return fn(args)

    return run


def version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    try:
        return importlib.metadata.version("blynk-bridge")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
        return "unknown (not installed: pip install .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blynk-bridge", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["json", "text"], default=None,
                        help="json for machines, text for people (default: text on a terminal)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="bridge YAML/TOML file")
        return p

    p = with_config(sub.add_parser("run", help="run every stage in one process"))
    p.add_argument("--skip", action="append", choices=list(STAGES), help="leave a stage out")
    p.add_argument("--grace", type=float, default=20.0, help="seconds to drain on SIGTERM")
    p.set_defaults(func=cmd_run)
    for name in STAGES:
        p = with_config(sub.add_parser(name, help=f"run the {name} stage alone"))
        p.add_argument("--grace", type=float, default=20.0)
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("check-config", help="validate a configuration file and explain it")
    # The file as the other commands take it (-c), or positional as it always was.
    p.add_argument("config_file", nargs="?", default=None, metavar="config")
    p.add_argument("-c", "--config", default=None, help="bridge YAML/TOML file")
    p.add_argument("--json", action="store_true",
                   help="one JSON document: ok, and each error with its key, line and column")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("config", help="print the configuration's JSON Schema (editor "
                       "completion) or a commented file of every default")
    p.add_argument("what", choices=["schema", "default"])
    p.set_defaults(func=cmd_config)

    def live(p: argparse.ArgumentParser) -> None:
        p.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
        p.add_argument("--count", type=int, help="stop after this many samples")

    p = with_config(sub.add_parser("lag", help="length, lag and pending of every stream/group, "
                                   "with its partition and Redis node, and per node"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--nodes", action="store_true",
                   help="with --json: the sums per Redis node and group instead of the streams")
    p.add_argument("--watch", action="store_true",
                   help="refresh until Ctrl-C, with append and read rates")
    live(p)
    p.set_defaults(func=_lag)
    p = with_config(sub.add_parser(
        "top", help="live per-stage rates, lag and pending, and integration statuses"))
    p.add_argument("--json", action="store_true", help="one JSON object per sample and line")
    live(p)
    p.set_defaults(func=_module_cmd("watch", "cmd_top"))
    p = with_config(sub.add_parser(
        "status", help="integration statuses, unmapped keys per template, superseded values"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_ops("cmd_status"))
    dead = sub.add_parser("dead", help="inspect, replay or purge dead letters")
    # One subparser per action, so ids may follow options: `dead show -c FILE 1700…-0`.
    dead_sub = dead.add_subparsers(dest="action", required=True)
    for action, help_ in (("list", "newest first"), ("show", "one or more, decoded"),
                          ("replay", "back onto their origin stream"), ("purge", "delete")):
        p = with_config(dead_sub.add_parser(action, help=help_))
        p.add_argument("ids", nargs="*", help="dead-letter entry ids (default: all, for list)")
        p.add_argument("--reason", help="only dead letters with this reason")
        p.add_argument("--limit", type=int, default=50)
        p.add_argument("--all", action="store_true", help="replay/purge: every dead letter")
        p.add_argument("--json", action="store_true", help="one JSON document (show: always)")
        p.set_defaults(func=_ops("cmd_dead"))

    devices = sub.add_parser("devices", help="see broken devices and set them back to ok; "
                             "reindex the registry for downlinks")
    devices_sub = devices.add_subparsers(dest="action", required=True)
    for action, help_ in (("list", "broken devices (--all: every registry row)"),
                          ("show", "one or more rows, with their last written times"),
                          ("unbreak", "set broken devices back to ok"),
                          ("reindex", "index every registry row by Blynk token and id "
                                      "(for downlinks; rows of older bridge versions)")):
        p = with_config(devices_sub.add_parser(action, help=help_))
        p.add_argument("keys", nargs="*", help="device keys, e.g. particle:prod:e00fce68…")
        p.add_argument("--all", action="store_true",
                       help="list: every row, not only broken ones; unbreak: every broken one")
        p.add_argument("--limit", type=int, default=200)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=_ops("cmd_devices"))

    p = with_config(sub.add_parser(
        "migrate-to-cluster", help="copy a drained one-Redis deployment's registry rows and "
        "last-written times to a Redis Cluster under the cluster layout's key names"))
    p.add_argument("--from", dest="source", required=True, help="the one Redis: redis://…")
    p.add_argument("--to", dest="target", required=True,
                   help="the cluster: redis+cluster://host:port,…")
    p.add_argument("--from-partitions", type=int, default=None,
                   help="redis.partitions on the one Redis (default: the configuration's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_module_cmd("migrate", "cmd_migrate"))

    p = with_config(sub.add_parser(
        "tail", help="print stream entries as they arrive (takes no work from the stages)"))
    p.add_argument("stream", choices=["uplinks", "writes", "downlinks", "dead"])
    p.add_argument("--device", help="only entries of this source device (or Blynk name)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_module_cmd("tail", "cmd_tail"))

    p = with_config(sub.add_parser(
        "map", help="dry run: what the bridge would write to Blynk for a saved message "
        "(no Redis or Blynk needed)"))
    p.add_argument("--sample", required=True,
                   help="a saved TTS uplink (MQTT/webhook JSON, Console export) or Particle "
                   "webhook body; - reads stdin")
    p.add_argument("--source", choices=["tts", "particle"],
                   help="default: TTS when the JSON has end_device_ids, else Particle")
    p.add_argument("--integration", help="its name in the configuration (default: the only "
                   "one of that source)")
    p.add_argument("--content-type", help="Particle: the request's type (default: JSON for an "
                   "object, else Particle's form body)")
    p.add_argument("--query", help="Particle: the webhook URL's query (coreid=…&event=…)")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("emulate", help="run an emulator: blynk, tts or particle")
    p.add_argument("emulator", choices=list(EMULATORS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the emulator's own options")
    p.set_defaults(func=cmd_emulate)

    p = sub.add_parser("demo", help="the whole pipeline with emulated clouds and a fleet")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    return parser


def _lag(args: argparse.Namespace) -> int:
    if args.watch:
        return _module_cmd("watch", "cmd_lag_watch")(args)
    return _ops("cmd_lag")(args)


def _demo(args: argparse.Namespace) -> int:
    from blynk_bridge import demo

    return demo.main(list(args.rest))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo and the emulators parse their own options (argparse's REMAINDER would take only
    # what follows the first positional): hand them everything after their name.
    own = next((i for i, a in enumerate(argv) if a in ("demo", "emulate")), None)
    if own is not None and not any(a in STAGES or a == "run" for a in argv[:own]):
        head = argv[: own + (2 if argv[own] == "emulate" else 1)]
        args = parser.parse_args(head)
        args.rest = argv[len(head):]
    else:
        args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        rc: int = args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `blynk-bridge dead list | head`: the reader has what it wanted.
        stdout_closed()
        return EXIT_PIPE
    logging.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
