"""Where each uplink of a batch goes: the transform stage's decision, pure (no I/O, no clock).

Given decoded uplinks and the registry rows they name, :func:`plan` returns one :class:`Route`
per uplink, in order:

* ``SKIP`` — nothing to write (a ``join``/``status`` event, or no values and no radio): acked
  and counted under ``reason`` (``join`` | ``status`` | ``empty``);
* ``DEAD`` — dead-lettered whole with ``reason``/``detail``: ``unknown_integration``,
  ``unknown_device`` (integration does not provision), ``device_broken``;
* ``CREATE`` — no registry row and the integration provisions devices: the stage creates it;
* ``WRITE`` — mapped onto ``device``: a registry row, or for the Particle blueprint (the uplink
  carries its device's token) a row made up from the uplink itself. The row may still say
  ``meta_pending`` (provisioned, metafield not set): that is the stage's business.

:func:`lookups` names the registry rows :func:`plan` reads, so the caller fetches exactly those
(the registry does not cache absence: a needless lookup costs a round trip). Both apply the
same two rules first (:func:`skip_reason`, the integration's configuration); a table test holds
them to reading the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pipeline.config import Config, TemplateRule
from pipeline.errors import Reason
from pipeline.events import Uplink
from pipeline.registry import STATUS_BROKEN, Device, token_device_key

SKIP: Final = "skip"
DEAD: Final = "dead"
CREATE: Final = "create"
WRITE: Final = "write"

_SKIP_KINDS = frozenset({"join", "status"})


@dataclass(frozen=True, slots=True)
class Integration:
    """What routing and mapping need of one configured integration."""

    source: str
    name: str
    template: str | None
    rules: tuple[TemplateRule, ...] = ()
    provision: bool = False

    def choose_template(self, meta: Mapping[str, str]) -> str | None:
        """First rule whose ``device_meta`` field equals its value, else the default."""
        for rule in self.rules:
            if meta.get(rule.field) == rule.equals:
                return rule.template
        return self.template


Integrations = Mapping[tuple[str, str], Integration]


def integrations_of(config: Config) -> dict[tuple[str, str], Integration]:
    """Every configured TTS application and Particle product, by ``(source, name)``."""
    out: dict[tuple[str, str], Integration] = {}
    for source, apps in (("tts", config.tts), ("particle", config.particle)):
        for a in apps:
            out[(source, a.name)] = Integration(source, a.name, a.template,
                                                tuple(a.template_rules), a.provision)
    return out


@dataclass(slots=True)
class Route:
    """One uplink's way (module docstring). ``key`` is its registry device key;
    ``integration`` is set unless the route is a ``SKIP`` or ``unknown_integration``;
    ``device`` is set for ``WRITE``; ``reason`` for ``SKIP`` and ``DEAD``, ``detail`` for
    ``DEAD``."""

    kind: str
    uplink: Uplink
    key: str = ""
    integration: Integration | None = None
    device: Device | None = None
    reason: Reason | None = None
    detail: str = ""

    def why(self) -> Reason:
        """The reason of a ``SKIP`` or ``DEAD`` route."""
        assert self.reason is not None, f"a {self.kind} route has no reason"
        return self.reason


def skip_reason(u: Uplink) -> Reason | None:
    """Why an uplink carries nothing to write, or ``None`` when it may."""
    if u.kind in _SKIP_KINDS:
        return Reason(u.kind)
    if not u.values and u.radio is None:
        return Reason.EMPTY
    return None


def lookups(uplinks: Sequence[Uplink], integrations: Integrations) -> list[str]:
    """The registry rows :func:`plan` will read for these uplinks."""
    return [f"{u.source}:{u.integration}:{u.device}" for u in uplinks
            if u.token is None and skip_reason(u) is None
            and (u.source, u.integration) in integrations]


def plan(uplinks: Sequence[Uplink], devices: Mapping[str, Device | None],
         integrations: Integrations) -> list[Route]:
    """One :class:`Route` per uplink, in order; ``devices`` holds (at least) the rows named by
    :func:`lookups` — a missing one counts as no row."""
    out: list[Route] = []
    append = out.append
    get_integration = integrations.get
    get_device = devices.get
    for u in uplinks:
        skip = skip_reason(u)
        if skip is not None:
            append(Route(SKIP, u, "", None, None, skip))
            continue
        key = f"{u.source}:{u.integration}:{u.device}"
        integ = get_integration((u.source, u.integration))
        if integ is None:
            append(Route(DEAD, u, key, None, None, Reason.UNKNOWN_INTEGRATION,
                         f"{u.source} integration {u.integration!r} is not configured"))
        elif u.token is not None:
            tname = integ.choose_template(u.device_meta)
            append(Route(WRITE, u, key, integ,
                         Device(key=token_device_key(key, u.token), token=u.token,
                                template=tname or "")))
        else:
            dev = get_device(key)
            if dev is None:
                if integ.provision:
                    append(Route(CREATE, u, key, integ))
                else:
                    append(Route(DEAD, u, key, integ, None, Reason.UNKNOWN_DEVICE, (
                        f"no Blynk device registered for {u.source} device {u.device!r} of "
                        f"integration {u.integration!r} (add it to `devices` or enable "
                        "`provision`)")))
            elif dev.status == STATUS_BROKEN:
                append(Route(DEAD, u, key, integ, None, Reason.DEVICE_BROKEN, (
                    f"Blynk device of {key} is marked broken: {dev.reason}: {dev.detail}")))
            else:
                append(Route(WRITE, u, key, integ, dev))
    return out
