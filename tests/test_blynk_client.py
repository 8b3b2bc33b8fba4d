"""The bridge's Blynk clients against the emulator over real HTTP and the real Redis."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    DeviceSpec,
    EmulatorSpec,
    MetafieldSpec,
    OAuthClient,
    Settings,
    TemplateSpec,
)
from pipeline import metrics
from pipeline.blynk.client import BlynkClient, classify, redirect_refusal, token_hash
from pipeline.blynk.http import HttpClient
from pipeline.blynk.outcomes import Fail, Ok, Retry
from pipeline.blynk.platform import PlatformClient
from pipeline.config import BlynkConfig, PlatformConfig
from pipeline.errors import Permanent, Reason, Retryable
from pipeline.keys import Keys
from pipeline.redact import Secret
from pipeline.streams import Redis
from tests.conftest import closed_port, free_port, serve_app

TOKEN = "xw7ITVneg1DifRRQuPGcA7fJvV8-FAVl"
NY_TOKEN = "P-0ekUL3EjrEkE_UnIIzsIggqyQXYd0z"
TEMPLATE = "TMPL84aMXD6vd"
SECRET = "client-secret-never-logged-9f3a"


def spec(**settings: Any) -> EmulatorSpec:
    return EmulatorSpec(
        regions={"fra1": 0, "ny3": 0},
        settings=Settings(**settings),
        templates=[TemplateSpec(
            id=TEMPLATE, name="ESP32 QA",
            datastreams=[
                DatastreamSpec(id=1, pin="V1", name="Temperature", type="double"),
                DatastreamSpec(id=2, pin="V2", name="Level", type="integer", min=0, max=100),
                DatastreamSpec(id=3, pin="V3", name="Location", type="location"),
                DatastreamSpec(id=4, pin="V4", name="Text", type="string"),
            ],
            metafields=[MetafieldSpec(id=1, name="Device Name"),
                        MetafieldSpec(id=7, name="TheThingsNetwork Device")])],
        devices=[DeviceSpec(name="A", token=TOKEN, template=TEMPLATE, id=1),
                 DeviceSpec(name="NY", token=NY_TOKEN, template=TEMPLATE, id=2, region="ny3")],
        oauth_clients=[OAuthClient(client_id="oa2-client", client_secret=SECRET)],
    )


class Env:
    def __init__(self, emu: BlynkEmulator, urls: dict[str, str], client: BlynkClient) -> None:
        self.emu, self.urls, self.client = emu, urls, client

    def config(self, timeout_s: float = 5.0) -> BlynkConfig:
        return BlynkConfig(servers=dict(self.urls), default_server="fra1", timeout_s=timeout_s,
                           max_connections=8)


@pytest.fixture
async def env(redis: Redis, keys: Keys) -> AsyncIterator[Env]:
    emu = BlynkEmulator.from_spec(spec(daily_import_points=None, device_rps=None))
    async with emu.serve({"fra1": 0, "ny3": 0}) as urls:
        e = Env(emu, urls, BlynkClient(BlynkConfig(), redis, keys))
        e.client = BlynkClient(e.config(), redis, keys)
        try:
            yield e
        finally:
            await e.client.close()


def counter(endpoint: str, status: str) -> float:
    value: float = metrics.BLYNK_REQUESTS.labels(endpoint, status)._value.get()
    return value


# --- Ok -----------------------------------------------------------------------------------------


async def test_batch_update_ok_with_value_formats(env: Env) -> None:
    before = counter("batch_update", "200")
    out = await env.client.batch_update("fra1", TOKEN, {"V1": 21.5, "V2": True,
                                                       "V3": [-73.8731, 40.8414],
                                                       "V4": "a b&c=d", "V9": None})
    assert out == Ok(200, "", server=env.urls["fra1"])
    dev = env.emu.device_by_token(TOKEN)
    assert dev.value("V1") == 21.5 and dev.value("V2") == 1
    assert dev.value("V3") == [-73.8731, 40.8414] and dev.value("V4") == "a b&c=d"
    assert dev.messages == 1
    assert counter("batch_update", "200") == before + 1


async def test_update_get_and_server_as_url(env: Env) -> None:
    c = env.client
    assert isinstance(await c.update(env.urls["fra1"], TOKEN, "v2", 42), Ok)
    assert isinstance(await c.update("fra1", TOKEN, "V3", [1.5, 2.5]), Ok)
    assert await c.get("fra1", TOKEN, ["v2"]) == Ok(200, "42", server=env.urls["fra1"])
    multi = await c.get("fra1", TOKEN, ["v2", "v3"])
    assert isinstance(multi, Ok) and multi.body == '{"v2":42,"v3":[1.5,2.5]}'


async def test_upload_history_splits_past_10000_points(env: Env) -> None:
    now = int(time.time() * 1000)
    points = [(now - 20_000 + i, i % 100) for i in range(10_001)]
    out = await env.client.upload_history("fra1", TOKEN, "V2", points)
    assert out == Ok(200, "OK", server=env.urls["fra1"])
    dev = env.emu.device_by_token(TOKEN)
    assert dev.imports_today == 10_001
    assert dev.value("V2") == 10_000 % 100


# --- Fail ---------------------------------------------------------------------------------------


async def test_fail_reasons(env: Env) -> None:
    c = env.client
    cases = [
        (c.batch_update("fra1", "not-a-token-000000000000000000000", {"V1": 1}),
         Reason.INVALID_TOKEN, None),
        (c.batch_update("fra1", TOKEN, {"V2": "abc"}), Reason.TYPE_MISMATCH, "V2"),
        (c.batch_update("fra1", TOKEN, {"V1": 1, "V2": "abc"}), Reason.TYPE_MISMATCH, None),
        (c.batch_update("fra1", TOKEN, {"V99": 1}), Reason.NO_DATASTREAM, "V99"),
        (c.batch_update("fra1", TOKEN, {"X1": 1}), Reason.WRONG_PIN, "X1"),
        (c.update("fra1", TOKEN, "V2", 1.5), Reason.TYPE_MISMATCH, "V2"),
        (c.get("fra1", TOKEN, ["v50"]), Reason.NO_DATASTREAM, "v50"),
    ]
    for aw, reason, pin in cases:
        out = await aw
        assert isinstance(out, Fail), out
        assert (out.reason, out.status, out.pin) == (reason, 400, pin)


async def test_too_large_upload(redis: Redis, keys: Keys) -> None:
    emu = BlynkEmulator.from_spec(spec(max_batch_points=5))
    async with emu.serve({"fra1": 0, "ny3": 0}) as urls:
        client = BlynkClient(BlynkConfig(servers={"fra1": urls["fra1"]}, default_server="fra1"),
                             redis, keys)
        try:
            out = await client.upload_history("fra1", TOKEN, "V2",
                                              [(int(time.time() * 1000), 1)] * 6)
        finally:
            await client.close()
    assert isinstance(out, Fail) and out.reason == Reason.TOO_LARGE
    assert out.detail == "Too much data in batch. Maximum batch size is 5 points."


def test_messages_matched_loosely() -> None:
    assert classify("Invalid token.") == classify("invalid token") == Reason.INVALID_TOKEN
    assert classify("Value doesn't match the Datastream data type.") == Reason.TYPE_MISMATCH
    assert classify("Value doesn't match the Datastream data type") == Reason.TYPE_MISMATCH
    assert classify("Requested dataStream doesn't exist in the product X") == Reason.NO_DATASTREAM
    assert classify("Something new") == Reason.BAD_REQUEST


# --- Retry --------------------------------------------------------------------------------------


async def test_retry_on_5xx_and_429_with_retry_after(env: Env) -> None:
    env.emu.faults.set(error_rate=1.0, error_status=503)
    out = await env.client.batch_update("fra1", TOKEN, {"V1": 1})
    assert isinstance(out, Retry) and (out.reason, out.status) == ("server_error", 503)
    env.emu.faults.set(storm_429_s=60, retry_after_s=7)
    out = await env.client.batch_update("fra1", TOKEN, {"V1": 1})
    assert out == Retry("rate_limited", "Too many requests.", retry_after_s=7.0, status=429)
    env.emu.faults.clear()
    assert isinstance(await env.client.batch_update("fra1", TOKEN, {"V1": 1}), Ok)


async def test_retry_on_device_rate_limit(redis: Redis, keys: Keys) -> None:
    emu = BlynkEmulator.from_spec(spec(device_rps=2, retry_after_s=3))
    async with emu.serve({"fra1": 0, "ny3": 0}) as urls:
        client = BlynkClient(BlynkConfig(servers=urls, default_server="fra1"), redis, keys)
        try:
            outs = [await client.batch_update("fra1", TOKEN, {"V1": i}) for i in range(4)]
        finally:
            await client.close()
    limited = [o for o in outs if isinstance(o, Retry)]
    assert limited and limited[0].retry_after_s == 3.0 and limited[0].reason == "rate_limited"


async def test_retry_on_timeout(env: Env, redis: Redis, keys: Keys) -> None:
    env.emu.faults.set(hang_rate=1.0)
    client = BlynkClient(env.config(timeout_s=0.3), redis, keys)
    try:
        out = await client.batch_update("fra1", TOKEN, {"V1": 1})
    finally:
        env.emu.faults.clear()
        await client.close()
    assert isinstance(out, Retry) and out.reason == "timeout"


async def test_retry_on_connection_errors(env: Env, redis: Redis, keys: Keys) -> None:
    with closed_port() as port:
        out = await env.client.batch_update(f"http://127.0.0.1:{port}", TOKEN, {"V1": 1})
    assert isinstance(out, Retry) and out.reason == "connection"
    env.emu.faults.set(drop_rate=1.0)
    out = await env.client.batch_update("fra1", TOKEN, {"V1": 1})
    assert isinstance(out, Retry) and out.reason == "connection"


# --- regions ------------------------------------------------------------------------------------


async def test_308_followed_and_region_remembered_across_instances(
        env: Env, redis: Redis, keys: Keys) -> None:
    out = await env.client.batch_update("fra1", NY_TOKEN, {"V1": 3.5})
    assert out == Ok(200, "", server=env.urls["ny3"])
    assert env.emu.device_by_token(NY_TOKEN).value("V1") == 3.5
    stored = await redis.get(keys.region(token_hash(NY_TOKEN)))
    assert stored == env.urls["ny3"].encode()
    env.emu.reset()
    second = BlynkClient(env.config(), redis, keys)  # another replica: learns it from Redis
    try:
        out = await second.batch_update("fra1", NY_TOKEN, {"V1": 4.5})
    finally:
        await second.close()
    assert out == Ok(200, "", server=env.urls["ny3"])
    assert [r["status"] for r in env.emu.recorded()] == [200]  # no 308 this time


async def test_second_redirect_is_retry(env: Env) -> None:
    # a misconfigured region whose 308 points back at fra1: the loop is not followed
    env.emu.bind_region("ny3", env.urls["fra1"])
    out = await env.client.batch_update("fra1", NY_TOKEN, {"V1": 1})
    assert isinstance(out, Retry) and out.reason == "redirect"


@asynccontextmanager
async def recorder() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A foreign server: records the head of every request it gets (answers 200, closes)."""
    heads: list[bytes] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads
    finally:
        server.close()
        await server.wait_closed()


def refused(api: str, reason: str) -> float:
    value: float = metrics.BLYNK_REDIRECTS_REFUSED.labels(api, reason)._value.get()
    return value


async def test_308_to_a_foreign_host_is_refused_and_the_token_never_sent_there(
        env: Env, redis: Redis, keys: Keys) -> None:
    async with recorder() as (foreign, heads):
        env.emu.bind_region("ny3", foreign)  # fra1's 308 for NY_TOKEN now points there
        before = refused("device", "foreign_host")
        out = await env.client.batch_update("fra1", NY_TOKEN, {"V1": 1})
        again = await env.client.update("fra1", NY_TOKEN, "V1", 2)
    assert isinstance(out, Fail) and (out.reason, out.status) == (Reason.REDIRECT_REFUSED, 308)
    assert again == out or (isinstance(again, Fail) and again.reason == Reason.REDIRECT_REFUSED)
    assert foreign in out.detail and "not a configured Blynk server" in out.detail
    assert NY_TOKEN not in out.detail
    assert heads == []  # no request, no token
    assert refused("device", "foreign_host") == before + 2
    assert await redis.get(keys.region(token_hash(NY_TOKEN))) is None  # nothing remembered
    assert [r["status"] for r in env.emu.recorded()] == [308, 308]  # fra1 asked both times


@asynccontextmanager
async def tls_redirector(cert: Path, key: Path, location: str) -> AsyncIterator[str]:
    """An HTTPS server answering every request with a 308 to ``location`` + its path."""

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=308, headers={"Location": location + request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_308_from_https_to_http_is_refused_even_to_a_configured_server(
        self_signed: tuple[Path, Path], redis: Redis, keys: Keys) -> None:
    cert, key = self_signed
    async with recorder() as (plain, heads), tls_redirector(cert, key, plain) as secure:
        client = BlynkClient(BlynkConfig(servers={"fra1": secure, "plain": plain},
                                         default_server="fra1", timeout_s=5), redis, keys)
        client.http = HttpClient(timeout_s=5, ssl_context=ssl.create_default_context(
            cafile=str(cert)))
        before = refused("device", "downgrade")
        try:
            out = await client.batch_update("fra1", TOKEN, {"V1": 1})
        finally:
            await client.close()
    assert isinstance(out, Fail) and out.reason == Reason.REDIRECT_REFUSED
    assert "https to http" in out.detail and TOKEN not in out.detail
    assert heads == []
    assert refused("device", "downgrade") == before + 1
    assert await redis.get(keys.region(token_hash(TOKEN))) is None


@pytest.mark.parametrize(("current", "target", "why"), [
    ("https://blynk.cloud", "https://ny3.blynk.cloud", None),
    ("https://fra1.blynk.cloud", "https://NY3.Blynk.Cloud:443", None),
    ("http://127.0.0.1:1", "http://127.0.0.1:2", None),  # configured
    ("http://127.0.0.1:1", "http://127.0.0.1:1", None),  # same origin
    ("https://blynk.cloud", "http://ny3.blynk.cloud", "downgrade"),
    ("https://blynk.cloud", "http://127.0.0.1:2", "downgrade"),
    ("https://blynk.cloud", "https://ny3.blynk.cloud:8443", "foreign_host"),
    ("https://blynk.cloud", "https://evil.example", "foreign_host"),
    ("https://blynk.cloud", "https://ny3.blynk.cloud.evil.example", "foreign_host"),
    ("https://blynk.cloud", "https://a.b.blynk.cloud", "foreign_host"),
    ("https://blynk.cloud", "https://ny3.blynk.cloud@evil.example", "foreign_host"),
    ("https://blynk.cloud", "https://evil.example/?https://ny3.blynk.cloud", "foreign_host"),
    ("https://blynk.cloud", "ftp://ny3.blynk.cloud", "foreign_host"),
])
def test_which_redirects_are_followed(current: str, target: str, why: str | None) -> None:
    servers = {"https://blynk.cloud", "http://127.0.0.1:2"}
    assert redirect_refusal(current, target, servers) == why


async def test_a_region_remembered_elsewhere_is_used_only_when_allowed(
        env: Env, redis: Redis, keys: Keys) -> None:
    """A foreign base stored in Redis (by an older version, or anyone) is not sent tokens."""
    async with recorder() as (foreign, heads):
        await redis.set(keys.region(token_hash(TOKEN)), foreign.encode())
        out = await env.client.batch_update("fra1", TOKEN, {"V1": 1})
    assert out == Ok(200, "", server=env.urls["fra1"]) and heads == []


async def test_the_platform_client_does_not_follow_redirects(env: Env) -> None:
    async with recorder() as (foreign, heads):
        async def redirect(request: web.Request) -> web.Response:
            return web.Response(status=308, headers={"Location": foreign + request.path_qs})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        async with serve_app(app) as url:
            platform = PlatformClient(PlatformConfig(url=url, client_id="oa2-client",
                                                     client_secret=Secret(SECRET)), env.client)
            before = refused("platform", "not_followed")
            with pytest.raises(Permanent) as exc:
                await platform.create_device(TEMPLATE, "x")
    assert exc.value.reason == Reason.REDIRECT_REFUSED and "308" in exc.value.detail
    assert SECRET not in exc.value.detail
    assert heads == []  # neither the client secret nor a token went there
    assert refused("platform", "not_followed") == before + 1


# --- redaction ----------------------------------------------------------------------------------


async def test_tokens_never_in_logs_outcomes_or_errors(
        env: Env, caplog: pytest.LogCaptureFixture, redis: Redis, keys: Keys) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    c = env.client
    texts.append(repr(await c.batch_update("fra1", NY_TOKEN, {"V1": 1})))
    texts.append(repr(await c.batch_update("fra1", TOKEN + "x", {"V1": 1})))
    with closed_port() as port:
        texts.append(repr(await c.batch_update(f"http://127.0.0.1:{port}", TOKEN, {"V1": 1})))
    env.emu.faults.set(drop_rate=1.0)
    texts.append(repr(await c.batch_update("fra1", TOKEN, {"V1": 1})))
    env.emu.faults.clear()
    platform = PlatformClient(PlatformConfig(url=env.urls["fra1"], client_id="oa2-client",
                                             client_secret=Secret(SECRET)), c)
    created = await platform.create_device(TEMPLATE, "Redacted")
    texts.append(repr(created))
    bad = PlatformClient(PlatformConfig(url=env.urls["fra1"], client_id="oa2-client",
                                        client_secret=Secret("wrong-" + SECRET)), c)
    with pytest.raises(Permanent) as exc:
        await bad.template_datastreams(TEMPLATE)
    texts.append(str(exc.value))
    texts += [r.getMessage() for r in caplog.records]
    texts += [str(r.args) for r in caplog.records]
    joined = "\n".join(texts)
    assert "…Yd0z" in joined  # the last 4 characters identify the token
    for secret in (TOKEN, NY_TOKEN, SECRET, created.token):
        assert secret not in joined


# --- platform API -------------------------------------------------------------------------------


def platform_config(env: Env, secret: str = SECRET) -> PlatformConfig:
    return PlatformConfig(url=env.urls["fra1"], client_id="oa2-client",
                          client_secret=Secret(secret))


async def test_platform_create_device_and_metafield_by_name(env: Env) -> None:
    platform = PlatformClient(platform_config(env), env.client)
    created = await platform.create_device(TEMPLATE, "eui-526973696e671256")
    assert len(created.token) == 32 and created.name == "eui-526973696e671256"
    await platform.set_metafield(created.id, "TheThingsNetwork Device", "eui-526973696e671256")
    await platform.set_metafield(created.id, "Device Name", "x")  # metafield ids cached
    assert env.emu.model.devices[created.id].metafields[7] == "eui-526973696e671256"
    with pytest.raises(Permanent) as exc:
        await platform.set_metafield(created.id, "No Such Field", "x")
    assert exc.value.reason == Reason.NOT_FOUND
    ds = await platform.template_datastreams(TEMPLATE)
    assert [d["pin"] for d in ds] == [1, 2, 3, 4]
    with pytest.raises(Permanent) as exc:
        await platform.template_datastreams("TMPLnope")
    assert exc.value.reason == Reason.NOT_FOUND
    with pytest.raises(Permanent) as exc:
        await platform.create_device("TMPLnope", "x")
    assert exc.value.reason == Reason.NOT_FOUND and "Template is not found" in exc.value.detail
    assert platform.tokens_fetched == 1
    # the created device writes through the device API with its token
    assert isinstance(await env.client.batch_update("fra1", created.token, {"V2": 5}), Ok)
    await platform.close()


async def test_platform_token_refreshed_before_expiry_and_after_401(env: Env) -> None:
    now = [0.0]
    platform = PlatformClient(platform_config(env), env.client, clock=lambda: now[0])
    await platform.template_datastreams(TEMPLATE)
    await platform.template_datastreams(TEMPLATE)
    assert platform.tokens_fetched == 1 and env.emu.platform.tokens_issued == 1
    now[0] += 290  # within the refresh margin of expires_in=300: refreshed before it expires
    await platform.template_datastreams(TEMPLATE)
    assert platform.tokens_fetched == 2
    env.emu.platform.expire_tokens()  # revoked server-side: 401 → one refresh, one retry
    assert len(await platform.template_datastreams(TEMPLATE)) == 4
    assert platform.tokens_fetched == 3


async def test_platform_errors(env: Env) -> None:
    bad = PlatformClient(platform_config(env, "wrong"), env.client)
    with pytest.raises(Permanent) as exc:
        await bad.create_device(TEMPLATE, "x")
    assert exc.value.reason == Reason.UNAUTHORIZED
    env.emu.faults.set(storm_429_s=60, retry_after_s=9, path_prefix="/api/")
    platform = PlatformClient(platform_config(env), env.client)
    with pytest.raises(Retryable) as rexc:
        await platform.create_device(TEMPLATE, "x")
    assert rexc.value.retry_after_s == 9.0
    env.emu.faults.set(error_rate=1.0, path_prefix="/api/")
    with pytest.raises(Retryable):
        await platform.create_device(TEMPLATE, "x")
    env.emu.faults.clear()
    with closed_port() as port:
        dead = PlatformClient(PlatformConfig(url=f"http://127.0.0.1:{port}", client_id="c",
                                             client_secret=Secret("s")))
        with pytest.raises(Retryable) as rexc:
            await dead.create_device(TEMPLATE, "x")
    assert rexc.value.reason == "connection"
    await dead.close()

