"""The monitor's status page: its history, its JSON, its one authenticated action, and the page
itself in a real headless Chromium against a running pipeline.

The browser test runs the real stages (ingest-mqtt, transform, egress, monitor) against the real
Redis, Mosquitto and the Blynk emulator, with the process's stats publisher and metrics server as
the CLI runs them; it loads the page, requires no console error, plots drawn from the pipeline's
data, and a dead letter replayed by a click that lands in Blynk.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from emulators.blynk import DeviceSpec
from emulators.tts import Fleet
from pipeline import config as config_mod
from pipeline import events, metrics, stats, status_page
from pipeline.context import Context
from pipeline.keys import Keys
from pipeline.lifecycle import run_stages
from pipeline.metrics_http import MetricsServer
from pipeline.redact import Secret
from pipeline.registry import Registry, device_key
from pipeline.status import StatusBoard
from pipeline.streams import Redis
from tests import browser
from tests.conftest import MQTT_HOST, MQTT_PORT, free_port
from tests.test_e2e import TEMPLATE, blynk_get, bridge_config, emulator, token_for
from tests.wait import wait_until
from workers import egress, ingest_mqtt, monitor, transform

ADMIN_TOKEN = "status-page-admin-" + secrets.token_hex(8)


# ------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([], 0.5, None),
        ([(0.1, 0), (float("inf"), 0)], 0.5, None),
        ([(0.1, 10), (0.5, 10), (float("inf"), 10)], 0.5, 0.05),  # inside the first bucket
        ([(0.1, 0), (0.5, 10), (float("inf"), 10)], 0.99, 0.1 + 0.4 * 0.99),
        ([(0.1, 0), (float("inf"), 4)], 0.5, 0.1),  # past the last bound: the last bound
    ],
)
def test_quantile_interpolates_like_prometheus(
    buckets: list[tuple[float, int]], q: float, expected: float | None
) -> None:
    got = stats.quantile(buckets, q)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_increase_keeps_only_what_grew() -> None:
    assert stats.increase({"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 5.0, "c": 2.0}) == {"a": 2, "c": 2}


def test_backlog_history_is_bounded_and_aligned_to_slots() -> None:
    backlog = stats.GaugeHistory()
    slot_ms = stats.SLOT_S * 1000
    for i in range(400):
        backlog.record(i * slot_ms, {"transform": float(i)})
    t = [i * slot_ms for i in range(390, 401)]
    assert backlog.series(t) == {"transform": [float(i) for i in range(390, 400)] + [None]}
    assert len(backlog._slots) <= stats.HISTORY_S // stats.SLOT_S + 1


async def test_published_increases_come_back_as_history(redis: Redis, prefix: str) -> None:
    keys = Keys(prefix)
    publisher = stats.StatsPublisher(redis, keys, "transform@test")
    await publisher.startup()
    metrics.TRANSFORMED.labels("tts", "history-test").inc(7)
    metrics.DEAD.labels("transform", "history_test").inc(2)
    metrics.LATENCY.observe(0.02)
    slot_end = (stats.slot_of(10**12) + 1) * stats.SLOT_S * 1000  # a boundary, as published
    grew = await publisher.publish_once(now_ms=slot_end)
    assert grew["transformed"] == 7 and grew["dead:transform:history_test"] == 2
    assert grew["e2e:count"] == 1

    hist = await stats.read_history(redis, keys, now_ms=slot_end + 1000)

    assert hist.t[-1] == slot_end - stats.SLOT_S * 1000
    assert len(hist.t) == stats.HISTORY_S // stats.SLOT_S
    assert hist.series("transformed")[-1] == 7 and sum(hist.series("transformed")) == 7
    assert hist.sum_prefix("dead:") == {"transform:history_test": 2}
    assert stats.quantile(stats.latency_buckets(hist, len(hist.t) - 1), 0.5) is not None
    assert 0 < await redis.ttl(keys.stats(stats.slot_of(slot_end - 1))) <= stats.HISTORY_S + 10
    alive = await stats.replicas_alive(redis, keys, now_ms=slot_end)
    assert [m for m, _ in alive] == ["transform@test"]
    await publisher.shutdown()
    assert await stats.replicas_alive(redis, keys, now_ms=slot_end) == []


async def test_the_replicas_set_expires_when_every_process_is_gone(redis: Redis,
                                                                   prefix: str) -> None:
    """A process killed without its shutdown (and no other left to remove it) leaves its member
    behind: the set itself must expire, or a crashed run's prefix keeps a key forever."""
    keys = Keys(prefix)
    publisher = stats.StatsPublisher(redis, keys, "transform@crashed")
    await publisher.startup()
    await publisher.publish_once()
    ttl = await redis.ttl(keys.replicas())
    assert 0 < ttl <= stats.REPLICA_GONE_S * 10, ttl


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN: the page's files name no other origin (the JS only the SVG namespace)."""
    static = Path(stats.__file__).parent / "static"
    for name in ("status.html", "status.css", "status.js"):
        text = (static / name).read_text().replace("http://www.w3.org/2000/svg", "")
        assert "://" not in text and "//cdn" not in text, name


# ---------------------------------------------------------------------- HTTP, without browser


def _monitor_config(prefix: str, token: str | None, allowed_hosts: str = "") -> config_mod.Config:
    text = f"""
redis: {{url: "redis://127.0.0.1:6379/0", prefix: "{prefix}"}}
templates: [{{name: kit, datastreams: [{{name: t, pin: V1, type: double}}]}}]
monitor: {{interval_s: 0.2{f', admin_token: "{token}"' if token else ''}{allowed_hosts}}}
"""
    return config_mod.parse(text, "yaml", "status-page.yaml", env={})


@asynccontextmanager
async def _metrics_port(cfg: config_mod.Config) -> AsyncIterator[tuple[str, Context]]:
    ctx = Context.create(cfg)
    stage = monitor.build(ctx)
    server = MetricsServer(ctx.redis, StatusBoard(ctx.redis, ctx.keys), [stage])
    url = await server.start("127.0.0.1", 0)
    try:
        yield url, ctx
    finally:
        await server.close()
        await ctx.close()


async def _dead_uplink(redis: Redis, ctx: Context, device: str) -> str:
    up = events.Uplink(event_id=f"tts:kit:{secrets.token_hex(6)}", source="tts",
                       integration="kit", device=device, event_ts_ms=1, received_ts_ms=1,
                       values={"t": 1.5})
    letter = events.dead_letter(stream=ctx.keys.stream("uplinks"), entry_id="1-0",
                                raw=events.encode(up), stage="transform",
                                reason="unknown_device", detail=f"no device {device}",
                                attempts=1, dead_ts_ms=int(time.time() * 1000))
    return str((await redis.xadd(ctx.keys.dead, {events.FIELD: events.encode(letter)})).decode())


async def test_replay_needs_the_admin_token_in_a_header(redis: Redis, prefix: str) -> None:
    async with _metrics_port(_monitor_config(prefix, ADMIN_TOKEN)) as (url, ctx), \
            aiohttp.ClientSession() as http:
        dead_id = await _dead_uplink(redis, ctx, "d1")
        body = {"ids": [dead_id]}
        cases: list[tuple[dict[str, str], int]] = [
            ({}, 401),
            ({"Authorization": "Bearer wrong-token-wrong-token"}, 401),
            ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
            ({"Authorization": f"Bearer {ADMIN_TOKEN}", "Origin": "http://evil.example"}, 403),
            # A cookie carries nothing: only the header authenticates (no CSRF by form posts).
            ({"Cookie": f"token={ADMIN_TOKEN}"}, 401),
        ]
        for headers, status in cases:
            async with http.post(f"{url}/dead/replay", json=body, headers=headers) as resp:
                assert resp.status == status, (headers, await resp.text())
        assert await redis.xlen(ctx.keys.dead) == 1

        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with http.post(f"{url}/dead/replay", data=b"ids=1", headers={
                **auth, "Content-Type": "application/x-www-form-urlencoded"}) as resp:
            assert resp.status == 415
        async with http.post(f"{url}/dead/replay", json={"ids": ["../etc"]}, headers=auth) as resp:
            assert resp.status == 400
        async with http.post(f"{url}/dead/replay", json={"ids": ["1-0"] * 101},
                             headers=auth) as resp:
            assert resp.status == 400
        async with http.post(f"{url}/dead/replay", json=body, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
        assert [r["id"] for r in answer["replayed"]] == [dead_id]
        assert answer["replayed"][0]["stream"] == "uplinks"
        assert await redis.xlen(ctx.keys.dead) == 0
        assert await redis.xlen(ctx.keys.stream("uplinks")) == 1
        async with http.post(f"{url}/dead/replay", json=body, headers=auth) as resp:
            assert (await resp.json())["missing"] == [dead_id]


async def test_without_a_token_the_page_is_read_only(redis: Redis, prefix: str) -> None:
    async with _metrics_port(_monitor_config(prefix, None)) as (url, ctx), \
            aiohttp.ClientSession() as http:
        dead_id = await _dead_uplink(redis, ctx, "d2")
        async with http.post(f"{url}/dead/replay", json={"ids": [dead_id]},
                             headers={"Authorization": "Bearer anything-at-all-x"}) as resp:
            assert resp.status == 403
            assert "monitor.admin_token" in (await resp.json())["error"]
        async with http.get(f"{url}/status.json") as resp:
            page = await resp.json()
        assert page["replay_enabled"] is False
        assert page["dead"]["total"] == 1
        assert [d["id"] for d in page["dead"]["latest"]] == [dead_id]
        assert {s["stream"] for s in page["streams"]} >= {"uplinks", "writes", "dead"}
        async with http.get(f"{url}/") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
            assert "/status.js" in await resp.text()
        async with http.delete(f"{url}/status.json") as resp:
            assert resp.status == 405
        async with http.get(f"{url}/nope") as resp:
            assert resp.status == 404


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:9100", True),
    ("10.2.3.4", True),
    ("[::1]:9100", True),
    ("[fe80::1%eth0]:9100", True),
    ("localhost:9100", True),
    ("LocalHost", True),
    ("monitor:9100", True),  # a compose service name
    ("bb-monitor", True),
    ("bridge.example.internal:9100", True),  # configured
    ("BRIDGE.Example.Internal.", True),
    ("evil.example:9100", False),  # a rebound name
    ("rebind.127.0.0.1.nip.io", False),
    ("bridge.example.internal.evil.example", False),
    ("localhost.evil.example", False),
    ("evil.example@127.0.0.1", False),
    ("127.0.0.1:9100/x", False),
    ("monitor:port", False),
    ("[::1", False),
    ("", False),
])
def test_the_host_allow_list(host: str, allowed: bool) -> None:
    extra = status_page.allowed_names(["bridge.example.internal"])
    assert status_page.host_allowed(host, extra) is allowed


async def test_a_rebound_host_name_cannot_read_the_page(redis: Redis, prefix: str) -> None:
    """DNS rebinding: a web site the operator visits points its own name at 127.0.0.1, then its
    script reads the page as same-origin. The browser sends that name as ``Host``: refused
    unless an IP, localhost, a single label or in ``monitor.allowed_hosts``."""
    cfg = _monitor_config(prefix, ADMIN_TOKEN, ", allowed_hosts: [bridge.example.internal]")
    async with _metrics_port(cfg) as (url, ctx), aiohttp.ClientSession() as http:
        dead_id = await _dead_uplink(redis, ctx, "d3")
        port = url.rsplit(":", 1)[1]
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        refused = metrics.REJECTED.labels("status-page", "host_not_allowed")
        before = refused._value.get()
        for host in (f"evil.example:{port}", "rebind.127.0.0.1.nip.io"):
            for path in ("/", "/status.json", "/status.js", "/status.css"):
                async with http.get(f"{url}{path}", headers={"Host": host}) as resp:
                    assert resp.status == 421, (host, path)
                    assert "monitor.allowed_hosts" in (await resp.json())["error"]
            async with http.post(f"{url}/dead/replay", json={"ids": [dead_id]},
                                 headers={**auth, "Host": host,
                                          "Origin": f"http://{host}"}) as resp:
                assert resp.status == 421
        assert await redis.xlen(ctx.keys.dead) == 1
        assert refused._value.get() - before == 10  # counted, like every refusal
        # /metrics stays open to any name: Prometheus scrapes by whatever name it is given.
        async with http.get(f"{url}/metrics", headers={"Host": "evil.example"}) as resp:
            assert resp.status == 200

        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"monitor:{port}",
                     f"bridge.example.internal:{port}"):
            async with http.get(f"{url}/status.json", headers={"Host": host}) as resp:
                assert resp.status == 200, host
                assert (await resp.json())["dead"]["total"] == 1
        async with http.post(f"{url}/dead/replay", json={"ids": [dead_id]},
                             headers={**auth, "Host": f"bridge.example.internal:{port}",
                                      "Origin": f"http://bridge.example.internal:{port}"}) as resp:
            assert resp.status == 200, await resp.text()
        assert await redis.xlen(ctx.keys.dead) == 0


async def test_healthz_is_answered_by_the_event_loop(redis: Redis, prefix: str) -> None:
    """A blocked event loop fails /healthz: the probe tests the loop, not a side thread."""
    async with _metrics_port(_monitor_config(prefix, None)) as (url, _ctx):
        outcome: dict[str, Any] = {}
        asked = threading.Event()

        def probe() -> None:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2)
                outcome["answered"] = True
            except (urllib.error.URLError, TimeoutError):
                outcome["answered"] = False
            asked.set()

        thread = threading.Thread(target=probe)
        thread.start()
        # Block the loop until the probe has its answer (or gave up): it cannot be answered.
        assert asked.wait(30)
        thread.join()
        assert outcome == {"answered": False}

        def probe_again() -> bool:
            with urllib.request.urlopen(f"{url}/healthz", timeout=30) as resp:
                return bool(resp.status == 200)

        assert await asyncio.to_thread(probe_again)


# ------------------------------------------------------------------------------- the browser


LATE = "late0000"


@asynccontextmanager
async def _pipeline(cfg: config_mod.Config) -> AsyncIterator[tuple[Context, str]]:
    """The stages as ``blynk-bridge run`` runs them, with the stats publisher and metrics port."""
    ctx = Context.create(cfg)
    stop = asyncio.Event()
    stages: list[Any] = [ingest_mqtt.build(ctx), transform.build(ctx), egress.build(ctx),
                         monitor.build(ctx)]
    stages.append(stats.StatsPublisher(ctx.redis, ctx.keys, f"run@{ctx.consumer}"))
    server = MetricsServer(ctx.redis, StatusBoard(ctx.redis, ctx.keys), stages)
    url = await server.start("127.0.0.1", 0)
    task = asyncio.create_task(run_stages(stages, stop=stop, install_signals=False))
    try:
        yield ctx, url
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await server.close()
        await ctx.close()


async def test_status_page_in_chromium(prefix: str, redis: Redis) -> None:
    if browser.chromium_path() is None:
        pytest.skip(browser.SKIP_REASON)
    app_id = f"page-{secrets.token_hex(4)}"
    emu = emulator()
    async with emu.serve() as urls:
        cfg = bridge_config(urls["fra1"], prefix, app_id)
        cfg = msgspec.structs.replace(cfg, monitor=msgspec.structs.replace(
            cfg.monitor, admin_token=Secret(ADMIN_TOKEN), interval_s=0.5))
        async with _pipeline(cfg) as (ctx, page_url), aiohttp.ClientSession() as http:
            await wait_until(lambda: _connected(ctx, app_id), what="ingest-mqtt connected")
            fleet = Fleet(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=8, rate_per_s=100,
                          device_prefix="fleet")
            # Not in the registry: dead-lettered as unknown_device, replayed later.
            late = Fleet(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=1, rate_per_s=10,
                         device_prefix="late", seed=4)
            await late.run(count=1)
            await wait_until(lambda: _dead_count(redis, ctx), what="the late uplink dead")
            (dead_id, _), = await redis.xrange(ctx.keys.dead)
            dead_id = dead_id.decode()

            async def history_has_data() -> bool:
                # Keep uplinks flowing until a completed 5-second slot holds writes and latency.
                await fleet.run(count=40)
                hist = await stats.read_history(redis, ctx.keys)
                return bool(sum(hist.series("written"))) and bool(sum(hist.series("e2e:count")))

            await wait_until(history_has_data, timeout_s=120, what="a slot with writes")

            async with browser.chromium() as page:
                await page.goto(page_url + "/")

                async def drawn() -> bool:
                    points = await page.eval("""(() => {
                        const n = (s) => Number(document.querySelector(s)?.dataset.points || 0);
                        return [n('#plot-throughput path[data-series=written]'),
                                n('#plot-throughput path[data-series=ingested]'),
                                n('#plot-latency path[data-series=p50]'),
                                n('#plot-latency path[data-series=p99]'),
                                n('#plot-backlog path[data-series=transform]'),
                                n('#plot-backlog path[data-series=egress]')];
                    })()""")
                    return all(p > 0 for p in points)

                await wait_until(drawn, timeout_s=60, what="plots with points")
                # Points alone prove nothing for rates (a slot with no traffic is a 0, drawn on
                # the zero line): the pipeline's writes and uplinks must lift the line above it.
                for series in ("written", "ingested"):
                    assert await _above_zero(page, "plot-throughput", series), series
                if os.environ.get("BB_SCREENSHOT"):  # to look at the page: BB_SCREENSHOT=x.png
                    shot = await page.send("Page.captureScreenshot", format="png",
                                           captureBeyondViewport=True)
                    await asyncio.to_thread(Path(os.environ["BB_SCREENSHOT"]).write_bytes,
                                            base64.b64decode(shot["data"]))
                text = await page.eval("document.body.innerText")
                for expected in ("Connected", cfg.tts[0].name, "uplinks", "transform", "egress",
                                 "200", "unknown_device", dead_id, f"run@{ctx.consumer}"):
                    assert expected in text, expected
                path = await page.eval(
                    "document.querySelector('#plot-throughput path[data-series=written]')"
                    ".getAttribute('d')")
                assert path.startswith("M") and "L" in path

                # The device becomes known; the operator replays its dead uplink from the page.
                emu.model.add_device_spec(DeviceSpec(id=99, name=LATE, token=token_for(LATE),
                                                     template=TEMPLATE))
                await Registry(redis, ctx.keys).register(
                    device_key("tts", cfg.tts[0].name, LATE), token=token_for(LATE),
                    template="kit")
                await page.eval(f"document.getElementById('admin-token').value = "
                                f"'{ADMIN_TOKEN}'")
                await page.eval(f"document.querySelector('button.replay[data-id=\"{dead_id}\"]')"
                                ".click()")

                async def replayed() -> bool:
                    got = await page.eval(
                        "document.getElementById('replay-result').dataset.replayed || ''")
                    return bool(got == "1")

                await wait_until(replayed, what="the page says replayed")
                sent = late.sent[LATE][0]
                assert sent is not None

                async def landed() -> bool:
                    got = await blynk_get(http, urls["fra1"], LATE, ["V10", "V11"])
                    return bool(got.get("v10") == pytest.approx(sent["temperature"]))

                await wait_until(landed, what="the replayed uplink in Blynk")
                assert await redis.xlen(ctx.keys.dead) == 0
                assert page.errors == [], "\n".join(page.errors)


async def _above_zero(page: browser.Page, plot: str, series: str) -> bool:
    """Whether a drawn point of ``series`` lies above the plot's zero line (SVG y grows down)."""
    return bool(await page.eval(f"""(() => {{
        const svg = document.getElementById('{plot}');
        const zero = Number(svg.querySelector('line.axis').getAttribute('y1'));
        const d = svg.querySelector('path[data-series={series}]').getAttribute('d');
        const ys = [...d.matchAll(/[ML][-0-9.]+,([-0-9.]+)/g)].map((m) => Number(m[1]));
        return ys.length > 0 && Math.min(...ys) < zero;
    }})()"""))


HOSTILE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


async def test_outside_text_is_shown_as_text_in_chromium(redis: Redis, prefix: str) -> None:
    """Dead-letter details, device names (unmapped keys) and integration errors come from the
    outside world: the page must show them as text, never turn them into elements."""
    if browser.chromium_path() is None:
        pytest.skip(browser.SKIP_REASON)
    async with _metrics_port(_monitor_config(prefix, ADMIN_TOKEN)) as (url, ctx):
        dead_id = await _dead_uplink(redis, ctx, HOSTILE)
        await redis.hincrby(ctx.keys.unmapped("kit"), HOSTILE, 3)
        await StatusBoard(redis, ctx.keys).failed("particle", "p", f"refused: {HOSTILE}",
                                                  "credentials")
        async with browser.chromium() as page:
            await page.goto(url + "/")

            async def rendered() -> bool:
                return bool(await page.eval("Number(document.body.dataset.renders || 0) > 0"))

            await wait_until(rendered, what="the page rendered /status.json")
            assert await page.eval("document.querySelectorAll('main img, main script').length") == 0
            assert await page.eval("window.__xss === undefined")
            text = await page.eval("document.querySelector('main').innerText")
            assert f"no device {HOSTILE}" in text  # the dead letter's detail
            assert text.count(HOSTILE) >= 3, text  # + the unmapped key and the last error
            assert dead_id in text
            # No traffic: the throughput plot has its points, all on the zero line.
            assert await page.eval(
                "Number(document.querySelector('#plot-throughput path[data-series=written]')"
                ".dataset.points) > 0")
            assert not await _above_zero(page, "plot-throughput", "written")
            assert page.errors == [], "\n".join(page.errors)


async def _connected(ctx: Context, app_id: str) -> bool:
    status = await StatusBoard(ctx.redis, ctx.keys).get("tts", ctx.config.tts[0].name)
    return status is not None and status.state == "Connected"


async def _dead_count(redis: Redis, ctx: Context) -> bool:
    return bool(await redis.xlen(ctx.keys.dead))


# ------------------------------------------------------------------ as the command runs it


async def test_every_stage_process_serves_healthz_and_the_monitor_its_page(
    prefix: str, redis: Redis, tmp_path: Path
) -> None:
    """``blynk-bridge <stage>`` with ``metrics.port``: /healthz for every stage, the page on the
    monitor's port only, and each process listed among the replicas alive."""
    ports = {"monitor": free_port(), "transform": free_port()}
    procs: dict[str, asyncio.subprocess.Process] = {}
    logs = {}
    try:
        for stage, port in ports.items():
            path = tmp_path / f"{stage}.yaml"
            path.write_text(f"""
redis: {{url: "redis://127.0.0.1:6379/0", prefix: "{prefix}"}}
metrics: {{host: 127.0.0.1, port: {port}}}
streams: {{block_ms: 200}}
monitor: {{interval_s: 0.5}}
""")
            logs[stage] = (tmp_path / f"{stage}.log").open("wb")
            procs[stage] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "blynk_bridge", stage, "-c", str(path),
                env=os.environ | {"PYTHONPATH": str(Path.cwd())}, stderr=logs[stage])
        async with aiohttp.ClientSession() as http:
            async def answers(url: str) -> int:
                try:
                    async with http.get(url) as resp:
                        return resp.status
                except aiohttp.ClientConnectionError:
                    return 0

            for stage, port in ports.items():
                await wait_until(lambda u=f"http://127.0.0.1:{port}/healthz": _is_200(answers(u)),
                                 what=f"{stage} /healthz")
            assert await answers(f"http://127.0.0.1:{ports['monitor']}/") == 200
            assert await answers(f"http://127.0.0.1:{ports['transform']}/") == 404

            async def both_alive() -> bool:
                async with http.get(f"http://127.0.0.1:{ports['monitor']}/status.json") as resp:
                    page = await resp.json()
                names = {r["name"].split("@")[0] for r in page["replicas"]}
                return names == {"monitor", "transform"}

            await wait_until(both_alive, what="both processes among the replicas alive")
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for stage, proc in procs.items():
            assert await asyncio.wait_for(proc.wait(), 60) == 0, stage
        # A process that stopped says so: it leaves the replicas set.
        assert await stats.replicas_alive(redis, Keys(prefix)) == []
    except BaseException:
        for stage in procs:
            print(stage, (tmp_path / f"{stage}.log").read_text()[-3000:])  # shown on failure
        raise
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for log in logs.values():
            log.close()


async def _is_200(status: Awaitable[int]) -> bool:
    return await status == 200
