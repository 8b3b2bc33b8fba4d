"""pipeline/mqtt.py's fast path and its fallback, against the real Mosquitto."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from pipeline import metrics, mqtt
from tests.conftest import MQTT_HOST, MQTT_PORT
from tests.wait import within

SETTINGS = mqtt.Settings(MQTT_HOST, MQTT_PORT, timeout_s=5)


class _Without:
    """``target`` with one attribute hidden: an aiomqtt whose internals moved, as seen by the
    probe."""

    def __init__(self, target: object, hidden: str) -> None:
        self._target, self._hidden = target, hidden

    def __getattr__(self, name: str) -> Any:
        if name == self._hidden:
            raise AttributeError(name)
        return getattr(self._target, name)


class _Moved(mqtt.Session):
    """A session whose aiomqtt client lacks ``hidden`` when the fast path is probed."""

    hidden = "_disconnected"

    def _install_fast_path(self, client: Any) -> None:
        super()._install_fast_path(_Without(client, self.hidden))


def fast_path_gauge() -> float:
    value: float = metrics.MQTT_FAST_PATH._value.get()
    return value


async def receive(session_type: type[mqtt.Session]) -> tuple[bool, float, list[bytes]]:
    """Subscribe with a session of ``session_type``, publish 50 messages from another one,
    and return whether the fast path was on, the gauge, and what arrived."""
    topic = f"bbt/{uuid.uuid4().hex[:10]}/up"
    got: list[bytes] = []
    async with session_type(SETTINGS) as session:
        fast, gauge = session.fast_path, fast_path_gauge()
        await session.subscribe([topic])
        async with mqtt.Session(SETTINGS) as sender:
            for n in range(50):
                await sender.publish(topic, str(n).encode())

        async def read() -> None:
            async for _, payload in session.messages():
                got.append(payload)
                if len(got) == 50:
                    return

        await within(read())
    return fast, gauge, got


async def test_the_fast_path_is_on_with_the_pinned_versions() -> None:
    fast, gauge, got = await receive(mqtt.Session)
    assert (fast, gauge) == (True, 1)
    assert got == [str(n).encode() for n in range(50)]


@pytest.mark.parametrize("hidden", ["_disconnected", "_client"])
async def test_missing_internals_fall_back_to_aiomqtts_iterator(
        hidden: str, caplog: pytest.LogCaptureFixture) -> None:
    moved = type("Moved", (_Moved,), {"hidden": hidden})
    caplog.set_level(logging.WARNING, logger="pipeline.mqtt")
    fast, gauge, got = await receive(moved)
    assert (fast, gauge) == (False, 0)
    assert got == [str(n).encode() for n in range(50)]  # every message, in order, still
    (record,) = caplog.records
    assert "fast path off" in record.getMessage() and hidden.lstrip("_") in record.getMessage()


class _Paho:
    """The shape of paho's client the fast path needs."""

    def __init__(self) -> None:
        self._sock: object = None
        self._in_packet: dict[str, int] = {"command": 0}
        self._protocol = 4

    @property
    def on_message(self) -> None:
        return None

    @on_message.setter
    def on_message(self, value: object) -> None:
        pass


class _ReadOnly(_Paho):
    @property
    def on_message(self) -> None:
        return None


async def test_the_probe_names_what_is_missing() -> None:
    paho = _Paho()
    client = _Without(object(), "")
    assert mqtt.fast_path_missing(client) == (
        "aiomqtt.Client._disconnected is not an asyncio.Future")
    client.__dict__.update(_disconnected=asyncio.get_running_loop().create_future(),
                           _client=paho)
    assert mqtt.fast_path_missing(client) == "paho Client._sock is not a connected socket"
    paho._sock = type("Sock", (), {"recv": print, "send": print, "fileno": print})()
    assert mqtt.fast_path_missing(client) is None
    paho._in_packet = {}
    assert mqtt.fast_path_missing(client) == (
        "paho Client._in_packet is not a dict with a 'command'")
    client.__dict__["_client"] = _ReadOnly()
    assert mqtt.fast_path_missing(client) == "paho Client.on_message is not a settable property"
