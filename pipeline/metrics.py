"""Prometheus metrics of every process (``bb_`` prefix), defined once here.

Every drop, rejection and dead letter increments a counter with a reason label: nothing is
silent. The CLI's processes serve them on the metrics port with ``/status`` and the probes
(:mod:`pipeline.metrics_http`); ``serve`` is the bare ``/metrics`` thread the demo uses.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

INGESTED = Counter(
    "bb_ingested_total", "Inputs appended to the uplinks stream", ["source", "integration", "kind"]
)
REJECTED = Counter(
    "bb_rejected_total", "Inputs refused at ingest with a clear error", ["source", "reason"]
)
TRANSFORMED = Counter(
    "bb_transformed_total", "Uplinks turned into Blynk writes", ["source", "integration"]
)
DUPLICATES = Counter("bb_duplicates_total", "Uplinks dropped as already seen", ["source"])
UNMAPPED = Counter(
    "bb_unmapped_keys_total", "Decoded keys with no datastream in their template", ["template"]
)
REJECTED_VALUES = Counter(
    "bb_rejected_values_total",
    "Decoded values not written because they do not fit their datastream",
    ["template", "reason"],
)
REGISTRY_LOOKUPS = Counter(
    "bb_registry_lookups_total", "Device registry lookups by cache outcome", ["outcome"]
)
REGISTRY_RESETS = Counter(
    "bb_registry_cache_resets_total", "Registry caches dropped after a gap in the change log"
)
DEVICES_BROKEN = Counter("bb_devices_broken_total", "Devices marked broken", ["reason"])
PROVISIONED = Counter(
    "bb_provisioned_total", "Auto-provisioning attempts by outcome", ["integration", "outcome"]
)
TRANSFORM_SKIPPED = Counter(
    "bb_transform_skipped_total", "Uplinks with nothing to write to Blynk", ["reason"]
)
WRITTEN = Counter("bb_written_values_total", "Datastream values written to Blynk", ["server"])
BLYNK_REQUESTS = Counter(
    "bb_blynk_requests_total", "Requests to Blynk by endpoint and outcome", ["endpoint", "status"]
)
DEAD = Counter("bb_dead_letters_total", "Entries dead-lettered", ["stage", "reason"])
RECLAIMED = Counter(
    "bb_reclaimed_total", "Entries taken over from idle consumers (XAUTOCLAIM)", ["stage"]
)
STREAM_LENGTH = Gauge("bb_stream_length", "Entries in a stream", ["stream"])
STREAM_LAG = Gauge("bb_stream_lag", "Entries not yet delivered to a group", ["stream", "group"])
STREAM_PENDING = Gauge(
    "bb_stream_pending", "Entries delivered but not acknowledged", ["stream", "group"]
)
STREAM_OLDEST_PENDING = Gauge(
    "bb_stream_oldest_pending_seconds",
    "Age of the oldest delivered-but-unacknowledged entry (0 when none)",
    ["stream", "group"],
)
STREAM_CONSUMERS = Gauge("bb_stream_consumers", "Consumers known to a group", ["stream", "group"])
TRIMMED = Counter(
    "bb_stream_trimmed_total", "Entries trimmed after every group acknowledged them", ["stream"]
)
CONSUMERS_REMOVED = Counter(
    "bb_consumers_removed_total", "Idle consumers with nothing pending, removed", ["stream"]
)
LATENCY = Histogram(
    "bb_end_to_end_seconds",
    "Ingest receipt to Blynk 2xx",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INTEGRATION_STATUS = Gauge(
    "bb_integration_status",
    "Integration status: 0 Not Connected, 1 Connected, 2 Broken",
    ["kind", "name"],
)
# TTS / MQTT ingest (pipeline.tts, workers.ingest_mqtt)
TTS_SKIPPED = Counter(
    "bb_tts_skipped_total",
    "Valid TTS messages that are not uplinks: downlink outcomes, service data, skipped simulated",
    ["integration", "reason"],
)
MQTT_RECEIVED = Counter(
    "bb_mqtt_received_total", "MQTT messages received by ingest-mqtt", ["integration"]
)
MQTT_CONNECTS = Counter(
    "bb_mqtt_connects_total", "MQTT connection attempts by outcome", ["integration", "outcome"]
)
INGEST_DROPPED = Counter(
    "bb_ingest_dropped_total",
    "Inputs dropped at ingest because Redis could not keep up (queue full)",
    ["source", "integration"],
)
LEASE_HELD = Gauge(
    "bb_lease_held", "1 while this process owns the lease of an integration", ["kind", "name"]
)
MQTT_HANDOVERS = Counter(
    "bb_mqtt_handovers_total",
    "Applications an owner handed to a connected standby because its own broker connection "
    "was down (ingest_mqtt.handover_after_ms)",
    ["integration"],
)
MQTT_STANDBY = Gauge(
    "bb_mqtt_standby",
    "1 while this process is a warm standby of a TTS application (subscribed, buffering)",
    ["integration"],
)
MQTT_STANDBY_BUFFERED = Gauge(
    "bb_mqtt_standby_buffered", "Raw messages a warm standby holds in memory", ["integration"]
)
MQTT_STANDBY_OVERFLOW = Counter(
    "bb_mqtt_standby_overflow_total",
    "Messages a warm standby let go before their time because its buffer was full "
    "(a failover in that moment could lose them)",
    ["integration"],
)
MQTT_REPLAYED = Counter(
    "bb_mqtt_replayed_total",
    "Buffered messages a standby appended on taking over (mostly duplicates, removed by event_id)",
    ["integration"],
)

# egress (workers.egress)
EGRESS_DROPPED = Counter(
    "bb_egress_dropped_values_total",
    "Values not sent to Blynk: coalesced (newer one in the same flush) or stale (Blynk has newer)",
    ["reason"],
)
EGRESS_HELD = Gauge(
    "bb_egress_held_entries", "Write entries held in memory by egress (waiting, in flight, backoff)"
)
EGRESS_LEASE_LOST = Counter(
    "bb_egress_lease_lost_total",
    "Device writes that outlived their in-flight lease (order at risk)",
)


def serve(host: str, port: int) -> None:
    """Serve ``/metrics`` from a background thread (prometheus-client's own server)."""
    start_http_server(port, addr=host)
