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
EVENT_TIME_CLAMPED = Counter(
    "bb_event_time_clamped_total",
    "Inputs whose event time lay past arrival + max_clock_skew_s and became the arrival time",
    ["source", "integration"],
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
DEVICES_UNBROKEN = Counter(
    "bb_devices_unbroken_total",
    "Broken devices set back to ok: by retry (egress.broken_retry_s) or by an operator",
    ["by"],
)
PROVISIONED = Counter(
    "bb_provisioned_total", "Auto-provisioning attempts by outcome", ["integration", "outcome"]
)
TRANSFORM_SKIPPED = Counter(
    "bb_transform_skipped_total", "Uplinks with nothing to write to Blynk", ["reason"]
)
WRITTEN = Counter(
    "bb_written_values_total", "Datastream values written to Blynk", ["integration"]
)
BLYNK_REQUESTS = Counter(
    "bb_blynk_requests_total", "Requests to Blynk by endpoint and outcome", ["endpoint", "status"]
)
BLYNK_REDIRECTS_REFUSED = Counter(
    "bb_blynk_redirects_refused_total",
    "Redirects from Blynk not followed (api: device|platform; reason: foreign_host|downgrade|"
    "not_followed)", ["api", "reason"]
)
DEAD = Counter("bb_dead_letters_total", "Entries dead-lettered", ["stage", "reason"])
RECLAIMED = Counter(
    "bb_reclaimed_total", "Entries taken over from idle consumers (XAUTOCLAIM)", ["stage"]
)
# Stream labels name the stream without the key prefix (``uplinks``, ``uplinks:3`` for a
# partition, ``dead``: :meth:`pipeline.keys.Keys.label`), so dashboards work for any prefix.
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
NODE_LAG = Gauge("bb_node_lag", "Entries not yet delivered to a group, summed over the streams a "
                 "Redis node (Cluster master) holds", ["node", "group"])
NODE_PENDING = Gauge("bb_node_pending", "Entries delivered but not acknowledged, summed over the "
                     "streams a Redis node holds", ["node", "group"])
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
    "1 for an integration's current state (Not Connected, Connected, Broken), 0 for the others",
    ["kind", "integration", "state"],
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
MQTT_FAST_PATH = Gauge(
    "bb_mqtt_fast_path",
    "1 when MQTT messages are read on the fast path, 0 when aiomqtt's internals were not as "
    "expected and its public iterator is used (see pipeline/mqtt.py)",
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
    "bb_lease_held", "1 while this process owns the lease of an integration",
    ["kind", "integration"],
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
    "Values not sent to Blynk because Blynk already has a newer one (reason: stale)",
    ["reason"],
)
SUPERSEDED = Counter(
    "bb_superseded_values_total",
    "Values replaced by a newer one of the same device and pin before they were written (pins "
    "without history: true; those of history pins go to Blynk's history instead)",
)
EGRESS_HELD = Gauge(
    "bb_egress_held_entries", "Write entries held in memory by egress (waiting, in flight, backoff)"
)
EGRESS_FENCED = Counter(
    "bb_egress_fenced_total",
    "Egress commits refused because the partition lease was no longer the replica's",
)
TRANSFORM_FENCED = Counter(
    "bb_transform_fenced_total",
    "Transform commits refused because the partition lease was no longer the replica's",
)
DEDUP_EVICTED = Counter(
    "bb_dedup_evicted_total",
    "Events forgotten by de-duplication before their window ended "
    "(transform.dedup_max_events reached)",
)
DEDUP_EVENTS = Gauge(
    "bb_dedup_events",
    "Events the de-duplication window holds in this process's memory "
    "(at most transform.dedup_max_events)",
)
PARTITIONS_OWNED = Gauge(
    "bb_partitions_owned",
    "Partitions this process owns through a lease (0: a warm standby)",
    ["stage"],
)

# downlinks (workers.downlink)
DOWNLINKS = Counter(
    "bb_downlinks_total",
    "Downlink commands by what became of them: sent; superseded (a newer value for the same "
    "device and pin came first); stale (older than one already sent); duplicate; echo (the "
    "bridge's own uplink write coming back); retried (device offline, call failed)",
    ["integration", "outcome"],
)
DOWNLINK_OUTCOMES = Counter(
    "bb_downlink_outcomes_total",
    "TTS downlink events matched to a command by correlation id (queued, sent, ack, nack, "
    "failed)",
    ["integration", "outcome"],
)
BLYNK_WEBHOOK_AT_LIMIT = Counter(
    "bb_blynk_webhook_at_limit_total",
    "Blynk webhook requests received while that webhook was at Blynk's limit (10 a minute): "
    "Blynk drops the changes past it, which the bridge never sees",
    ["integration"],
)
DOWNLINK_LATENCY = Histogram(
    "bb_downlink_seconds",
    "Blynk webhook received to the device cloud accepting the command (publish/call returned)",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def serve(host: str, port: int) -> None:
    """Serve ``/metrics`` from a background thread (prometheus-client's own server)."""
    start_http_server(port, addr=host)
SESSIONS_HELD = Gauge(
    "bb_blynk_sessions", "Blynk device MQTT sessions this process holds (open or opening)"
)
SESSIONS_PENDING = Gauge(
    "bb_blynk_sessions_forward_pending",
    "Commands from device sessions waiting for the downlinks stream (latest per device and pin)",
)
SESSION_EVENTS = Counter(
    "bb_blynk_session_events_total",
    "Blynk device-session events: connected, ready, closed_<reason>, redirected, "
    "redirect_refused, forwarded, superseded, unchanged, not_a_command, not_owned, bad_value, "
    "partition_<why>…",
    ["event"],
)
