"""The built-in model ``blynk-bridge emulate blynk`` serves when no ``-c FILE`` is given.

The same content as ``blynk_bridge/examples/blynk-emulator.yaml``: one template shaped like
Blynk's TTS guide example (temperature, humidity, speed enum, location, RSSI/SNR system
datastreams), the two integration metafields, three devices with fixed tokens, and the demo OAuth
client.
"""

from __future__ import annotations

from emulators.blynk.model import DatastreamSpec, DeviceSpec, MetafieldSpec, TemplateSpec
from emulators.blynk.settings import EmulatorSpec, OAuthClient

DEMO_TEMPLATE = "TMPL4demo0001"


def demo_token(n: int) -> str:
    """32-character demo tokens: ``demo0000…0001``."""
    return f"demo{n:028d}"


def demo_spec() -> EmulatorSpec:
    template = TemplateSpec(
        id=DEMO_TEMPLATE,
        name="Weather Station",
        datastreams=[
            DatastreamSpec(id=1, pin="V0", name="temperature", type="double", min=-100, max=100,
                           units="Celsius"),
            DatastreamSpec(id=2, pin="V1", name="humidity", type="integer", min=0, max=100,
                           default=0),
            DatastreamSpec(id=3, pin="V2", name="speed", type="enum",
                           options={1: "low", 2: "medium", 3: "high"}, fallback=1),
            DatastreamSpec(id=4, pin="V3", name="location", type="location"),
            DatastreamSpec(id=5, pin="V4", name="state", type="string"),
            DatastreamSpec(id=6, pin="V5", name="RSSI", type="integer", min=-110, max=0),
            DatastreamSpec(id=7, pin="V6", name="SNR", type="double", min=1, max=30),
            DatastreamSpec(id=8, pin="V7", name="led", type="integer", min=0, max=1),
        ],
        metafields=[
            MetafieldSpec(id=1, name="Device Name", type="DeviceName"),
            MetafieldSpec(id=2, name="TheThingsNetwork Device"),
            MetafieldSpec(id=3, name="Particle Device"),
        ],
        events=["high_temp", "firmware_update"],
    )
    devices = [DeviceSpec(name=f"Station {n}", token=demo_token(n), template=DEMO_TEMPLATE, id=n)
               for n in (1, 2, 3)]
    return EmulatorSpec(
        regions={"fra1": 8081},
        templates=[template],
        devices=devices,
        oauth_clients=[OAuthClient(client_id="demo-client", client_secret="demo-secret")],
    )
