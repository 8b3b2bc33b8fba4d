"""``pipeline.routing.plan``: where each uplink goes, as a table (pure: no Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import TemplateRule
from pipeline.events import Radio, Uplink
from pipeline.registry import STATUS_BROKEN, Device, token_device_key
from pipeline.routing import CREATE, DEAD, SKIP, WRITE, Integration, Route, lookups, plan

INTEGRATIONS = {
    ("tts", "app"): Integration("tts", "app", "button"),
    ("tts", "auto"): Integration("tts", "auto", "button", provision=True),
    ("particle", "prod"): Integration(
        "particle", "prod", "blueprint",
        (TemplateRule(field="product_id", equals="42", template="other"),)),
}
DEVICES: dict[str, Device | None] = {
    "tts:app:known": Device(key="tts:app:known", token="T1", template="button"),
    "tts:app:broken": Device(key="tts:app:broken", token="T2", template="button",
                             status=STATUS_BROKEN, reason="invalid_token", detail="401"),
    "tts:app:pending": Device(key="tts:app:pending", token="T3", template="button",
                              meta_pending=True),
    "tts:app:gone": None,
}


def up(**kw: Any) -> Uplink:
    base: dict[str, Any] = dict(event_id="e", source="tts", integration="app", device="known",
                                event_ts_ms=1, received_ts_ms=2, values={"t": 1.0})
    base.update(kw)
    return Uplink(**base)


CASES: list[tuple[str, Uplink, str, str | None, str | None]] = [
    # name, uplink, kind, reason (None: a WRITE or CREATE has none), token of the device written to
    ("known device", up(), WRITE, None, "T1"),
    ("metafield pending is still a write", up(device="pending"), WRITE, None, "T3"),
    ("join", up(kind="join", values={}), SKIP, "join", None),
    ("status, even of an unknown integration", up(kind="status", integration="x"), SKIP,
     "status", None),
    ("no values, no radio", up(values={}), SKIP, "empty", None),
    ("radio only is not empty", up(values={}, radio=Radio(rssi=-40)), WRITE, None, "T1"),
    ("unknown integration", up(integration="nope"), DEAD, "unknown_integration", None),
    ("unknown device", up(device="new"), DEAD, "unknown_device", None),
    ("row looked up and absent", up(device="gone"), DEAD, "unknown_device", None),
    ("broken device", up(device="broken"), DEAD, "device_broken", None),
    ("unknown device, provisioning", up(integration="auto", device="new"), CREATE, None, None),
    ("token in the uplink", up(source="particle", integration="prod", device="c0",
                               token="TOK"), WRITE, None, "TOK"),
]


@pytest.mark.parametrize(("uplink", "kind", "reason", "token"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(uplink: Uplink, kind: str, reason: str | None, token: str | None) -> None:
    [route] = plan([uplink], DEVICES, INTEGRATIONS)
    assert (route.kind, route.reason) == (kind, reason)
    assert route.uplink is uplink
    assert (route.device.token if route.device else None) == token
    if kind == DEAD:
        assert route.detail
    if kind in (WRITE, CREATE):
        assert route.key == f"{uplink.source}:{uplink.integration}:{uplink.device}"
        assert route.integration is INTEGRATIONS[(uplink.source, uplink.integration)]


def test_token_device_takes_its_template_from_the_rules() -> None:
    rows: dict[str, Device | None] = {}
    meta = {"product_id": "42"}
    [a, b] = plan([up(source="particle", integration="prod", device="c0", token="T"),
                   up(source="particle", integration="prod", device="c1", token="T",
                      device_meta=meta)], rows, INTEGRATIONS)
    # keyed apart from the registry row, so a refusal of this token breaks no registered device
    assert a.key == "particle:prod:c0"
    assert a.device == Device(key=token_device_key("particle:prod:c0", "T"), token="T",
                              template="blueprint")
    assert b.device is not None and b.device.template == "other"


def test_lookups_name_exactly_the_rows_plan_reads() -> None:
    uplinks = [c[1] for c in CASES]
    read: list[str] = []

    class Rows(dict[str, Device | None]):
        def get(self, key: str, default: Any = None) -> Any:
            read.append(key)
            return super().get(key, default)

    plan(uplinks, Rows(DEVICES), INTEGRATIONS)
    assert lookups(uplinks, INTEGRATIONS) == read
    assert read == ["tts:app:known", "tts:app:pending", "tts:app:known", "tts:app:new",
                    "tts:app:gone", "tts:app:broken", "tts:auto:new"]


def test_one_route_per_uplink_in_order() -> None:
    uplinks = [up(event_id=str(i), device=d)
               for i, d in enumerate(["known", "new", "broken", "known"])]
    routes = plan(uplinks, DEVICES, INTEGRATIONS)
    assert [r.uplink.event_id for r in routes] == ["0", "1", "2", "3"]
    assert all(isinstance(r, Route) for r in routes)
