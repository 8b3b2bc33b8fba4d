"""The two key layouts of :mod:`pipeline.keys`: one Redis keeps its names; in the cluster layout
every key a script touches with others lands in its device's partition slot."""

from __future__ import annotations

from redis.crc import key_slot

from pipeline.keys import UPLINKS, WRITES, Keys
from pipeline.registry import token_device_key


def test_one_redis_names_are_unchanged() -> None:
    keys = Keys("bb:")
    assert keys.stream(UPLINKS) == keys.stream_for(UPLINKS, "tts", "d") == "bb:uplinks"
    assert Keys("bb:", 3).stream(UPLINKS, 2) == "bb:{uplinks:2}"
    assert keys.dead == keys.dead_for("bb:uplinks") == "bb:dead"
    assert keys.dead_streams() == ["bb:dead"]
    assert keys.device("tts", "app", "d") == "bb:dev:tts:app:d"
    assert keys.registry_version() == keys.registry_version_for("bb:uplinks") == \
        "bb:registry:version"
    assert keys.registry_changes() == "bb:registry:changes"
    assert keys.last_written("tts:app:d") == "bb:lw:tts:app:d"
    assert keys.records(0) == "bb:records:0"
    assert keys.rate("tts:app:d") == "bb:rate:tts:app:d"
    assert keys.label("bb:{uplinks:2}") == "uplinks:2"
    assert keys.device_prefixes() == ["bb:dev:"]


def test_a_devices_keys_share_its_partition_slot_in_the_cluster_layout() -> None:
    keys = Keys("bb:", 6, cluster=True)
    slots_used = set()
    for n in range(40):
        device = f"dev-{n}"
        key = f"tts:app:{device}"
        p = keys.partition_of("tts", device)
        up = keys.stream_for(UPLINKS, "tts", device)
        assert up.startswith(f"bb:{{p{p}.") and keys.partition_of_stream(up) == p
        same = [up, keys.stream_for(WRITES, "tts", device), keys.dead_for(up),
                keys.dedup(up), keys.device("tts", "app", device),
                keys.registry_version_for(up), keys.registry_changes(p),
                keys.records(p), keys.egress_lease(p), keys.last_written(key), keys.rate(key),
                keys.last_written(token_device_key(key, "tok")),
                keys.rate(token_device_key(key, "tok"))]
        assert len({key_slot(k.encode()) for k in same}) == 1, same
        slots_used.add(key_slot(up.encode()))
        assert keys.label(up) == f"uplinks:{p}"
        assert keys.device("tts", "app", device) == keys.device_prefixes()[p] + key
    assert len(slots_used) == 6
    assert keys.provision_rate("tts", "app") != keys.provisioned("tts", "app")
    assert key_slot(keys.provision_rate("tts", "app").encode()) == \
        key_slot(keys.provisioned("tts", "app").encode())
    assert keys.dead_streams() == ["bb:dead", *(keys.dead_for(keys.stream(UPLINKS, p))
                                                for p in range(6))]


def test_partitions_spread_evenly_over_the_slot_space() -> None:
    """Three masters with the default equal slot ranges get P/3 partitions each."""
    for partitions in (3, 6, 12):
        keys = Keys("bb:", partitions, cluster=True)
        per_master = [0, 0, 0]
        for p in range(partitions):
            per_master[key_slot(keys.stream(UPLINKS, p).encode()) * 3 // 16384] += 1
        assert per_master == [partitions // 3] * 3
