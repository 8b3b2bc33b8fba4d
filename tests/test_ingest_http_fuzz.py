"""Property: whatever arrives over HTTP, ingest-http never answers 5xx, never crashes, and every
2xx it gives for a webhook is an entry in Redis equal to what the parser makes of the request."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.events import decode_uplink
from pipeline.keys import Keys
from pipeline.particle import parse_webhook
from pipeline.streams import Redis
from tests.conftest import FIXTURES
from tests.test_ingest_http import (
    BASIC_PASSWORD,
    HEADER_SECRET,
    TTS_KEY,
    make_stage,
    serving,
)
from workers.ingest_http import IngestHttp

MAX_BODY = 4096  # as configured by make_stage

PATHS = ["/particle/tempmon", "/particle/hdr", "/particle/basic", "/particle/nope",
         "/tts/tts-app", "/tts/mqtt-only", "/healthz", "/readyz", "/status", "/metrics",
         "/particle/", "/particle/tempmon/extra", "/"]
CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain",
                 "application/json; charset=utf-8", "application/vnd.particle+json",
                 "application/octet-stream", "multipart/form-data", "text/html", "", None]
ENVELOPE = ["event", "data", "published_at", "coreid", "device_id", "userid", "fw_version",
            "version", "public", "productID", "ttl", "event_id", "id", "token", "t", "name",
            "lat", "lng", "latitude", "longitude"]

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(ENVELOPE) | st.text(max_size=10), inner, max_size=6),
    max_leaves=30,
)
particle_like = st.fixed_dictionaries(
    {},
    optional={
        "event": st.text(max_size=30) | json_scalars,
        "data": st.text(max_size=60) | json_values.map(lambda v: json.dumps(v)) | json_values,
        "published_at": st.sampled_from(["2024-05-13T10:55:40.306Z", "2024-05-13", "nope", ""])
        | json_scalars,
        "coreid": st.sampled_from(["e00fce68ece1d3d21a73dcc9", ""]) | json_scalars,
        "fw_version": json_scalars, "public": json_scalars, "productID": json_scalars,
        "userid": json_scalars, "event_id": json_scalars, "t": st.just("A" * 32) | json_scalars,
        "coordinates": st.fixed_dictionaries({"lat": json_scalars, "lng": json_scalars}),
    },
)


def _fixture_bodies() -> list[bytes]:
    return [p.read_bytes() for sub in ("particle", "tts") if (FIXTURES / sub).exists()
            for p in sorted((FIXTURES / sub).iterdir()) if not p.name.endswith(".src.txt")]


def _mutate(body: bytes, cut: int, junk: bytes) -> bytes:
    cut = cut % (len(body) + 1)
    return body[:cut] + junk + body[cut + len(junk):]


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """A body and the content type it would naturally be sent with."""
    kind = draw(st.sampled_from(["valid", "particle", "json", "form", "fixture", "mutant",
                                 "bytes", "big", "empty"]))
    if kind == "valid":
        fields = {"event": draw(st.text(max_size=20)),
                  "data": draw(st.text(max_size=40) | st.dictionaries(
                      st.text(max_size=8), json_scalars, max_size=5).map(json.dumps)),
                  "published_at": "2024-05-13T10:55:40.306Z",
                  "coreid": draw(st.sampled_from(["e00fce68ece1d3d21a73dcc9", "d2"]))}
        if draw(st.booleans()):
            return urlencode(fields).encode(), "application/x-www-form-urlencoded"
        return json.dumps(fields).encode(), "application/json"
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), "application/json"
    if kind == "particle":
        return json.dumps(draw(particle_like)).encode(), "application/json"
    if kind == "form":
        fields = draw(st.dictionaries(st.sampled_from(ENVELOPE) | st.text(max_size=8),
                                      st.text(max_size=40), max_size=6))
        return urlencode(fields).encode(), "application/x-www-form-urlencoded"
    fixtures = _fixture_bodies()
    if kind == "fixture":
        return draw(st.sampled_from(fixtures)), "application/json"
    if kind == "mutant":
        return _mutate(draw(st.sampled_from(fixtures)), draw(st.integers(0, 2000)),
                       draw(st.binary(min_size=1, max_size=8))), "application/json"
    if kind == "bytes":
        return draw(st.binary(max_size=300)), "text/plain"
    if kind == "big":
        size = draw(st.integers(MAX_BODY - 40, MAX_BODY + 50))
        return b'{"coreid":"d","v":"' + b"x" * size + b'"}', "application/json"
    return b"", "application/json"


@st.composite
def auth_headers(draw: st.DrawFn) -> dict[str, str]:
    """Mostly the right credentials for every integration at once (each checks its own)."""
    basic_good = "Basic " + base64.b64encode(f"particle:{BASIC_PASSWORD}".encode()).decode()
    if draw(st.integers(0, 9)) < 7:
        return {"X-Particle-Secret": HEADER_SECRET, "Authorization": basic_good,
                "X-Downlink-Apikey": TTS_KEY}
    names = st.sampled_from(["X-Particle-Secret", "Authorization", "X-Downlink-Apikey",
                             "X-Foo", "Accept"])
    values = st.text(printable, max_size=30).map(str.strip) | st.sampled_from(
        [HEADER_SECRET, TTS_KEY, basic_good, "Basic !!!", "Basic " + "A" * 8])
    return draw(st.dictionaries(names, values, max_size=3))


@pytest.fixture
async def served(redis: Redis, prefix: str) -> AsyncIterator[tuple[IngestHttp, str]]:
    stage = make_stage(redis, prefix)
    async with serving(stage) as base:
        yield stage, base


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    path=st.one_of(st.sampled_from(PATHS[:3]), st.sampled_from(PATHS[:5]),
                   st.sampled_from(PATHS)),
    method=st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE"]),
    body_ct=bodies(),
    content_type=st.none() | st.none() | st.sampled_from(CONTENT_TYPES)
    | st.text(printable, max_size=30),
    headers=auth_headers(),
    query=st.dictionaries(st.sampled_from(ENVELOPE) | st.text(max_size=6),
                          st.text(max_size=20), max_size=4),
)
async def test_no_5xx_and_every_2xx_is_in_redis(
    served: tuple[IngestHttp, str], redis: Redis, keys: Keys, path: str, method: str,
    body_ct: tuple[bytes, str], content_type: str | None, headers: dict[str, str],
    query: dict[str, str],
) -> None:
    """``content_type`` None: the body's natural one; a value replaces it ("" sends none)."""
    stage, base = served
    body, natural = body_ct
    chosen = natural if content_type is None else content_type.strip()
    if chosen:
        headers["Content-Type"] = chosen
    before = await redis.xlen(keys.stream("uplinks"))
    async with aiohttp.ClientSession() as http, http.request(
        method, base + path, data=body if method != "GET" else None, params=query,
        headers=headers, skip_auto_headers=("Content-Type",),
    ) as resp:
        status = resp.status
        payload = await resp.read()
        entry_id = resp.headers.get("X-Entry-Id")
        event_id = resp.headers.get("X-Event-Id")
        request_ct = resp.request_info.headers.get("Content-Type", "")
    assert status < 500, (status, payload[:300])
    event(f"status {status}")
    after = await redis.xlen(keys.stream("uplinks"))
    if entry_id is None:
        assert after == before
        if status >= 400 and path.startswith(("/particle/", "/tts/")):
            error = json.loads(payload)["error"]
            assert error["reason"] and error["message"]
        return
    assert status == 200 and payload == b""
    assert after == before + 1
    rows = await redis.xrange(keys.stream("uplinks"), min=entry_id, max=entry_id)
    assert len(rows) == 1
    up = decode_uplink(rows[0][1][b"d"])
    assert event_id is None or up.event_id == event_id
    source, name = path.strip("/").split("/")
    assert (up.source, up.integration) == (source, name)
    if source == "particle":
        product = stage.particle[name][0]
        ct = request_ct.split(";")[0].strip().lower()
        sent = body if method != "GET" else b""
        expected: Any = parse_webhook(sent, ct, product, received_ts_ms=up.received_ts_ms,
                                      query=dict(resp.url.query))
        assert up == expected


def test_fixture_folder_is_there() -> None:
    assert Path(FIXTURES / "particle").exists()
