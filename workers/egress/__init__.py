"""egress: ``BlynkWrite``s → Blynk, one ``batch/update`` per device per flush, in event-time order.

Contract:

* **Ownership.** Each writes partition (``redis.partitions``) has ONE egress owner at a time,
  through a partition lease (:class:`pipeline.lease.PartitionLeases`, ``keys.egress_lease``):
  a replica holds at most ceil(partitions / live replicas) of them (heartbeats), renews them,
  gives extras back, and reads only the partitions it owns. ``redis.partitions`` is therefore
  egress's unit of parallelism (as Kafka's partitions are a consumer group's): replicas beyond
  it idle as **warm standbys** (logged, ``bb_partitions_owned{stage="egress"}`` 0) and take a
  partition over when its owner stops or dies. A new owner first takes over the partition's
  pending entries (every consumer's, ``XAUTOCLAIM … JUSTID``), then reads new ones. A device's
  entries are all in its partition, so one replica writes a device: that is what keeps its
  values in event-time order across replicas (:mod:`pipeline.order`).
* **The send rule.** A request goes to Blynk only while its partition's lease is certainly held
  for longer than ``blynk.timeout_s`` (``egress.lease_ttl_ms``, default 3 × the timeout,
  at least 2 ×), so nothing sent by one owner can land after the next owner started; a partition
  whose lease is not certainly held is given up at once (the fence needs no Redis call), and a
  write begun before its partition was given up sends nothing more, even if it was taken back.
* **Reads** each owned partition (group ``egress``) in batches and holds the entries in memory per
  device. A device is *ready* when no write of it is under way and no backoff or rate limit holds
  it back. By default (``flush_age_ms`` 0) every ready device is flushed at once: a value goes to
  Blynk as soon as it is read, and only what arrives while the device's write is under way or
  while it is held back is coalesced into its next write. With ``flush_age_ms`` > 0 a **flush**
  waits until the held entries of ready devices reach ``flush_count`` or ``flush_bytes``, or the
  oldest has waited ``flush_age_ms`` (fewer Blynk messages, more latency). A flush coalesces each
  ready device's entries (:mod:`pipeline.coalesce`: superseded values of ``history: true`` pins
  become history points, the others are counted in ``bb_superseded_values_total`` and the
  counter ``status`` shows); checks each device against its **record in memory** (last written
  event time per pin, rate-limit slot, 429 deferral: :mod:`pipeline.order`; read from Redis
  once per device after the partition was taken, one call per flush for the devices first
  seen): devices with nothing newer than Blynk has are acked unsent, a device over its rate
  limit (:mod:`pipeline.ratelimit`) waits; with Blynk webhooks configured, one call records
  the flush's echoes (:mod:`pipeline.echo`) before anything is sent; then it sends per device:
  history uploads first (backlog with true times), then ONE ``batch/update`` with the current
  values, so the current value lands last.
* **Acks** an entry only after Blynk answered 2xx for everything it carried (or its values
  proved stale), or after it was dead-lettered: the changed records (one ``HSET`` into the
  partition's records hash, whose expired fields the owner sweeps in the background) and the
  acks of the writes finishing together are one commit (write-behind: a ``WATCH``ed
  ``MULTI``/``EXEC``, a script per partition on a cluster), which first checks the partition's
  lease still holds the token of the ownership the writes were made under (**fencing**, by
  ownership, not by name: refused, nothing is recorded or acked, the partition is given up and
  its new owner writes the entries again — at-least-once, never older over newer); a write's
  dead letters are fenced alike. Acks are shielded from cancellation.
* **Retryable answers** (5xx, timeouts, connection loss, 429) never ack and never re-read: the
  entries stay *in memory* and the device (429) or the whole server (5xx/outage) backs off with
  capped jittered backoff or ``Retry-After``; after a server backoff one device probes before the
  others follow. Because the entries are not read again their delivery count does not grow, so an
  outage of any length cannot push them past ``max_deliveries``. While held, their idle time is
  reset every ``claim_idle_ms / 3`` (``XCLAIM … JUSTID``, which does not count a delivery) so
  the reader's own idle claims do not deliver them again. When ``max_held`` entries are held,
  reading pauses: the backlog waits in Redis, not in memory. If the process dies, the entries
  are pending in Redis and the partition's next owner takes them over: nothing is lost.
* **Permanent answers**: ``invalid_token`` marks the device broken in the registry and
  dead-letters all its entries; any other permanent answer is narrowed down to the pins that
  cause it (the pin Blynk names, else halving the pin set), the rest is written, and the entries
  that carried a failing pin are dead-lettered with the reason (original entry kept for replay).
  A refused history point dead-letters its entry; the current value is still written.
* **Stop**: no more reads; held entries of ready devices are sent and acked, devices in backoff
  are left pending in Redis; writes under way are waited for at most ``stop_timeout_s``, then
  abandoned (a cancel abandons them at once): nothing is acked for them, so their entries stay
  pending in Redis and are delivered again. The partitions are then released — unless writes
  were abandoned: a request sent may still land, so their leases lapse by themselves and another
  replica takes them after ``egress.lease_ttl_ms`` (an answer arriving meanwhile is still
  committed, fenced like any other). A request that did land is written again by that
  redelivery: at-least-once, duplicate history points included (nothing recorded them).
* **Burst mode** (``until_idle=True``): take this replica's share of the partitions, then return
  once nothing is left to read and nothing is held (the partitions are handed back).

The parts, one job each:

* :mod:`workers.egress.queue` — held entries per device; coalescing a device's into one plan;
* :mod:`workers.egress.scheduler` — flush readiness and deadlines, server backoff and probes,
  the in-flight cap;
* :mod:`workers.egress.sender` — one device write as one state machine (task-free first, the
  coroutine path for anything unusual), one result;
* :mod:`workers.egress.committer` — the one finish: records and acks group-committed, dead
  letters, broken devices, retries;
* :mod:`workers.egress.stage` — the lifecycle, partition ownership and the read/flush loop
  wiring them.

The Blynk server's integration status (``blynk``/server name) follows outages and recoveries.
"""

from __future__ import annotations

from pipeline.context import Context
from pipeline.lifecycle import Stage
from workers.egress.stage import EgressStage

__all__ = ["EgressStage", "build"]


def build(ctx: Context) -> Stage:
    return EgressStage(ctx)
