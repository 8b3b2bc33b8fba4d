"""``blynk-bridge map -c FILE --sample MESSAGE``: what the bridge would do with one saved message.

A dry run in the manner of ``telegraf --test``: no Redis, no Blynk, no network. The message (a
TTS uplink as MQTT or a webhook delivers it, an Events API / Console export, or a Particle
webhook body) goes through the same code as in the pipeline — :mod:`pipeline.tts` or
:mod:`pipeline.particle` for parsing, :func:`pipeline.routing.plan` for its way,
:func:`pipeline.mapping.map_uplink` on the template transform would choose — and
:func:`dry_run` returns a :class:`DryRun` saying:

* ``refused``: ingest refuses it (``reason``, ``field``: a webhook answers 400; over MQTT it is
  dead-lettered with that reason);
* ``skipped``: valid but nothing to write (a downlink outcome, a join, a simulated uplink…);
* ``dead``: dead-lettered whole by transform (``unknown_device``…);
* ``nothing_mapped``: a device would not be created for it: none of its values maps;
* ``write``: the Blynk writes (pin → value), with, when some keys do not fit their datastream,
  the partial dead letter ``type_mismatch`` and its detail.

Unmapped keys are listed in every case that maps. The registry is not read: a device that is not
in the configuration's static table is taken as new (created when the integration provisions,
else ``unknown_device``) — one created earlier would be written the same way. Datastreams a
template pulls from Blynk (``pull: true``) are unknown here; only the declared ones count.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pipeline import routing
from pipeline.config import Config, ParticleProduct, TtsApplication
from pipeline.errors import ConfigError, InvalidInput, Reason
from pipeline.events import Uplink
from pipeline.mapping import describe_rejected, map_uplink, maps_a_value
from pipeline.particle import body_style, parse_webhook
from pipeline.registry import Device, device_key
from pipeline.tts import Skipped, parse_event
from workers.transform import Templates

Source = Literal["tts", "particle"]
Outcome = Literal["refused", "skipped", "dead", "nothing_mapped", "write"]


@dataclass
class DryRun:
    """What the bridge would do with one message (see the module docstring)."""

    source: str
    integration: str
    outcome: Outcome
    #: Machine-readable code of a refusal, skip or dead letter (the one the bridge would use).
    reason: str | None = None
    detail: str | None = None
    #: For a refusal: the offending field (``$``: the whole body).
    field: str | None = None
    device: str | None = None
    #: How the device is known: ``static table``, ``created on first uplink``, ``token in the
    #: message`` (the Particle blueprint), or ``unknown``.
    device_from: str | None = None
    template: str | None = None
    #: Pin → value, as egress would send them in one ``batch/update``.
    writes: dict[str, Any] = dataclasses.field(default_factory=dict)
    unmapped: list[str] = dataclasses.field(default_factory=list)
    #: The partial dead letter (``type_mismatch``) of keys that do not fit their datastream.
    rejected: list[dict[str, str]] = dataclasses.field(default_factory=list)
    uplink: Uplink | None = None

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` document (one object, :mod:`blynk_bridge.output`)."""
        out: dict[str, Any] = {
            "source": self.source, "integration": self.integration, "outcome": self.outcome,
            "reason": self.reason, "detail": self.detail, "field": self.field,
            "device": self.device, "device_from": self.device_from, "template": self.template,
            "writes": self.writes, "unmapped": self.unmapped, "rejected": self.rejected,
        }
        if self.uplink is not None:
            u = self.uplink
            out["uplink"] = {"event_id": u.event_id, "kind": u.kind, "values": u.values,
                             "event_ts_ms": u.event_ts_ms}
        return out


def detect_source(body: bytes) -> Source:
    """TTS when the body is a JSON object naming ``end_device_ids`` (also inside an export's
    ``data``), else Particle."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        # Broken JSON still says where it came from: refused by the right parser.
        return "tts" if b'"end_device_ids"' in body else "particle"
    if isinstance(doc, dict) and (
        "end_device_ids" in doc
        or (isinstance(doc.get("data"), dict) and "end_device_ids" in doc["data"])
    ):
        return "tts"
    return "particle"


def choose_integration(cfg: Config, source: Source,
                       name: str | None) -> TtsApplication | ParticleProduct:
    """The configured integration of ``source`` named ``name``, or the only one there is."""
    apps: list[TtsApplication] | list[ParticleProduct] = (
        cfg.tts if source == "tts" else cfg.particle)
    names = [a.name for a in apps]
    if name is not None:
        for a in apps:
            if a.name == name:
                return a
        raise ConfigError(f"no {source} integration named {name!r} (configured: "
                          f"{', '.join(names) or 'none'})")
    if len(apps) == 1:
        return apps[0]
    raise ConfigError(f"the sample looks like a {source} message and "
                      + (f"{len(apps)} {source} integrations are configured: give "
                         f"--integration ({', '.join(names)})" if apps
                         else f"no {source} integration is configured"))


def particle_content_type(body: bytes) -> str:
    """What Particle would have sent: JSON for a JSON object, else its default form body."""
    stripped = body.lstrip()
    if stripped.startswith((b"{", b"[")):
        return "application/json"
    return "application/x-www-form-urlencoded"


def dry_run(cfg: Config, body: bytes, *, source: Source | None = None,
            integration: str | None = None, content_type: str | None = None,
            query: str | None = None, received_ts_ms: int) -> DryRun:
    """Parse, route and map one message as the pipeline would (module docstring).

    Raises :class:`~pipeline.errors.ConfigError` when the integration cannot be chosen.
    """
    source = source or detect_source(body)
    app = choose_integration(cfg, source, integration)
    try:
        if isinstance(app, TtsApplication):
            parsed: Uplink | Skipped = parse_event(body, app, received_ts_ms=received_ts_ms)
        else:
            ctype = content_type or particle_content_type(body)
            if body_style(ctype) is None:
                raise InvalidInput(f"{ctype!r} is not a type Particle sends",
                                   reason=Reason.UNSUPPORTED_MEDIA_TYPE, field="Content-Type")
            parsed = parse_webhook(body, ctype, app, received_ts_ms=received_ts_ms,
                                   query=dict(parse_qsl(urlsplit(f"?{query}").query))
                                   if query else None)
    except InvalidInput as exc:
        return DryRun(source, app.name, "refused", exc.reason, exc.detail, exc.field)
    except UnicodeDecodeError:
        return DryRun(source, app.name, "refused", "invalid_encoding", "body is not UTF-8", "$")
    if isinstance(parsed, Skipped):
        return DryRun(source, app.name, "skipped", parsed.reason, device=parsed.device)
    return _route(cfg, parsed)


def _route(cfg: Config, uplink: Uplink) -> DryRun:
    """The transform stage's decision and mapping for one parsed uplink."""
    integrations = routing.integrations_of(cfg)
    static = {device_key(d.source, d.integration, d.device):
              Device(key=device_key(d.source, d.integration, d.device), token=d.token.reveal(),
                     template=d.template, server=d.server)
              for d in cfg.devices}
    (route,) = routing.plan([uplink], static, integrations)
    run = DryRun(uplink.source, uplink.integration, "write", device=uplink.device,
                 uplink=uplink)
    if route.kind == routing.SKIP:
        run.outcome, run.reason = "skipped", route.reason
        return run
    if route.kind == routing.DEAD:
        run.outcome, run.reason, run.detail = "dead", route.reason, route.detail
        run.device_from = "unknown"
        return run
    integ = route.integration
    assert integ is not None
    templates = Templates(cfg)
    if route.kind == routing.CREATE:
        run.device_from = "created on first uplink"
        name = integ.choose_template(uplink.device_meta)
        if name is None or name not in templates.by_name:
            run.outcome, run.reason = "dead", "provision_failed"
            run.detail = (f"integration {integ.name!r} names no template to create the device "
                          f"from" if name is None else f"template {name!r} is not configured")
            return run
        template = templates.by_name[name]
        if not maps_a_value(template, uplink):
            run.outcome, run.reason, run.template = "nothing_mapped", "nothing_mapped", name
            run.unmapped = map_uplink(template, uplink).unmapped
            return run
    else:
        run.device_from = "token in the message" if uplink.token else "static table"
        template = templates.of_route(route)
    mapped = map_uplink(template, uplink)
    run.template = template.name
    run.writes = dict(mapped.pins)
    run.unmapped = list(mapped.unmapped)
    if mapped.rejected:
        run.reason, run.detail = "type_mismatch", describe_rejected(mapped.rejected)
        run.rejected = [{"key": r.key, "pin": r.pin, "detail": r.detail}
                        for r in mapped.rejected]
    if not mapped.pins:
        run.outcome = "nothing_mapped"
        run.reason = run.reason or "nothing_mapped"
    return run


def explain(run: DryRun) -> str:
    """The human form of a dry run (a few lines)."""
    head = f"{run.source} integration {run.integration!r}"
    if run.outcome == "refused":
        where = f" at {run.field}" if run.field else ""
        if run.source == "particle":
            how = "the webhook is answered 400 (Particle's integration log shows it)"
        elif run.reason == "no_decoded_payload":
            how = "dead-lettered with this reason, over MQTT and as a webhook (answered 202)"
        else:
            how = "over MQTT dead-lettered with this reason; as a webhook answered 400"
        return f"{head}: REFUSED by ingest: {run.reason}{where}: {run.detail}\n  ({how})"
    lines = [f"{head}, device {run.device or '-'}"
             + (f" ({run.device_from})" if run.device_from else "")
             + (f", template {run.template!r}" if run.template else "")]
    if run.outcome == "skipped":
        lines.append(f"  SKIPPED: {run.reason} (valid, nothing to write; acked and counted)")
    elif run.outcome == "dead":
        lines.append(f"  DEAD LETTER {run.reason}: {run.detail}")
    else:
        if run.writes:
            lines.append("  Blynk writes (one batch/update):")
            lines += [f"    {pin:<5} = {json.dumps(v)}" for pin, v in run.writes.items()]
        else:
            lines.append("  no Blynk write: no value maps onto a datastream (acked and counted "
                         "as nothing_mapped)")
        if run.rejected:
            lines.append(f"  DEAD LETTER type_mismatch (the other keys are still written): "
                         f"{run.detail}")
    if run.unmapped:
        lines.append(f"  unmapped keys (no datastream): {', '.join(run.unmapped)}")
    elif run.outcome in ("write", "nothing_mapped"):
        lines.append("  unmapped keys: none")
    return "\n".join(lines)
