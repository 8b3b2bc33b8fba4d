"""egress: ``BlynkWrite``s → Blynk, one ``batch/update`` per device per flush, in event-time order.

Contract:

* **Reads** the writes stream (group ``egress``) in batches and holds the entries in memory per
  device. A device is *ready* when no write of it is under way and no backoff or rate limit holds
  it back. By default (``flush_age_ms`` 0) every ready device is flushed at once: a value goes to
  Blynk as soon as it is read, and only what arrives while the device's write is under way or
  while it is held back is coalesced into its next write. With ``flush_age_ms`` > 0 a **flush**
  waits until the held entries of ready devices reach ``flush_count`` or ``flush_bytes``, or the
  oldest has waited ``flush_age_ms`` (fewer Blynk messages, more latency). A flush coalesces each
  ready device's entries (:mod:`pipeline.coalesce`: superseded values of ``history: true`` pins
  become history points, the others are counted in ``bb_superseded_values_total`` and the
  counter ``status`` shows); one script call for all its devices
  (:meth:`pipeline.order.LastWritten.prepare`) skips devices with nothing newer than Blynk has,
  and takes each other device's lease, last written times and one rate-limit slot
  (:mod:`pipeline.ratelimit`); then it sends per device: history uploads first (backlog with
  true times), then ONE ``batch/update`` with the current values, so the current value lands
  last.
* **Acks** an entry only after Blynk answered 2xx for everything it carried (or its values
  proved stale), or after it was dead-lettered. Acks are shielded from cancellation.
* **Retryable answers** (5xx, timeouts, connection loss, 429) never ack and never re-read: the
  entries stay *in memory* and the device (429) or the whole server (5xx/outage) backs off with
  capped jittered backoff or ``Retry-After``; after a server backoff one device probes before the
  others follow. Because the entries are not read again their delivery count does not grow, so an
  outage of any length cannot push them past ``max_deliveries``. While held, their idle time is
  reset every ``claim_idle_ms / 3`` (``XCLAIM … JUSTID``, which does not count a delivery) so
  other replicas do not take them over. When ``max_held`` entries are held, reading pauses: the
  backlog waits in Redis, not in memory. If the process dies, the entries are pending in Redis
  and another replica takes them over (XAUTOCLAIM): nothing is lost.
* **Permanent answers**: ``invalid_token`` marks the device broken in the registry and
  dead-letters all its entries; any other permanent answer is narrowed down to the pins that
  cause it (the pin Blynk names, else halving the pin set), the rest is written, and the entries
  that carried a failing pin are dead-lettered with the reason (original entry kept for replay).
  A refused history point dead-letters its entry; the current value is still written.
* **Stop**: no more reads; held entries of ready devices are sent and acked, devices in backoff
  are left pending in Redis; writes under way are waited for at most ``stop_timeout_s``, then
  abandoned (a cancel abandons them at once): nothing is acked for them, so their entries stay
  pending in Redis and are delivered again. Their device leases lapse by themselves (a request
  sent may still land), so another replica writes those devices after ``lease_ms``. A request
  that did land is written again by that redelivery: at-least-once, duplicate history points
  included (nothing recorded them).
* **Burst mode** (``until_idle=True``): return once nothing is left to read and nothing is held.

The parts, one job each:

* :mod:`workers.egress.queue` — held entries per device; coalescing a device's into one plan;
* :mod:`workers.egress.scheduler` — flush readiness and deadlines, server backoff and probes,
  the in-flight cap;
* :mod:`workers.egress.sender` — one device write as one state machine (task-free first, the
  coroutine path for anything unusual), one result;
* :mod:`workers.egress.committer` — the one finish: records and acks group-committed, dead
  letters, broken devices, retries;
* :mod:`workers.egress.stage` — the lifecycle and the read/flush loop wiring them.

The Blynk server's integration status (``blynk``/server name) follows outages and recoveries.
"""

from __future__ import annotations

from pipeline.context import Context
from pipeline.lifecycle import Stage
from workers.egress.stage import EgressStage

__all__ = ["EgressStage", "build"]


def build(ctx: Context) -> Stage:
    return EgressStage(ctx)
