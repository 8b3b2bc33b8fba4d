"""The Blynk emulator's device MQTT API, driven by paho (the locked MQTT client), so the
emulator's framing (shared with the bridge's lean client) is checked by an independent one."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from emulators.blynk import BlynkEmulator, DatastreamSpec, DeviceSpec, EmulatorSpec, TemplateSpec
from tests.wait import wait_until

T_FRA = "fra1-token-000000000000000000000"
T_NY = "ny3-token-0000000000000000000000"


def spec() -> EmulatorSpec:
    tmpl = TemplateSpec(id="TMPL01", name="Valve", datastreams=[
        DatastreamSpec(id=1, pin="V1", name="Switch", type="integer", min=0, max=1),
        DatastreamSpec(id=2, pin="V2", name="Temperature", type="double"),
        DatastreamSpec(id=3, pin="V3", name="Where", type="location"),
    ])
    return EmulatorSpec(regions={"fra1": 0, "ny3": 0}, templates=[tmpl], devices=[
        DeviceSpec(name="a", token=T_FRA, template="TMPL01", id=1, region="fra1"),
        DeviceSpec(name="b", token=T_NY, template="TMPL01", id=2, region="ny3"),
    ])


class Device:
    """A paho client as a Blynk device: records CONNACK, messages and disconnects."""

    def __init__(self, token: str) -> None:
        self.lock = threading.Lock()
        self.connack: list[str] = []
        self.messages: list[tuple[str, bytes]] = []
        self.disconnects = 0
        self.subscribed = False
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv311)
        c.username_pw_set("device", token)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        self.client = c

    def _on_connect(self, c: paho.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.lock:
            self.connack.append(str(rc))
        if not rc.is_failure:
            c.subscribe("downlink/#")

    def _on_subscribe(self, c: paho.Client, u: Any, mid: Any, rcs: Any, props: Any) -> None:
        self.subscribed = True

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def _on_disconnect(self, c: paho.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnects += 1

    def start(self, address: tuple[str, int]) -> Device:
        self.client.reconnect_delay_set(60, 120)  # one connection per test step
        self.client.connect(address[0], address[1], keepalive=45)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def got(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == topic]


@pytest.fixture
async def emu() -> AsyncIterator[BlynkEmulator]:
    e = BlynkEmulator.from_spec(spec())
    async with e.serve({"fra1": 0, "ny3": 0}, mqtt=True):
        yield e


async def test_bad_token_gets_connack_4(emu: BlynkEmulator) -> None:
    d = Device("not-a-token").start(emu.mqtt.addresses["fra1"])
    try:
        await wait_until(lambda: d.connack, what="CONNACK")
        assert d.connack == ["Bad user name or password"]
        assert emu.mqtt.stats["bad_credentials"] == 1
    finally:
        d.stop()


async def test_app_writes_come_down_and_device_writes_go_up(emu: BlynkEmulator) -> None:
    d = Device(T_FRA).start(emu.mqtt.addresses["fra1"])
    try:
        await wait_until(lambda: d.subscribed, what="subscribed")
        emu.app_write(1, "V1", 1)
        emu.app_write(1, "V3", [2.35, 48.85])
        await wait_until(lambda: d.got("downlink/ds/Where"), what="location downlink")
        assert d.got("downlink/ds/Switch") == [b"1"]
        assert d.got("downlink/ds/Where") == [b"2.35\x0048.85"]
        d.client.publish("ds/Temperature", b"21.5", qos=1)
        d.client.publish("batch_ds", b'{"Temperature": 22.5, "Where": [1.0, 2.0]}')
        d.client.publish("info/mcu", b'{"tmpl":"TMPL01","ver":"1.0.2"}')
        dev = emu.model.devices[1]
        await wait_until(lambda: emu.mqtt.mcu.get(1), what="info/mcu")
        assert dev.values["V2"][0] == 22.5 and dev.origins["V2"] == "device"
        assert dev.values["V3"][0] == [1.0, 2.0]
        assert emu.mqtt.mcu[1]["ver"] == "1.0.2"
        assert d.got("downlink/ds/Temperature") == []  # no echo of the device's own writes
        d.client.publish("get/ds/all", b"")
        await wait_until(lambda: d.got("downlink/ds/Temperature"), what="get/ds/all answers")
        assert d.got("downlink/ds/Temperature") == [b"22.5"]
        assert d.got("downlink/ds/Switch") == [b"1", b"1"]
    finally:
        d.stop()


async def test_device_of_another_region_is_redirected(emu: BlynkEmulator) -> None:
    d = Device(T_NY).start(emu.mqtt.addresses["fra1"])
    try:
        await wait_until(lambda: d.got("downlink/redirect"), what="redirect")
        host, port = emu.mqtt.addresses["ny3"]
        assert d.got("downlink/redirect") == [f"{host}:{port}".encode()]
        assert T_NY not in emu.mqtt.sessions
    finally:
        d.stop()
    d2 = Device(T_NY).start(emu.mqtt.addresses["ny3"])
    try:
        await wait_until(lambda: d2.subscribed, what="subscribed in its region")
        assert emu.mqtt.stats["connects"] == 1
    finally:
        d2.stop()


async def test_second_client_of_a_token_disconnects_the_first(emu: BlynkEmulator) -> None:
    first = Device(T_FRA).start(emu.mqtt.addresses["fra1"])
    second = Device(T_FRA)
    try:
        await wait_until(lambda: first.subscribed, what="first subscribed")
        second.start(emu.mqtt.addresses["fra1"])
        await wait_until(lambda: first.disconnects, what="first disconnected")
        await wait_until(lambda: second.subscribed, what="second subscribed")
        emu.app_write(1, "V1", 0)
        await wait_until(lambda: second.got("downlink/ds/Switch"), what="downlink to the newer")
        assert first.got("downlink/ds/Switch") == []
        assert emu.mqtt.stats["kicked"] == 1
    finally:
        first.stop()
        second.stop()
