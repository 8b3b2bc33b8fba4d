"""Smoke test of ``bench/fuzz.py``: a few hundred hostile and semi-valid inputs through the real
stages (ingest-http, ingest-mqtt on the test Mosquitto, transform, egress to the Blynk
emulator, monitor) end with no 5xx, no logged error, no dead stage, every MQTT message
accounted for, the streams drained and the run's Redis keys deleted. The 100,000-input figure
is in BENCHMARKS.md."""

from __future__ import annotations

from bench import fuzz
from bench.fuzz_inputs import Fixtures, Generator, HttpCase, MqttCase
from tests.conftest import MQTT_PORT, REDIS_URL


def test_the_generator_is_reproducible_from_its_seed() -> None:
    pools = fuzz.with_tokens(fuzz.make_pools("app"))
    fixtures = Fixtures.load()

    def first(seed: int) -> list[HttpCase | MqttCase]:
        gen = Generator(seed, fixtures, pools, max_body=fuzz.MAX_BODY,
                        max_payload=fuzz.MAX_PAYLOAD, mqtt_share=0.3, now_ms=1_800_000_000_000)
        return [gen.next() for _ in range(200)]

    a, b = first(7), first(7)
    assert a == b
    assert a != first(8)
    kinds = {c.kind.split("+")[0] for c in a}
    assert {"mqtt", "envelope", "tts", "custom"} <= kinds


async def test_a_small_fuzz_run_has_no_5xx_no_errors_and_loses_nothing() -> None:
    result = await fuzz.run(fuzz.Options(count=300, seed=3, concurrency=16,
                                         mqtt_port=MQTT_PORT, redis_url=REDIS_URL,
                                         drain_timeout_s=60, progress=False))
    assert result.inputs == 300
    assert result.http_5xx == 0, result.first_5xx
    assert result.errors_logged == 0 and result.loop_exceptions == 0, result.first_errors
    assert result.crashes == 0, result.first_errors
    assert result.mqtt_published > 0 and result.mqtt_unaccounted == 0, result.mqtt
    assert result.drained
    assert sum(result.http.values()) + sum(result.transport_errors.values()) \
        + result.mqtt_published == 300
    assert result.keys_deleted > 0
