"""Seeded generator of hostile and semi-valid bridge inputs, derived from the genuine fixtures.

Pure: no sockets, no clock reads except the ``now_ms`` passed in. :class:`Generator` yields
:class:`HttpCase` (a webhook for ingest-http) and :class:`MqttCase` (a payload for a TTS topic)
in a sequence fixed by the seed alone: the same ``seed`` and ``now_ms`` give the same inputs,
byte for byte, however many requests run concurrently (cases are drawn one at a time, in
order, from one ``random.Random``). :meth:`Generator.case` rebuilds case ``n`` of a run, which
is how a finding is reproduced (``python -m bench.fuzz --show N``).

Each case starts from a base built out of a fixture (a Particle envelope, a custom-template
body, a TTS uplink given a decoded payload, a TTS message as it came) and gets 0–3 mutations:
fields deleted or given another type, 60 KB strings (ids, values, keys), deep nesting, hundreds
of unmapped keys, invalid UTF-8, CR/LF/NUL/bidi characters in ids, future and garbage
timestamps, event-export wrappers; then a transport twist: wrong or missing content type, form
body, empty body, a body at or over the size limit (declared or chunked), bad or missing
credentials, another method or path, or a verbatim repeat of an earlier case (duplicate event).
Every case carries ``kind``, the names of what was done to it, for the per-kind tally.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent

JSON_CT = "application/json"
FORM_CT = "application/x-www-form-urlencoded"


def fixtures_dir() -> Path:
    """The repository's own genuine messages, ``tests/fixtures`` (each with its ``.src.txt``)."""
    path = ROOT / "tests" / "fixtures"
    if not ((path / "particle").is_dir() and (path / "tts").is_dir()):
        raise FileNotFoundError(f"no fixtures in {path} (particle/ and tts/)")
    return path


@dataclass(frozen=True)
class Fixtures:
    """The genuine bodies the generator starts from (``.src.txt`` provenance notes left out)."""

    particle_json: list[tuple[str, bytes]]
    particle_form: list[tuple[str, bytes]]
    tts_raw: list[tuple[str, bytes]]
    #: TTS messages that parse as JSON objects (uplinks, joins, downlink outcomes...).
    tts_objects: list[tuple[str, dict[str, Any]]]

    @classmethod
    def load(cls, folder: Path | None = None) -> Fixtures:
        folder = folder or fixtures_dir()
        pj, pf, raw, objs = [], [], [], []
        for p in sorted((folder / "particle").iterdir()):
            if p.name.endswith(".json"):
                pj.append((p.name, p.read_bytes()))
            elif p.name.endswith(".txt") and not p.name.endswith(".src.txt") and "form" in p.name:
                pf.append((p.name, p.read_bytes().strip()))
        for p in sorted((folder / "tts").iterdir()):
            if p.name.endswith((".json", ".ndjson")):
                body = p.read_bytes()
                raw.append((p.name, body))
                lines = body.splitlines() if p.name.endswith(".ndjson") else [body]
                for line in lines:
                    try:
                        value = json.loads(line)
                    except ValueError:
                        continue
                    for item in value if isinstance(value, list) else [value]:
                        if isinstance(item, dict):
                            objs.append((p.name, item.get("result", item)))
        if not (pj and pf and objs):
            raise FileNotFoundError(f"{folder}: expected Particle and TTS fixtures")
        return cls(pj, pf, raw, objs)


@dataclass(frozen=True)
class Pools:
    """Device ids and credentials the bridge under test is configured with."""

    particle_known: tuple[str, ...]
    particle_unknown: tuple[str, ...]
    particle_provision: tuple[str, ...]
    tts_known: tuple[str, ...]
    tts_unknown: tuple[str, ...]
    tokens: tuple[str, ...]
    header_secret: str
    basic_user: str
    basic_password: str
    tts_key: str
    app_id: str
    tenant: str = "ttn"


@dataclass(frozen=True)
class HttpCase:
    n: int
    kind: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: dict[str, str] = field(default_factory=dict)
    #: Send the body chunked (no Content-Length): the size limit must hold while reading.
    chunked: bool = False


@dataclass(frozen=True)
class MqttCase:
    n: int
    kind: str
    topic: str
    payload: bytes


Case = HttpCase | MqttCase

# Templates' datastream names (bench.fuzz configures them): values for these keys are mapped.
MAPPED_KEYS = ("t", "v", "value", "temperature", "humidity", "battery", "pressEvent",
               "batteryVoltage", "sensorTemperature", "occupied", "type")
#: Object mutations and how often each is drawn (the big ones rarer: they dominate the bytes).
_MUTATIONS = ("delete", "type", "huge-value", "huge-key", "deep", "many-keys", "bad-id",
              "bad-time", "future-time", "bad-event-id")
_MUTATION_WEIGHTS = (3, 3, 0.7, 0.5, 1, 1, 3, 2, 2, 1.5)
_TOPIC_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
_BIDI = ("\u202e", "\u2066", "\u200f", "\ufeff")
_HOSTILE_SCALARS: list[Any] = [
    None, True, False, 0, -1, 2**70, -(2**63) - 1, 1e308, -0.0, 3.14, "", " ", "NaN",
    "Infinity", "\u0000", "\r\n", "\ud800", "\u202egnp.exe", "x" * 300, [], {}, [1, "a", None],
    {"nested": {"deeper": [1, 2, {"x": None}]}},
]
_GARBAGE_TIMES: list[Any] = [
    "nope", "", "0001-01-01T00:00:00Z", "2024-13-45T99:99:99Z", "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999Z", "2024-05-13T10:55:40.306+99:00", "2024-05-13",
    1715597740306, -1, 1e30, None, True, ["2024-05-13T10:55:40Z"], {"t": 1},
    "2024-05-13T10:55:40." + "9" * 5000 + "Z",
]
_CONTENT_TYPES = [
    "text/plain", "text/html", "application/octet-stream", "multipart/form-data; boundary=x",
    "application/json; charset=latin-1", "application/json; charset=utf-16", "application/xml",
    "application/vnd.particle+json", "text/json", "*/*", ";;;", "application/json\t", "x" * 300,
]


def _iso(ms: int) -> str:
    import datetime as _dt

    t = _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class Generator:
    """Draws :data:`Case` s one by one (see the module docstring)."""

    def __init__(self, seed: int, fixtures: Fixtures, pools: Pools, *, max_body: int,
                 max_payload: int, mqtt_share: float, now_ms: int) -> None:
        self.seed = seed
        self.fx = fixtures
        self.pools = pools
        self.max_body = max_body
        self.max_payload = max_payload
        self.mqtt_share = mqtt_share
        self.now_ms = now_ms
        self._rng = random.Random(seed)
        self._n = 0
        self._recent: deque[Case] = deque(maxlen=64)
        self._uplinks = [(name, o) for name, o in fixtures.tts_objects if "uplink_message" in o]
        self._kinds: list[tuple[float, Callable[[], Case]]] = [
            (0.22, self._particle_envelope), (0.12, self._particle_custom),
            (0.05, self._particle_blueprint), (0.06, self._particle_fixture),
            (0.05, self._particle_provision), (0.16, self._tts_webhook),
            (0.04, self._tts_fixture_webhook), (0.03, self._probe_or_stray),
        ]

    # --- the sequence

    def next(self) -> Case:
        n, self._n = self._n, self._n + 1
        rng = self._rng
        self._case_n = n
        if self._recent and rng.random() < 0.03:
            prev = rng.choice(self._recent)
            case: Case = (HttpCase(n, "duplicate", prev.method, prev.path, prev.headers,
                                   prev.body, prev.query, prev.chunked)
                          if isinstance(prev, HttpCase) else
                          MqttCase(n, "duplicate", prev.topic, prev.payload))
        elif rng.random() < self.mqtt_share:
            case = self._mqtt()
        else:
            make = rng.choices([m for _, m in self._kinds], [w for w, _ in self._kinds])[0]
            case = make()
        self._recent.append(case)
        return case

    def case(self, n: int) -> Case:
        """Case ``n`` of a run with this seed (a fresh generator replays the sequence)."""
        g = Generator(self.seed, self.fx, self.pools, max_body=self.max_body,
                      max_payload=self.max_payload, mqtt_share=self.mqtt_share,
                      now_ms=self.now_ms)
        while True:
            c = g.next()
            if c.n == n:
                return c

    # --- Particle

    def _ts(self) -> int:
        """An event time around now (a little in the past), distinct per case."""
        return self.now_ms - self._rng.randrange(0, 600_000) + self._case_n % 1000

    def _values(self) -> dict[str, Any]:
        rng = self._rng
        keys = rng.sample(MAPPED_KEYS, rng.randrange(1, 5))
        out: dict[str, Any] = {}
        for k in keys:
            out[k] = (rng.choice(["car", "bike", "parking status"]) if k == "type"
                      else round(rng.uniform(-50, 120), 2) if rng.random() < 0.7
                      else rng.randrange(0, 100))
        return out

    def _particle_envelope(self) -> Case:
        rng, pools = self._rng, self.pools
        device = rng.choice(pools.particle_known + pools.particle_unknown[:1])
        env: dict[str, Any] = {
            "event": rng.choice(["tempmon", "demo", "status", "blynk_data"]),
            "data": json.dumps(self._values()) if rng.random() < 0.8 else f"{rng.random():.4f}",
            "published_at": _iso(self._ts()), "coreid": device,
            "userid": "597771d1f92bae142dbb7559", "fw_version": str(rng.randrange(1, 9)),
            "public": False, "productID": 30301,
        }
        if rng.random() < 0.1:
            env["event_id"] = f"evt{self._case_n}"
        kind = ["envelope"]
        env = self._mutate_object(env, kind, data_key="data", id_key="coreid",
                                  time_key="published_at")
        if rng.random() < 0.35:
            kind.append("form")
            body = urlencode({k: v if isinstance(v, str) else json.dumps(v)
                              for k, v in (env.items() if isinstance(env, dict) else [])},
                             errors="surrogatepass").encode()
            return self._http("particle", kind, body, FORM_CT)
        return self._http("particle", kind, self._dump(env, kind), JSON_CT)

    def _particle_custom(self) -> Case:
        """A custom-template body; the device in the query (as Particle's cloud fills it), in
        the body, in both (agreeing or not), or nowhere."""
        rng, pools = self._rng, self.pools
        _, raw = rng.choice(self.fx.particle_json)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {"value": body}
        body.update(self._values())
        body["n"] = self._case_n  # distinct events: same data would be one event id
        kind = ["custom"]
        query: dict[str, str] = {}
        where = rng.choice(["query", "body", "both-same", "both-differ", "none"])
        kind.append(f"coreid-{where}")
        dev, other = rng.choice(pools.particle_known), rng.choice(pools.particle_known
                                                                  + pools.particle_unknown)
        if where in ("query", "both-same", "both-differ"):
            query["coreid"] = dev
            if rng.random() < 0.5:
                query["event"] = rng.choice(["click", "tempmon", "blynk"])
        if where in ("body", "both-same"):
            body["coreid"] = dev
        if where == "both-differ":
            body[rng.choice(["coreid", "device_id", "deviceID"])] = other
        body = self._mutate_object(body, kind, data_key=None, id_key="coreid",
                                   time_key="published_at")
        path = "/particle/strict" if rng.random() < 0.3 else None
        return self._http("particle", kind, self._dump(body, kind), JSON_CT, query=query,
                          path=path)

    def _particle_blueprint(self) -> Case:
        """Blynk's Particle blueprint: the device's Blynk token travels as ``t``."""
        rng, pools = self._rng, self.pools
        token = rng.choice(pools.tokens) if rng.random() < 0.6 else "".join(
            rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
            for _ in range(32))
        env: dict[str, Any] = {"event": "blynk", "coreid": rng.choice(pools.particle_known),
                               "published_at": _iso(self._ts()),
                               "data": json.dumps({"t": token, **self._values()})}
        kind = ["blueprint"]
        env = self._mutate_object(env, kind, data_key="data", id_key="coreid",
                                  time_key="published_at")
        return self._http("particle", kind, self._dump(env, kind), JSON_CT)

    def _particle_fixture(self) -> Case:
        rng = self._rng
        if rng.random() < 0.3:
            name, body = rng.choice(self.fx.particle_form)
            ct = FORM_CT
        else:
            name, body = rng.choice(self.fx.particle_json)
            ct = JSON_CT
        kind = [f"fixture:{name.removesuffix('.json').removesuffix('.txt')}"]
        query = {"coreid": rng.choice(self.pools.particle_known)} if rng.random() < 0.5 else {}
        body = self._mutate_bytes(body, kind) if rng.random() < 0.5 else body
        return self._http("particle", kind, body, ct, query=query)

    def _particle_provision(self) -> Case:
        """Semi-valid events for the integration that creates unknown devices in Blynk: ids
        from a fixed pool (value mutations only), so Blynk's device count stays bounded."""
        rng = self._rng
        env = {"event": "tempmon", "data": json.dumps(self._values()),
               "published_at": _iso(self._ts()),
               "coreid": rng.choice(self.pools.particle_provision)}
        kind = ["provision"]
        if rng.random() < 0.5:
            data = json.loads(env["data"])
            self._mutate_values(data, kind)
            env["data"] = json.dumps(data)
        return self._http("particle", kind, self._dump(env, kind), JSON_CT,
                          path="/particle/open", auth=False)

    # --- TTS

    def _tts_uplink(self, kind: list[str]) -> dict[str, Any]:
        """A fixture uplink for a pool device, with a decoded payload and a fresh id."""
        rng, pools = self._rng, self.pools
        _, base = rng.choice(self._uplinks)
        up = copy.deepcopy(base)
        device = rng.choice(pools.tts_known + pools.tts_unknown[:1])
        ids = up.setdefault("end_device_ids", {})
        if isinstance(ids, dict):
            ids["device_id"] = device
            ids["application_ids"] = {"application_id": pools.app_id}
        up["correlation_ids"] = [f"as:up:fz{self.seed}x{self._case_n}", "rpc:/fuzz"]
        up["received_at"] = _iso(self._ts())
        msg = up.get("uplink_message")
        if isinstance(msg, dict):
            msg["decoded_payload"] = self._values()
            msg["f_cnt"] = self._case_n
        kind.append("uplink")
        return up

    def _tts_body(self, kind: list[str]) -> dict[str, Any] | Any:
        rng = self._rng
        if rng.random() < 0.85:
            up: Any = self._tts_uplink(kind)
        else:
            name, obj = rng.choice(self.fx.tts_objects)
            kind.append(f"fixture:{name.removesuffix('.json')}")
            up = copy.deepcopy(obj)
        up = self._mutate_object(up, kind, data_key="uplink_message.decoded_payload",
                                 id_key="end_device_ids.device_id", time_key="received_at",
                                 event_id_key="correlation_ids")
        if isinstance(up, dict) and rng.random() < 0.1:
            kind.append("export")
            up = self._export(up)
        return up

    def _export(self, up: dict[str, Any]) -> dict[str, Any]:
        """The Events API / Console wrapping of an ApplicationUp (``as.up.data.forward``),
        sometimes of another type or with ``data`` not an object."""
        rng = self._rng
        data: Any = {"@type": "type.googleapis.com/ttn.lorawan.v3.ApplicationUp", **up}
        roll = rng.random()
        if roll < 0.1:
            data["@type"] = "type.googleapis.com/ttn.lorawan.v3.ApplicationDownlink"
        elif roll < 0.2:
            data = _pick(rng, _HOSTILE_SCALARS)
        return {"name": rng.choice(["as.up.data.forward", "as.up.data.forward",
                                    "as.down.data.receive", ""]),
                "time": _iso(self._ts()),
                "identifiers": [{"device_ids": up.get("end_device_ids")}], "data": data,
                "correlation_ids": up.get("correlation_ids", []),
                "unique_id": f"01FUZZ{self._case_n}"}

    def _tts_webhook(self) -> Case:
        kind = ["tts"]
        body = self._tts_body(kind)
        return self._http("tts", kind, self._dump(body, kind), JSON_CT)

    def _tts_fixture_webhook(self) -> Case:
        rng = self._rng
        name, body = rng.choice(self.fx.tts_raw)
        kind = ["tts", f"fixture:{name}"]
        if rng.random() < 0.5:
            body = self._mutate_bytes(body, kind)
        return self._http("tts", kind, body, JSON_CT)

    def _mqtt(self) -> Case:
        rng, pools = self._rng, self.pools
        kind = ["mqtt"]
        body = self._tts_body(kind)
        payload = self._dump(body, kind, limit=self.max_payload)
        roll = rng.random()
        if roll < 0.04:
            kind.append("empty")
            payload = b""
        elif roll < 0.08:
            kind.append("over-limit")
            payload = b'{"x":"' + b"y" * (self.max_payload + rng.randrange(1, 4096)) + b'"}'
        elif roll < 0.13:
            payload = self._mutate_bytes(payload, kind)
        device = (body.get("end_device_ids", {}) if isinstance(body, dict) else {})
        dev = device.get("device_id") if isinstance(device, dict) else None
        # The topic keeps a valid id (a broker disconnects a client publishing control
        # characters or wildcards); hostile ids travel in the payload.
        if not isinstance(dev, str) or not _TOPIC_ID.fullmatch(dev) or rng.random() < 0.1:
            dev = rng.choice(pools.tts_known)
        suffix = rng.choices(["up", "join", "location/solved", "service/data", "down/ack",
                              "down/failed", "down/queued"],
                             weights=[85, 4, 3, 2, 2, 2, 2])[0]
        if suffix != "up":
            kind.append(suffix.replace("/", "-"))
        topic = f"v3/{pools.app_id}@{pools.tenant}/devices/{dev}/{suffix}"
        return MqttCase(self._case_n, "+".join(kind), topic, payload)

    def _probe_or_stray(self) -> Case:
        rng = self._rng
        path = rng.choice(["/healthz", "/readyz", "/status", "/metrics", "/particle/nope",
                           "/tts/nope", "/particle/", "/particle/hdr/extra", "/", "/%00",
                           "/particle/" + "a" * 3000, "/blynk/x", "/tts/mq"])
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        return HttpCase(self._case_n, "stray", method, path, self._auth(True), b"")

    # --- mutations

    def _mutate_object(self, obj: Any, kind: list[str], *, data_key: str | None,
                       id_key: str, time_key: str, event_id_key: str | None = None) -> Any:
        rng = self._rng
        for _ in range(rng.choice([0, 0, 0, 1, 1, 1, 2, 3])):
            m = rng.choices(_MUTATIONS, _MUTATION_WEIGHTS)[0]
            if m == "bad-event-id" and event_id_key is None:
                m = "bad-time"
            kind.append(m)
            if m == "delete":
                _delete_random(rng, obj)
            elif m == "type":
                _set_random(rng, obj, _pick(rng, _HOSTILE_SCALARS))
            elif m == "huge-value":
                _set_path(obj, data_key or "x", "v" * rng.choice([8_000, 30_000, 60_000]))
            elif m == "huge-key":
                target = _get_values(obj, data_key)
                target["k" * rng.choice([300, 8_000, 60_000])] = 1
                _set_path(obj, data_key or "", target)
            elif m == "deep":
                depth = rng.choice([64, 200, 1_000, 10_000])
                _set_path(obj, data_key or "x", {"deep": _deep_marker(depth)})
            elif m == "many-keys":
                target = _get_values(obj, data_key)
                for i in range(rng.choice([500, 800, 2_000])):
                    target[f"u{rng.randrange(10**9)}_{i}"] = i
                _set_path(obj, data_key or "", target)
            elif m == "bad-id":
                _set_path(obj, id_key, self._bad_id())
            elif m == "bad-time":
                _set_path(obj, time_key, _pick(rng, _GARBAGE_TIMES))
            elif m == "future-time":
                ahead = rng.choice([3_600_000, 86_400_000, 100 * 365 * 86_400_000])
                _set_path(obj, time_key, _iso(min(self.now_ms + ahead, 253_402_300_799_000)))
            elif m == "bad-event-id" and event_id_key:
                _set_path(obj, event_id_key, [f"as:up:{self._bad_id()}"]
                          if rng.random() < 0.7 else _pick(rng, _HOSTILE_SCALARS))
        return obj

    def _mutate_values(self, values: dict[str, Any], kind: list[str]) -> None:
        rng = self._rng
        m = rng.choice(["type", "many-keys", "huge-value"])
        kind.append(m)
        if m == "type":
            values[rng.choice(MAPPED_KEYS)] = _pick(rng, _HOSTILE_SCALARS)
        elif m == "many-keys":
            for i in range(500):
                values[f"p{rng.randrange(10**9)}_{i}"] = i
        else:
            values["type"] = "s" * 20_000

    def _bad_id(self) -> str:
        rng = self._rng
        base = rng.choice(self.pools.particle_known + self.pools.tts_known)
        return rng.choice([
            base + "\r\nX-Injected: 1", base + "\n", base + "\0", "\0",
            rng.choice(_BIDI) + base, base + rng.choice(_BIDI), "dev 1", "", " ",
            "d" * 60_000, "d" * 65, "../../etc/passwd", "dév1", "😀", "a/b", "+", "#",
            "%00", "x" * 64,
        ])

    def _mutate_bytes(self, body: bytes, kind: list[str]) -> bytes:
        rng = self._rng
        m = rng.choice(["invalid-utf8", "truncate", "flip", "invalid-utf8", "nul"])
        kind.append(m)
        cut = rng.randrange(0, len(body) + 1)
        if m == "invalid-utf8":
            junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                               b"\xe2\x82"])
            return body[:cut] + junk + body[cut:]
        if m == "truncate":
            return body[:cut]
        if m == "nul":
            return body[:cut] + b"\x00\r\n" + body[cut:]
        out = bytearray(body)
        for _ in range(rng.randrange(1, 8)):
            if out:
                out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)

    def _dump(self, obj: Any, kind: list[str], limit: int | None = None) -> bytes:
        """JSON text (raw UTF-8 or ASCII-escaped), deep markers spliced, sometimes mangled."""
        rng = self._rng
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.7)
        body = _splice_deep(text.encode("utf-8", "surrogatepass"))
        if rng.random() < 0.05:
            body = self._mutate_bytes(body, kind)
        if limit is not None and len(body) > limit:
            kind.append("oversize")
        return body

    # --- transport

    def _auth(self, good: bool) -> dict[str, str]:
        pools = self.pools
        basic = base64.b64encode(f"{pools.basic_user}:{pools.basic_password}".encode()).decode()
        if good:
            return {"X-Particle-Secret": pools.header_secret, "Authorization": f"Basic {basic}",
                    "X-Downlink-Apikey": pools.tts_key}
        rng = self._rng
        return rng.choice([
            {}, {"X-Particle-Secret": pools.header_secret[:-1]},
            {"X-Particle-Secret": pools.header_secret + "x"}, {"Authorization": "Basic !!!"},
            {"Authorization": "Basic " + base64.b64encode(b"particle:").decode()},
            {"Authorization": "Bearer " + pools.header_secret},
            {"X-Downlink-Apikey": pools.tts_key.lower()}, {"X-Downlink-Apikey": "x" * 4000},
            {"X-Particle-Secret": "é"},
        ])

    def _http(self, source: str, kind: list[str], body: bytes, ct: str, *,
              query: dict[str, str] | None = None, path: str | None = None,
              auth: bool = True) -> HttpCase:
        rng = self._rng
        if path is None:
            path = (rng.choice(["/particle/hdr", "/particle/hdr", "/particle/basic",
                                "/particle/strict"]) if source == "particle" else "/tts/hook")
        headers = self._auth(True) if auth else {}
        method = "POST"
        chunked = False
        roll = rng.random()
        if roll < 0.04:
            kind.append("bad-auth")
            headers = self._auth(False)
        elif roll < 0.08:
            kind.append("content-type")
            ct = rng.choice(_CONTENT_TYPES)
        elif roll < 0.10:
            kind.append("no-content-type")
            ct = ""
        elif roll < 0.12:
            kind.append("form-body")
            ct = FORM_CT
            body = urlencode({"event": "x", "data": body.decode("utf-8", "replace")[:2000],
                              "coreid": rng.choice(self.pools.particle_known)},
                             errors="surrogatepass").encode()
        elif roll < 0.14:
            kind.append("empty")
            body = b""
        elif roll < 0.18:
            size = rng.choice([self.max_body, self.max_body + 1, 2 * self.max_body])
            kind.append("at-limit" if size == self.max_body else "over-limit")
            body = _pad_to(body, size)
        elif roll < 0.20:
            kind.append("chunked-over-limit")
            body = _pad_to(body, self.max_body + rng.randrange(1, 10_000))
            chunked = True
        elif roll < 0.21:
            kind.append("method")
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
        if ct:
            headers["Content-Type"] = ct
        return HttpCase(self._case_n, "+".join(kind), method, path, headers, body,
                        dict(query or {}), chunked)


# --- JSON helpers (pure) ---------------------------------------------------------------------

_DEEP = re.compile(rb'\\?"@@DEEP(\d+)@@\\?"')


def _deep_marker(depth: int) -> str:
    """Stands for ``depth`` nested arrays until :func:`_splice_deep` (``json`` would recurse)."""
    return f"@@DEEP{depth}@@"


def _splice_deep(body: bytes) -> bytes:
    """Replace each marker (as a JSON string, or as one inside a JSON string) by the nesting."""
    return _DEEP.sub(lambda m: b"[" * int(m[1]) + b"1" + b"]" * int(m[1]), body)


def _pick(rng: random.Random, values: list[Any]) -> Any:
    """A copy of one of ``values``: later mutations must not grow the shared lists and dicts
    (or make them contain themselves)."""
    return copy.deepcopy(rng.choice(values))


def _pad_to(body: bytes, size: int) -> bytes:
    """A JSON-ish body of exactly ``size`` bytes starting with ``body`` when it fits."""
    if body.startswith(b"{") and body.endswith(b"}") and len(body) + 16 < size:
        pad = size - len(body) - len(b',"pad":""')
        return body[:-1] + b',"pad":"' + b"p" * pad + b'"}'
    return (body + b" " * size)[:size]


def _walk(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) pair in a JSON value."""
    out: list[tuple[Any, Any]] = []
    stack = [obj]
    while stack:
        cur = stack.pop()
        items = (list(cur.items()) if isinstance(cur, dict)
                 else list(enumerate(cur)) if isinstance(cur, list) else [])
        for k, v in items:
            out.append((cur, k))
            if isinstance(v, dict | list):
                stack.append(v)
    return out


def _delete_random(rng: random.Random, obj: Any) -> None:
    spots = [(c, k) for c, k in _walk(obj) if isinstance(c, dict)]
    if spots:
        c, k = rng.choice(spots)
        del c[k]


def _set_random(rng: random.Random, obj: Any, value: Any) -> None:
    spots = _walk(obj)
    if spots:
        c, k = rng.choice(spots)
        c[k] = value


def _get_values(obj: Any, path: str | None) -> dict[str, Any]:
    """The dict at ``path`` (a JSON string holding an object is decoded), or a new one."""
    cur: Any = obj
    for part in path.split(".") if path else []:
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, str):
        try:
            cur = json.loads(cur)
        except ValueError:
            cur = None
    return dict(cur) if isinstance(cur, dict) else {}


def _set_path(obj: Any, path: str, value: Any) -> None:
    """Set ``a.b.c`` (creating dicts); Particle's ``data`` keeps holding JSON text."""
    if not isinstance(obj, dict) or not path:
        return
    parts = path.split(".")
    cur = obj
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    if parts[-1] == "data" and isinstance(value, dict):
        value = json.dumps(value)
    cur[parts[-1]] = value
