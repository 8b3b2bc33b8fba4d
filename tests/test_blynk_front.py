"""The emulator's HTTP front against aiohttp: the same bytes on the wire, the same state after.

Every scenario runs twice on fresh emulators built from one spec with one fixed clock: once
behind the front (``serve()``), once with every request through aiohttp (``front=False``). The
raw answers (``Date`` aside), the request log, the counters, the devices' state and the
webhooks fired must be equal; ``front_counts()`` shows which requests the front answered itself.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import uvloop
from aiohttp import web

from emulators.blynk import BlynkEmulator, WebhookSpec
from emulators.blynk.front import HAND_OVER, WAIT, FrontServer, Reply, _Heads
from emulators.blynk.settings import RegionSpec
from tests.conftest import serve_app
from tests.test_blynk_emulator import NY_TOKEN, TEMPLATE, TOKEN, spec
from tests.test_blynk_webhooks import Receiver
from tests.wait import within

CLOCK = 1_763_000_000.0
NY_URL = "http://ny3.example:8082"

#: One step of a scenario: bytes are written, an int reads that many answers, None reads to
#: the end of the connection (one "answer"), a function acts on the emulator in between.
Step = bytes | int | None | Callable[[BlynkEmulator], None]


def get(target: str, headers: str = "Host: emu\r\n") -> bytes:
    return f"GET {target} HTTP/1.1\r\n{headers}\r\n".encode()


def batch(query: str) -> bytes:
    return get(f"/external/api/batch/update?{query}")


@dataclass
class Outcome:
    answers: list[bytes]
    state: dict[str, Any]
    front: dict[str, int]


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return head + body


def without_date(answer: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n",
                  b"\r\nDate: *\r\n", answer)


async def play(steps: list[Step], *, front: bool, hook_url: str | None = None,
               **settings: Any) -> Outcome:
    base = spec(**settings)
    hooks = [WebhookSpec(name="v2", url=f"{hook_url}/hook?v={{device_pinValue}}", method="GET",
                         template=TEMPLATE, datastream="V2", rate_per_min=1000)] if hook_url else []
    emu = BlynkEmulator.from_spec(msgspec.structs.replace(
        base, regions={"fra1": 0, "ny3": RegionSpec(port=0, public_url=NY_URL)}, webhooks=hooks),
        clock=lambda: CLOCK)
    answers: list[bytes] = []
    async with emu.serve({"fra1": 0, "ny3": 0}, front=front) as urls:
        host, port = urls["fra1"].removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        for step in steps:
            if isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
            elif isinstance(step, int):
                answers += [await read_answer(reader) for _ in range(step)]
            elif step is None:
                answers.append(await reader.read())
            else:
                step(emu)
        writer.close()
        await emu.webhooks.drain()
    state = {"requests": emu.recorded(), "counts": emu.counts(),
             "devices": [emu.device_state(d) for d in emu.model.devices.values()],
             "webhooks": emu.webhooks.stats(), "faults": emu.faults.injected}
    return Outcome([without_date(a) for a in answers], state, emu.front_counts())


async def compare(steps: list[Step], **kwargs: Any) -> Outcome:
    """Play the scenario behind the front and through aiohttp; both must come out the same."""
    fast = await play(steps, front=True, **kwargs)
    slow = await play(steps, front=False, **kwargs)
    assert slow.front == {"answered": 0, "handed_over": 0}
    assert fast.answers == slow.answers
    assert fast.state == slow.state
    return fast


# --- every answer of the device API's GETs --------------------------------------------------

REQUESTS = [
    batch(f"token={TOKEN}&V1=24.1&v2=54&V3=-73.8731,40.8414&v4=hi%20there"),
    batch(f"token={TOKEN}&V3=-73.8731%2C40.8414&v4=a+b%2Bc%26d%3De&v2=7"),
    batch(f"token={TOKEN}&v4=%zz%E2%82%C3%A9&V3=1.5&V3=2.5"),
    batch("token=nope&v1=1"),
    batch("v1=1"),
    batch(f"token={TOKEN}&foo=1"),
    batch(f"token={TOKEN}&v99=1"),
    batch(f"token={TOKEN}&v1=2&v2=x"),
    batch(f"token={TOKEN}"),
    batch(f"token={NY_TOKEN}&v1=1&v2=2"),
    get(f"/external/api/isHardwareConnected?token={NY_TOKEN}"),
    get(f"/external/api/update?token={TOKEN}&v2=50"),
    get(f"/external/api/update?token={TOKEN}&V2=314"),
    get(f"/external/api/update?token={TOKEN}&dataStreamId=3&value=-73.8731&value=40.8414"),
    get(f"/external/api/update?token={TOKEN}&pin=V3&value=1.5&value=2.5"),
    get(f"/external/api/update?token={TOKEN}&dataStreamId=x&value=1"),
    get(f"/external/api/update?token={TOKEN}&v5=9"),
    get(f"/external/api/update?token={TOKEN}&v4={'x' * 1025}"),
    get(f"/external/api/get?token={TOKEN}&v1"),
    get(f"/external/api/get?token={TOKEN}&v1&v2&v3&v4"),
    get(f"/external/api/get?token={TOKEN}&dataStreamId=1"),
    get(f"/external/api/get?token={TOKEN}&pin=V4"),
    get(f"/external/api/get?token={TOKEN}&v6"),
    get(f"/external/api/get?token={TOKEN}&v9"),
    get(f"/external/api/get?token={TOKEN}&bogus"),
    get(f"/external/api/getAll?token={TOKEN}"),
    get("/external/api/getAll?token=nope"),
    get(f"/external/api/isHardwareConnected?token={TOKEN}"),
    get(f"/external/api/logEvent?token={TOKEN}&code=firmware_update&description=a%20b"),
    get(f"/external/api/logEvent?token={TOKEN}"),
    get(f"/external/api/logEvent?token={TOKEN}&code=nope"),
    get(f"/external/api/update/property?token={TOKEN}&pin=v1&isDisabled=true&label=Hot"),
    get(f"/external/api/update/property?token={TOKEN}&pin=v1&isDisabled=maybe"),
    get(f"/external/api/device/meta/update?token={TOKEN}&metaFieldId=3&value=Sample+value"),
    get(f"/external/api/device/meta?token={TOKEN}&metaFieldId=3"),
    get(f"/external/api/device/meta?token={TOKEN}&metaFieldId=Device%20Name"),
    get(f"/external/api/device/meta?token={TOKEN}"),
    get(f"/external/api/device/meta/update?token={TOKEN}&metaFieldId=99&value=1"),
    get(f"/external/api/get?token={TOKEN}&v2",
        "host: emu\r\nUser-Agent: blynk-bridge\r\nAccept:  */*  \r\nX-Trace:\r\n"),
    get(f"/external/api/get?token={TOKEN}&v1?x=1&v2"),
]


async def test_each_answer_one_at_a_time_on_one_keep_alive_connection() -> None:
    steps: list[Step] = []
    for request in REQUESTS:
        steps += [request, 1]
    fast = await compare(steps)
    assert fast.front == {"answered": len(REQUESTS), "handed_over": 0}
    assert b"HTTP/1.1 308 Permanent Redirect\r\nLocation: " + NY_URL.encode() in fast.answers[9]


async def test_connection_keep_alive_is_answered_by_the_front() -> None:
    """What Node.js clients (the Node-RED baseline of bench/e2e.py) send on every request."""
    v1 = f"/external/api/get?token={TOKEN}&v1"
    steps: list[Step] = []
    for headers in ("Host: emu\r\nConnection: keep-alive\r\n",
                    "connection:Keep-Alive \r\nHost: emu\r\n"):
        steps += [get(v1, headers), 1]
    fast = await compare(steps)
    assert fast.front == {"answered": 2, "handed_over": 0}
    assert all(b"\r\nConnection" not in a for a in fast.answers)  # as aiohttp: none on 1.1


async def test_pipelined_requests_in_one_write() -> None:
    fast = await compare([b"".join(REQUESTS), len(REQUESTS)])
    assert fast.front == {"answered": len(REQUESTS), "handed_over": 0}


async def test_webhooks_fire_the_same(receiver_url: str) -> None:
    steps: list[Step] = [batch(f"token={TOKEN}&v2={n}&v1=1") for n in range(5)] + [5]
    fast = await compare(steps, hook_url=receiver_url)
    assert fast.state["webhooks"]["v2"]["ok"] == 5


@pytest.fixture
async def receiver_url() -> Any:
    async with serve_app(Receiver().app()) as url:
        yield url


async def test_rate_limit_and_daily_quota() -> None:
    once = batch(f"token={TOKEN}&v2=1")
    fast = await compare([once, 1, once, 1, once + once, 2], device_rps=1)
    assert [a.split(b" ", 2)[1] for a in fast.answers] == [b"200", b"429", b"429", b"429"]
    fast = await compare([once, once, once, 3], device_rps=None, daily_updates=2,
                         over_limit_status=403, over_limit_message="Quota.", retry_after_s=9)
    assert b"Retry-After: 9\r\n" in fast.answers[2]
    assert fast.front == {"answered": 3, "handed_over": 0}


async def test_request_split_over_several_writes() -> None:
    first, second = REQUESTS[0], REQUESTS[1]
    # the first answer proves the front has read (and kept) a partial head of the second
    steps: list[Step] = [first + second[:7], 1, second[7:30], second[30:-1], second[-1:], 1]
    fast = await compare(steps)
    assert fast.front == {"answered": 2, "handed_over": 0}
    tail_bytes = [second[i:i + 1] for i in range(len(second) - 3, len(second))]  # \r\n\r\n
    steps = [first + second[:-3], 1, *tail_bytes, 1]
    assert (await compare(steps)).front == {"answered": 2, "handed_over": 0}


# --- hand-overs to aiohttp ------------------------------------------------------------------


async def test_post_after_gets_goes_to_aiohttp_on_the_same_connection() -> None:
    body = f"[[{int(CLOCK * 1000) - 1000},1.5],[{int(CLOCK * 1000)},2.5]]".encode()
    post = (f"POST /external/api/batch/update?token={TOKEN}&pin=v1 HTTP/1.1\r\nHost: emu\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    steps: list[Step] = [REQUESTS[0], 1, REQUESTS[1], 1, post + body, 1, REQUESTS[2], 1,
                         REQUESTS[0] + post + body + REQUESTS[3], 3]
    fast = await compare(steps)
    assert fast.front == {"answered": 2, "handed_over": 1}
    assert fast.answers[2].endswith(b"\r\n\r\nOK")


async def test_unusual_requests_go_to_aiohttp() -> None:
    v1 = f"/external/api/get?token={TOKEN}&v1"
    close = get(v1, "Host: emu\r\nConnection: close\r\n")
    kept_alive = [  # aiohttp answers and keeps the connection
        get("/external/api/nothing?x=1"),  # 404
        get(f"/external/api/%67et?token={TOKEN}&v1"),  # the path aiohttp decodes is a route
        get(f"{v1}#fragment"),
        get(v1, "Host: emu\r\nX-A: 1\r\nx-a: 2\r\n"),
        get(v1, "Host: emu\r\nConnection: keep-alive, Upgrade\r\n"),
        get(v1, "Host: emu\r\nConnection: Keep-Alive\r\nConnection: keep-alive\r\n"),
        get(v1, "Host: emu\r\nContent-Length: 0\r\n"),
        get(v1, "Host: emu\r\nExpect: 100-continue\r\n"),
        get(v1, "Host: emu\r\nX-Bin: \xe9\r\n"),
        get(f"/_admin/counts?token={TOKEN}"),
        get("/api/v1/organization/devices"),  # 401
        get(f"{v1}&{'v1&' * 3000}"),  # a head longer than the front reads
    ]
    closed = [  # aiohttp answers and closes
        get(v1, "Host: a\r\nHost: b\r\n"),  # 400
        get(v1, ""),  # no Host: 400
        get(v1, "Host : emu\r\n"),  # 400
        f"GET {v1} HTTP/1.0\r\n\r\n".encode(),
        close,
        f"GET {v1} HTTP/1.1\r\nBad Header: x\r\n".encode(),  # 400 before the head ends
        f"HEAD {v1} HTTP/1.1\r\nHost: emu\r\n\r\n".encode() + close,  # 405, no body
    ]
    for request in kept_alive + closed:
        fast = await compare([REQUESTS[0], 1, request, 1 if request in kept_alive else None])
        assert fast.front == {"answered": 1, "handed_over": 1}, request


async def test_oversize_request_line_answered_by_aiohttp() -> None:
    long_get = get(f"/external/api/get?token={TOKEN}&v1&x={'y' * 5000}")
    fast = await compare([REQUESTS[0], 1, long_get, None], max_request_bytes=4096)
    assert fast.answers[1].startswith(b"HTTP/1.0 400 Bad Request\r\n")  # aiohttp's
    assert fast.front == {"answered": 1, "handed_over": 1}


async def test_faults_on_hand_the_connection_to_aiohttp() -> None:
    def on(emu: BlynkEmulator) -> None:
        emu.faults.set(error_rate=1.0, error_status=502)

    def off(emu: BlynkEmulator) -> None:
        emu.faults.clear()

    steps: list[Step] = [REQUESTS[0], 1, on, REQUESTS[0], 1, off, REQUESTS[1], 1]
    fast = await compare(steps)
    assert fast.answers[1].startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert fast.front == {"answered": 1, "handed_over": 1}
    fast = await compare([on, REQUESTS[0], REQUESTS[1], 2])
    assert fast.front == {"answered": 0, "handed_over": 1}


class _BrokenTokens(dict[str, Any]):
    """A token table whose lookup fails: an emulator bug, as the handler sees it."""

    def get(self, *args: Any) -> Any:
        raise RuntimeError("emulator bug")


def _break(emu: BlynkEmulator) -> None:
    emu.model.by_token = _BrokenTokens(emu.model.by_token)


async def test_handler_error_is_aiohttp_500_and_closes() -> None:
    target = f"/external/api/get?token={TOKEN}&v1"
    for headers in ("Host: emu\r\n", "Host: emu\r\nAccept: text/html\r\n"):
        fast = await compare([REQUESTS[0], 1, _break, get(target, headers) + REQUESTS[1], None])
        assert fast.answers[1].startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert fast.front == {"answered": 1, "handed_over": 0}


async def test_shutdown_closes_idle_front_connections() -> None:
    emu = BlynkEmulator.from_spec(spec(), clock=lambda: CLOCK)
    async with emu.serve({"fra1": 0, "ny3": 0}) as urls:
        host, port = urls["fra1"].removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(REQUESTS[0])
        await read_answer(reader)
    assert await reader.read() == b""
    writer.close()
    assert emu.front_counts() == {"answered": 1, "handed_over": 0}


async def test_idle_connections_close_after_keepalive_timeout() -> None:
    """The front keeps aiohttp's idle rule: an idle connection (a partial head is idle too)
    closes after ``keepalive_timeout``; here a short one, on a FrontServer of its own."""

    async def never(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError("the front answers every request of this test")

    def answer(path: str, query: str, raw_path: str) -> Reply:
        return Reply(200, b"ok", (("Content-Type", "text/plain"),))

    server = FrontServer(never, answer=answer, access_log=None, keepalive_timeout=0.05)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for after in (b"", b"GET /par"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/x") + after)
            assert (await read_answer(reader)).endswith(b"\r\n\r\nok")
            assert await within(reader.read()) == b""  # closed by the server
            writer.close()
    finally:
        await runner.cleanup()
    assert (server.answered, server.handed_over) == (2, 0)


def test_front_under_uvloop() -> None:
    async def both() -> None:
        steps: list[Step] = [b"".join(REQUESTS[:5]) + REQUESTS[5][:9], 5, REQUESTS[5][9:], 1,
                             get("/external/api/nothing"), 1, REQUESTS[0], 1]
        assert (await compare(steps)).front == {"answered": 6, "handed_over": 1}

    uvloop.run(both())


# --- reading heads with llhttp ------------------------------------------------------------


def heads() -> _Heads:
    """A head reader with aiohttp's default limits, as a front connection has one."""
    return _Heads(max_head=8190, max_headers=32768)


@pytest.mark.parametrize("head", [
    REQUESTS[0], REQUESTS[-1], get("/"), get("/a?b", "H: \r\nhost:x\t\r\n"),
])
def test_every_prefix_of_a_simple_head_is_waited_for(head: bytes) -> None:
    assert heads().next(head, 0, 0) == (len(head), len(head))
    for n in range(1, len(head)):  # the same head arriving as two reads
        reader = heads()
        assert reader.next(head[:n], 0, 0) == (WAIT, n), head[:n]
        assert reader.next(head, 0, n) == (len(head), len(head)), head[:n]


@pytest.mark.parametrize("prefix", [
    b"GET /a\x00", b"GET /a HTTP/1.1\n", b"GET /a HTTP/1.1\r\nHost : x",
    b"GET /a HTTP/1.1\r\n:x", b"GET /a HTTP/1.1\r\nA: \x01", b"GET /a HTTP/1.1\r\nA: b\n",
    b"GET /a HTTP/1.1\r\n\r\r", b"GET /a HTTP/1.1\r\nX: 1\r\n\tfold\r\n", b"GET /\xe9",
])
def test_a_head_llhttp_refuses_goes_to_aiohttp_at_once(prefix: bytes) -> None:
    assert heads().next(prefix, 0, 0)[0] == HAND_OVER


@pytest.mark.parametrize("head", [
    b"POST /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET x HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /a#f HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a{ HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /a HTTP/1.1\r\nA: \xe9\r\nHost: x\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n",
    b"\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_a_complete_head_that_is_not_simple_goes_to_aiohttp(head: bytes) -> None:
    """What llhttp accepts so far is waited for; once whole, anything but the simple case is
    aiohttp's (with every byte of it)."""
    assert heads().next(head, 0, 0)[0] == HAND_OVER
