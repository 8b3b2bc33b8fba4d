"""Particle Cloud webhooks → ``Uplink`` (pure: bytes in, an Uplink out; no I/O, no clock).

Shapes understood (``shared/reference/tts-particle-formats.md`` §2):

* Particle's default **form** body (``event``, ``data``, ``published_at``, ``coreid``) and the
  same fields as **default JSON** (all strings), with the product fields ``userid``,
  ``fw_version``/``version`` (number or string), ``public`` (bool or ``"true"``/``"false"``) and
  ``productID``/``product_id``, which land in ``device_meta``;
* the event-stream JSON that ``{{{PARTICLE_EVENT_JSON}}}`` produces (``name`` instead of
  ``event``);
* **custom** JSON/body/form templates: any object, flattened by :func:`pipeline.values.flatten`
  (nested objects → dotted keys ``a.b``; lists → ``a.0``, ``a.1``, Particle's own mustache path
  syntax, except a list of two numbers, which stays a list; an object holding ``lat`` +
  ``lng``/``lon`` or ``latitude`` + ``longitude`` → ``[lon, lat]`` under its own key, its other
  keys dotted). Particle's differences from TTS: numeric-string coordinates count (a ``json``
  template makes every variable a string), and a pair at the top level (of the body or of
  ``data``) becomes ``location``. Coordinates that are not numbers within ±90/±180 do not
  make a location and do not reject the webhook: they stay plain keys (``c.lat``), which
  transform reports as unmapped if nothing maps them;
* the Blynk blueprint: ``t`` (a 32-character Blynk token, in ``data`` or spread by the
  template) or ``token`` (the blueprint's query parameter) becomes ``Uplink.token``; the
  ``v14``… keys are kept as they are, for transform to map as pins.

**Key rule for values.** A ``data`` that is a JSON object (or a string holding one) is unpacked
into values by the rules above. Any other ``data`` (plain text such as ``"20.00"`` or
``"online"``, a number, a bool, ``null``) goes in as one value under the full event name as
published (``Temperature/Kitchen``), or under ``data`` when no event name came. Top-level fields
that are not envelope fields are values too. Values keep the type they were sent with: numbers
sent as strings stay strings here (transform converts them where the datastream type asks);
only location coordinates become floats, because a location is ``list[float]``.

**Reserved top-level names** (never values): ``event``, ``data``, ``published_at``, ``coreid``,
``device_id``, ``deviceID``, ``userid``, ``fw_version``, ``version``, ``public``, ``productID``,
``product_id``, ``ttl``, ``event_id``, ``id``, ``token``; ``name`` too when ``data`` is present
(the event-stream shape); ``t`` when it holds a Blynk token. ``id`` is ignored: templates put
the *device* id there (``"id":"{{PARTICLE_DEVICE_ID}}"``), so it cannot identify an event.

**Where the envelope comes from.** A custom template often sends no device id. Particle lets a
webhook add ``query`` parameters to any body style, so the envelope fields may also come from the
URL query (``?coreid={{{PARTICLE_DEVICE_ID}}}&event={{{PARTICLE_EVENT_NAME}}}``). Particle's
cloud fills the query from the webhook's own configuration, while a custom body is whatever the
firmware published, so a reserved name in the query **wins** over the body (a device id in the
query replaces every device id field of the body); other query parameters are values the body
may override. With the product's ``device_id_from: query`` the query must name the device and a
body naming another one is refused (``invalid_field`` naming the body's field). Device ids must
match :data:`pipeline.ids.DEVICE_ID`. Without a device id the message is refused, unless it
carries a Blynk token (the blueprint's GET), in which case the device is ``blynk-`` + a hash of
the token.

**HTML escapes.** Particle's ``{{var}}`` (double braces, as in the Console's JSON template)
HTML-escapes what it inserts (``&lt;`` for ``<``). With ``html_unescape`` (the default) every
string of the body and query is unescaped once, before ``data`` is decoded: escaped JSON in
``data`` unpacks, and what the device itself published inside it is not unescaped again.

**event_time.** ``published_at`` (RFC 3339, :func:`pipeline.eventtime.rfc3339_ms`), else the
receive time; a time more than ``max_clock_skew_s`` after the receive time becomes the receive
time and the Uplink says so (``event_ts_clamped``; the caller counts it).

**event_id.** Scoped by :func:`pipeline.ids.event_id` (``particle:<integration>:…``, hashed when
long or odd) around: ``<device>:<event_id>`` when the template sends ``event_id``
(``{{{PARTICLE_EVENT_ID}}}``), else sha1(device, event name, published_at, sha1(data)).
Without ``published_at`` a retry cannot be told from a new reading, so the receive time goes
into the hash: such duplicates are delivered (at-least-once) rather than new readings dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl

import msgspec

from pipeline.config import ParticleProduct
from pipeline.errors import InvalidInput, Reason
from pipeline.events import Uplink, UplinkKind, Value
from pipeline.eventtime import clamp_future, rfc3339_ms
from pipeline.ids import DEVICE_ID, check_device, event_id, readable_prefix
from pipeline.jsonbody import undecodable
from pipeline.values import INT_MAX, INT_MIN, MAX_DEPTH, MAX_VALUES, flatten, scalar

__all__ = ["MAX_DEPTH", "MAX_VALUES", "body_style", "parse_webhook"]

BodyStyle = Literal["json", "form", "text"]

_JSON_TYPES = frozenset({"application/json", "text/json"})
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded"})
_TEXT_TYPES = frozenset({"text/plain"})
_STYLES: dict[str, BodyStyle] = {
    "application/json": "json", "application/x-www-form-urlencoded": "form", "text/plain": "text"
}

_DEVICE_KEYS = ("coreid", "device_id", "deviceID")
_RESERVED = frozenset(
    {
        "event", "data", "published_at", *_DEVICE_KEYS, "userid", "fw_version", "version",
        "public", "productID", "product_id", "ttl", "event_id", "id", "token",
    }
)
#: Blynk auth tokens: 32 characters of this alphabet.
_BLYNK_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")
#: Events Particle's cloud itself publishes (online/offline, firmware, webhook outcomes).
_SYSTEM_PREFIXES = ("spark/", "particle/", "hook-sent/", "hook-response/", "hook-error/")

_json_decoder = msgspec.json.Decoder()
_canonical = msgspec.json.Encoder(order="sorted")


def body_style(content_type: str) -> BodyStyle | None:
    """How a body of this media type is read; ``None``: not a type Particle sends (→ 415).

    ``content_type`` is the bare media type (no parameters), as aiohttp's
    ``request.content_type`` gives it. A ``text/plain`` body (a ``body`` template whose
    content type was left unset) is read as JSON when it is a JSON object, else as the event data.
    """
    style = _STYLES.get(content_type)
    if style is not None:
        return style
    ct = content_type.strip().lower()
    if ct in _JSON_TYPES or (ct.startswith("application/") and ct.endswith("+json")):
        return "json"
    if ct in _FORM_TYPES:
        return "form"
    if ct in _TEXT_TYPES:
        return "text"
    return None


def parse_webhook(
    body: bytes,
    content_type: str,
    product: ParticleProduct,
    *,
    received_ts_ms: int,
    query: Mapping[str, str] | None = None,
) -> Uplink:
    """Parse one Particle webhook request for ``product``.

    ``query`` holds the URL's query parameters: its envelope fields win over the body's, its
    other parameters are values the body may override (see the module docstring). An empty
    body with a query (the Blynk blueprint's GET) is read from the query alone. Raises
    :class:`~pipeline.errors.InvalidInput` with reason ``unsupported_media_type``,
    ``invalid_json``, ``invalid_encoding``, ``wrong_shape``, ``missing_field``,
    ``invalid_field`` or ``too_many_values``, and ``field`` naming the offending field. The
    Uplink's ``event_ts_clamped`` says the event time was clamped (the caller counts it).
    """
    if query:
        for key, value in query.items():
            try:
                key.encode()
                value.encode()
            except UnicodeEncodeError:
                raise InvalidInput(
                    "query parameter is not UTF-8", reason=Reason.INVALID_ENCODING, field=key[:64]
                ) from None
    typed = (not query and product.device_id_from != "query"
             and _STYLES.get(content_type) == "json"
             and not (product.html_unescape and _may_hold_entity(body)))
    if typed:
        fast = _typed_default_uplink(body, product, received_ts_ms)
        if fast is not None:
            return fast
    fields: dict[str, Any] = {}
    if body and not body.isspace():
        fields = _decode_body(body, content_type)
    elif not query:
        raise InvalidInput("empty body", reason=Reason.WRONG_SHAPE, field="$")
    if query or product.device_id_from == "query":
        fields = _with_query(fields, query or {}, product)
    if product.html_unescape and (query or _may_hold_entity(body)):
        _unescape(fields, 0)
    fast = None if typed else _default_uplink(fields, product, received_ts_ms)
    return fast if fast is not None else _uplink(fields, product, received_ts_ms)


def _with_query(
    body: dict[str, Any], query: Mapping[str, str], product: ParticleProduct
) -> dict[str, Any]:
    """The body's fields and the query's: the query's envelope fields (Particle's cloud fills
    them from the webhook's URL, the firmware cannot) win, the body's values win."""
    query_key = next((k for k in _DEVICE_KEYS if query.get(k)), None)
    if query_key is None:
        if product.device_id_from == "query":
            raise InvalidInput(
                "device_id_from is `query` but the webhook URL has no device id: add "
                "?coreid={{{PARTICLE_DEVICE_ID}}}",
                reason=Reason.MISSING_FIELD,
                field="coreid",
            )
    else:
        for key in _DEVICE_KEYS:
            given = body.pop(key, None)
            if (product.device_id_from == "query" and given not in (None, "")
                    and given != query[query_key]):
                raise InvalidInput(
                    f"the body's `{key}` names another device than the webhook URL's "
                    f"`{query_key}` (device_id_from is `query`)",
                    reason=Reason.INVALID_FIELD,
                    field=key,
                )
    merged = body
    for key, value in query.items():
        if key in _RESERVED or key not in merged:
            merged[key] = value
    return merged


#: What Particle's mustache ``{{var}}`` escapes (``&<>"'``, and ``/`` `` ` `` ``=`` as
#: mustache.js does); only these, so a literal ``&copy`` sent with ``{{{var}}}`` stays as sent.
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'",
             "&#x27;": "'", "&#x2F;": "/", "&#x60;": "`", "&#x3D;": "="}
_ENTITY = re.compile("|".join(map(re.escape, _ENTITIES)))


def _unescape(node: dict[str, Any] | list[Any], depth: int) -> None:
    """Undo the template's HTML escaping in every string of ``node``, in place, once (the JSON
    inside a ``data`` string is unescaped as text before it is decoded, never again after)."""
    if depth > MAX_DEPTH:
        return  # deeper is refused by flatten anyway
    if isinstance(node, dict):
        for key, value in node.items():
            if type(value) is str:
                if "&" in value:
                    node[key] = _ENTITY.sub(_entity, value)
            elif isinstance(value, dict | list):
                _unescape(value, depth + 1)
    else:
        for i, value in enumerate(node):
            if type(value) is str:
                if "&" in value:
                    node[i] = _ENTITY.sub(_entity, value)
            elif isinstance(value, dict | list):
                _unescape(value, depth + 1)


def _may_hold_entity(body: bytes) -> bool:
    """Whether a decoded string of ``body`` can hold ``&`` (every entity starts with one): as
    itself, JSON's ``\\u0026`` or a form's ``%26``. Most webhooks hold none, and the walk over
    every string of them is skipped. (The one-byte searches first: ``memchr`` is several times
    faster than a search for the longer patterns, which most bodies then need not run.)"""
    return (b"&" in body or (b"%" in body and b"%26" in body)
            or (b"\\u" in body and b"\\u0026" in body))


def _entity(m: re.Match[str]) -> str:
    return _ENTITIES[m.group()]


# --- body decoding -------------------------------------------------------------------------------


def _decode_body(body: bytes, content_type: str) -> dict[str, Any]:
    style = body_style(content_type)
    if style is None:
        raise InvalidInput(
            f"content type {content_type!r} is not JSON, form or text",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
            field="Content-Type",
        )
    if style == "form":
        return _decode_form(body)
    if style == "json":
        decoded = _decode_json(body)
        if not isinstance(decoded, dict):
            raise InvalidInput(
                f"a JSON webhook body must be an object, got {_json_type(decoded)}",
                reason=Reason.WRONG_SHAPE,
                field="$",
            )
        return decoded
    # text/plain: a JSON object if it is one, otherwise the event data itself.
    try:
        decoded = _decode_json(body)
    except InvalidInput:
        decoded = None
    if isinstance(decoded, dict):
        return decoded
    try:
        return {"data": body.decode()}
    except UnicodeDecodeError:
        raise InvalidInput("body is not UTF-8", reason=Reason.INVALID_ENCODING, field="$") from None


def _decode_json(body: bytes) -> Any:
    try:
        return _json_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise undecodable(body, exc) from None
    except RecursionError:
        raise InvalidInput(
            "JSON nested too deeply", reason=Reason.WRONG_SHAPE, field="$"
        ) from None


def _decode_form(body: bytes) -> dict[str, Any]:
    try:
        pairs = parse_qsl(
            body.decode().strip(),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_VALUES + len(_RESERVED),
        )
    except UnicodeDecodeError:
        raise InvalidInput(
            "form body is not UTF-8", reason=Reason.INVALID_ENCODING, field="$"
        ) from None
    except ValueError:
        raise InvalidInput(
            f"form body has more than {MAX_VALUES} fields", reason=Reason.TOO_MANY_VALUES, field="$"
        ) from None
    return dict(pairs)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


# --- the uplink ----------------------------------------------------------------------------------


def _uplink(fields: dict[str, Any], product: ParticleProduct, received_ts_ms: int) -> Uplink:
    has_data = "data" in fields
    event = _opt_str(fields, "event")
    if event is None and has_data:
        event = _opt_str(fields, "name")
    published_at = _opt_str(fields, "published_at")
    event_ts_ms = _iso_ms(published_at) if published_at else None

    values: dict[str, Value] = {}
    token = _opt_str(fields, "token") or None
    data: Any = fields.get("data")
    if has_data:
        unpacked = _unpack_data(data)
        if unpacked is None:
            values[event or "data"] = scalar(data, "data")
        else:
            token = _take_token(unpacked) or token
            values.update(_flatten(unpacked, "data."))
    extra_keys = fields.keys() - _RESERVED
    if has_data:
        extra_keys.discard("name")
    if extra_keys:
        extra = {k: fields[k] for k in extra_keys}
        token = _take_token(extra) or token
        for key, value in _flatten(extra, "").items():
            values.setdefault(key, value)
    if len(values) > MAX_VALUES:
        raise InvalidInput(
            f"{len(values)} values in one message (limit {MAX_VALUES})",
            reason=Reason.TOO_MANY_VALUES,
            field="$",
        )

    device = _device(fields, token)
    meta = _device_meta(fields, product, event)
    system = event is not None and event.startswith(_SYSTEM_PREFIXES)
    kind: UplinkKind = "status" if system else "uplink"
    event_ts_ms, clamped = clamp_future(
        event_ts_ms if event_ts_ms is not None else received_ts_ms, received_ts_ms,
        int(product.max_clock_skew_s * 1000))
    return Uplink(
        event_id=event_id("particle", product.name, _local_event_id(
            fields, device, event, published_at, data, values, received_ts_ms)),
        source="particle",
        integration=product.name,
        device=device,
        event_ts_ms=event_ts_ms,
        received_ts_ms=received_ts_ms,
        values=values,
        device_meta=meta,
        kind=kind,
        token=token,
        event_ts_clamped=clamped,
    )


#: Fields of Particle's default webhook (JSON or form) that :func:`_default_uplink` handles.
_DEFAULT_KEYS = frozenset({"event", "data", "published_at", "coreid", "userid", "fw_version",
                           "public"})
_PLAIN = (str, float, bool, type(None))
#: Integration name → :func:`pipeline.ids.readable_prefix` of a SHA-1 hex digest (one per
#: configured product: names come from the config).
_HEX_ID_PREFIXES: dict[str, str | None] = {}


def _default_uplink(
    fields: dict[str, Any], product: ParticleProduct, received_ts_ms: int
) -> Uplink | None:
    """The Uplink of Particle's default webhook (``event``, ``data``, ``published_at``,
    ``coreid``, maybe ``userid``/``fw_version``/``public``) in the fewest steps, or ``None``
    for anything else, which :func:`_uplink` then handles.

    The hot path of ingest-http (``bench/ingest_http.py``). It must give exactly the Uplink
    :func:`_uplink` gives (``tests/test_particle_parse.py`` checks both paths agree), so it
    takes only the plain cases — ``data`` flat JSON with no token, no coordinates, no big ints,
    or plain text — and hands back everything else, errors included.
    """
    if not fields.keys() <= _DEFAULT_KEYS:
        return None
    event = fields.get("event")
    data = fields.get("data")
    published_at = fields.get("published_at")
    device = fields.get("coreid")
    if (type(event) is not str or type(data) is not str or type(published_at) is not str
            or type(device) is not str):
        return None
    return _default_of(event, data, published_at, device, fields.get("userid"),
                       fields.get("fw_version"), fields.get("public"), product, received_ts_ms)


class _DefaultWebhook(msgspec.Struct, forbid_unknown_fields=True):
    """Particle's default JSON webhook body, decoded by type (:func:`_typed_default_uplink`):
    the keys of :data:`_DEFAULT_KEYS` only, the four envelope fields strings. An absent
    optional field and a ``null`` one are the same to both paths."""

    event: str
    data: str
    published_at: str
    coreid: str
    userid: Any = None
    fw_version: Any = None
    public: Any = None


_default_decoder = msgspec.json.Decoder(_DefaultWebhook)


def _typed_default_uplink(
    body: bytes, product: ParticleProduct, received_ts_ms: int
) -> Uplink | None:
    """The Uplink of a JSON body of Particle's default shape, decoded straight into
    :class:`_DefaultWebhook` (no dict, no key and type checks in Python), or ``None`` for
    any other body, which the general path then decodes and handles (its errors included).

    Only for a body read as it came: no query, no ``device_id_from: query``, no HTML escape
    to undo (:func:`parse_webhook` checks). It gives what :func:`_default_uplink` gives for
    the decoded dict: both end in :func:`_default_of` (``tests/test_particle_parse.py``
    compares the paths on generated bodies, duplicate keys included: the last one wins in
    both decodes)."""
    try:
        hook = _default_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return _default_of(hook.event, hook.data, hook.published_at, hook.coreid, hook.userid,
                       hook.fw_version, hook.public, product, received_ts_ms)


def _default_of(
    event: str, data: str, published_at: str, device: str, userid: Any, fw_version: Any,
    public: Any, product: ParticleProduct, received_ts_ms: int,
) -> Uplink | None:
    """:func:`_default_uplink` once the fields are known to be of the default shape."""
    if not published_at or not DEVICE_ID.fullmatch(device):
        return None
    event_ts_ms = _iso_ms(published_at)  # first, as in _uplink: the same error wins
    values: dict[str, Value]
    head = data[:1]
    if head == "{":
        try:
            decoded = _json_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            decoded = None
        if type(decoded) is dict:
            if "t" in decoded or "lat" in decoded or "latitude" in decoded:
                return None
            if len(decoded) > MAX_VALUES:
                return None
            for value in decoded.values():
                kind = type(value)
                if kind is int:
                    if not INT_MIN <= value <= INT_MAX:
                        return None
                elif kind not in _PLAIN:
                    return None
            values = decoded
        else:
            values = {event or "data": data}
    elif head.isspace():
        return None
    else:
        values = {event or "data": data}
    meta = {"event": event}
    if userid is not None:
        if type(userid) is not str:
            return None
        meta["userid"] = userid
    if fw_version is not None:
        if type(fw_version) is int:
            meta["fw_version"] = str(fw_version)
        elif type(fw_version) is str and fw_version.strip():
            meta["fw_version"] = fw_version.strip()
        else:
            return None
    if public is not None:
        if type(public) is bool:
            meta["public"] = "true" if public else "false"
        elif type(public) is str and public.lower() in ("true", "false"):
            meta["public"] = public.lower()
        else:
            return None
    if product.product_id:
        meta["product_id"] = product.product_id
    digest = hashlib.sha1(
        b"\0".join((device.encode(), event.encode(), published_at.encode(),
                    hashlib.sha1(data.encode()).digest()))
    ).hexdigest()
    prefix = _HEX_ID_PREFIXES.get(product.name, "")
    if prefix == "":
        prefix = _HEX_ID_PREFIXES[product.name] = readable_prefix("particle", product.name, 40)
    event_ts_ms, clamped = clamp_future(event_ts_ms, received_ts_ms,
                                        int(product.max_clock_skew_s * 1000))
    return Uplink(
        event_id=prefix + digest if prefix is not None else event_id("particle", product.name,
                                                                      digest),
        source="particle",
        integration=product.name,
        device=device,
        event_ts_ms=event_ts_ms,
        received_ts_ms=received_ts_ms,
        values=values,
        device_meta=meta,
        kind="status" if event.startswith(_SYSTEM_PREFIXES) else "uplink",
        token=None,
        event_ts_clamped=clamped,
    )


def _unpack_data(data: Any) -> dict[str, Any] | None:
    """The object inside ``data`` (inlined, or a string holding JSON), else ``None``."""
    if isinstance(data, dict):
        return data
    if isinstance(data, str) and data.lstrip().startswith("{"):
        try:
            decoded = _json_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            return None  # text that merely starts with a brace: plain data
        if isinstance(decoded, dict):
            return decoded
    return None


def _take_token(obj: dict[str, Any]) -> str | None:
    """Remove and return a Blynk token under ``t`` (only a token-shaped string counts)."""
    t = obj.get("t")
    if isinstance(t, str) and _BLYNK_TOKEN.fullmatch(t):
        del obj["t"]
        return t
    return None


def _flatten(obj: dict[str, Any], where: str) -> dict[str, Value]:
    """Particle's flattening: numeric-string coordinates count, a top-level pair is ``location``."""
    return flatten(obj, where=where, top_location="location", coerce_coordinates=True)


def _opt_str(fields: Mapping[str, Any], key: str) -> str | None:
    """A string field, or ``None`` when absent/null; another type is an error naming it."""
    value = fields.get(key)
    if value is None or type(value) is str:
        return value
    if isinstance(value, str):
        return str(value)
    raise InvalidInput(
        f"`{key}` must be a string, got {_json_type(value)}", reason=Reason.INVALID_FIELD, field=key
    )


def _device(fields: Mapping[str, Any], token: str | None) -> str:
    for key in _DEVICE_KEYS:
        device = _opt_str(fields, key)
        if device:
            return check_device(device, key)
    if token:
        return "blynk-" + hashlib.sha1(token.encode()).hexdigest()[:16]
    raise InvalidInput(
        "no device id: send Particle's default fields (coreid), or add "
        "?coreid={{{PARTICLE_DEVICE_ID}}} to the webhook URL",
        reason=Reason.MISSING_FIELD,
        field="coreid",
    )


def _device_meta(
    fields: Mapping[str, Any], product: ParticleProduct, event: str | None
) -> dict[str, str]:
    meta: dict[str, str] = {}
    if event is not None:
        meta["event"] = event
    userid = _opt_str(fields, "userid")
    if userid is not None:
        meta["userid"] = userid
    for key in ("fw_version", "version"):
        if fields.get(key) is not None:
            meta["fw_version"] = _int_text(fields[key], key)
            break
    public = fields.get("public")
    if public is not None:
        if isinstance(public, bool):
            meta["public"] = "true" if public else "false"
        elif isinstance(public, str) and public.lower() in ("true", "false"):
            meta["public"] = public.lower()
        else:
            raise InvalidInput(
                "`public` must be true/false", reason=Reason.INVALID_FIELD, field="public"
            )
    for key in ("productID", "product_id"):
        if fields.get(key) is not None:
            meta["product_id"] = _int_text(fields[key], key)
            break
    else:
        if product.product_id:
            meta["product_id"] = product.product_id
    return meta


def _int_text(value: Any, field: str) -> str:
    """A number or a string holding one (``6``, ``"6"``) as text; anything else is an error."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise InvalidInput(
        f"`{field}` must be a number or a string", reason=Reason.INVALID_FIELD, field=field
    )


def _iso_ms(text: str) -> int:
    """``published_at`` as Unix ms; text that is not an RFC 3339 time is an error naming it."""
    ms = rfc3339_ms(text)
    if ms is None:
        raise InvalidInput(
            f"`published_at` is not an RFC 3339 time: {text[:40]!r}",
            reason=Reason.INVALID_FIELD,
            field="published_at",
        )
    return ms


def _local_event_id(
    fields: Mapping[str, Any],
    device: str,
    event: str | None,
    published_at: str | None,
    data: Any,
    values: dict[str, Value],
    received_ts_ms: int,
) -> str:
    """The template's ``event_id`` (with the device), else a hash of what the event is."""
    given = fields.get("event_id")
    if isinstance(given, str | int) and not isinstance(given, bool) and str(given):
        return f"{device}:{given}"  # pipeline.ids hashes it when long or odd
    if isinstance(data, str):
        data_bytes = data.encode()
    else:
        data_bytes = _canonical.encode(data if "data" in fields else values)
    when = published_at if published_at else f"received:{received_ts_ms}"
    digest = hashlib.sha1(
        b"\0".join(
            (
                device.encode(),
                (event or "").encode(),
                when.encode(),
                hashlib.sha1(data_bytes).digest(),
            )
        )
    )
    return digest.hexdigest()
