"""transform: uplinks → Blynk writes (registry, de-duplication, mapping, auto-provisioning).

Reads ``Uplink``s from the ``uplinks`` stream (group ``transform``) in batches; after a small
batch the next read lingers ``streams.linger_ms`` so batches fill under moderate load. Each
uplinks partition has one owner at a time (:mod:`workers.transform.stage`: a partition lease),
which de-duplicates in its memory (:mod:`pipeline.dedup`); every commit below is fenced by the
lease and writes the de-dup block of the batch's new events with its outputs.

**Fast path** (every batch with no undecodable entry, no device to create and no metafield
pending): decode, resolve devices in the registry cache (misses: one ``HMGET`` script call),
check each uplink against the de-dup window in memory, map, then ONE atomic commit
(:class:`.scripts.Commit`: on one Redis a ``WATCH``ed ``MULTI``, :mod:`pipeline.fenced`; in the
cluster layout a script) that checks the partition lease and that the registry
version is still the one the cache is in line with (else it does nothing: the stage syncs the
registry and takes the slow path), appends the outputs — writes, partial and whole dead
letters — of the uplinks that are not duplicates, acks the batch and appends the de-dup block
of its new events. Three round trips per batch: the read and the commit's two (``WATCH`` +
``MGET``, then ``MULTI`` … ``EXEC``; one script call on a cluster) — and none leaves the
worker idle: :meth:`.stage.TransformStage.prepare` is :func:`~pipeline.consumer.consume`'s
``prepare`` hook, so the next batch is read (``prefetch``) and prepared — decoded, resolved,
mapped — while this one commits; batches still commit one at a time, in read order. A batch
prepared before this process synced its registry is prepared
again before its commit; one prepared against a registry that moved on elsewhere fails the
version check and is redone on the slow path.

Both paths decide where each uplink goes with the same pure :func:`pipeline.routing.plan`
(skip, dead-letter, create the device, or write); they differ only in what they do with a
device to create or a metafield pending (the fast path leaves those batches to the slow one).

**Slow path** (anything else; same outcome, more round trips):

1. decode (undecodable → dead letter ``undecodable``);
2. the registry's version check (one round trip), and a de-duplication claim per uplink in
   memory (:mod:`pipeline.dedup`); duplicates are acked and counted;
3. route the uplinks that are not duplicates (:func:`pipeline.routing.plan`): the Particle
   blueprint's ``token`` is the device itself; everything else goes through the registry cache
   (misses: one ``HMGET`` script call);
4. map values (:mod:`pipeline.mapping`) and append every ``BlynkWrite`` — and the partial dead
   letters — and ack, in one commit (:class:`.scripts.Commit`, no version check);
5. unknown devices of integrations with ``provision: true`` are created in Blynk
   (:mod:`pipeline.provision`), then written and acked like the rest — only when one of their
   uplinks maps a value (else those are acked as ``nothing_mapped``) and within the
   integration's limits: past ``provision_max`` they are dead-lettered ``provision_limit``,
   over ``provision_rate`` they stay pending, released without counting a delivery, until a
   replica reclaims them after ``claim_idle_ms``. Any other retryable failure leaves their
   uplinks pending and backs off.

Dead letters (original uplink kept, so ``dead replay`` can resend it): ``unknown_device``,
``device_broken``, ``provision_failed``, ``provision_limit``, ``unknown_integration``,
``undecodable``, and ``type_mismatch`` for the keys whose values do not fit their datastream.
The last is a *partial* dead letter: the uplink's other keys are written, and one
``DeadLetter`` holds the whole original uplink with a detail naming each rejected key, pin and
why. Replaying it rewrites the good keys too, which is harmless (same event time, egress keeps
the newest).

Unmapped keys: counted by :class:`pipeline.unmapped.UnmappedKeys` (bounded per template, with a
TTL), flushed at most once a second.

The parts, one job each:

* :mod:`workers.transform.templates` — the templates by name, ``pull: true`` ones refreshed;
* :mod:`workers.transform.outputs` — a routed uplink's write and partial dead letter (pure),
  and the accounting once they are written (metrics, unmapped keys, firmware);
* :mod:`workers.transform.scripts` — the atomic commit (``Commit``) and ``Emit``, the
  benchmarks' unfenced ceiling;
* :mod:`workers.transform.creating` — the slow path's auto-provisioning (step 5);
* :mod:`workers.transform.stage` — the lifecycle, partition ownership, the fast and the slow
  path.
"""

from __future__ import annotations

from pipeline.context import Context
from workers.transform.scripts import Commit, Emit
from workers.transform.stage import TransformStage
from workers.transform.templates import Templates

__all__ = ["Commit", "Emit", "Templates", "TransformStage", "build"]


def build(ctx: Context) -> TransformStage:
    return TransformStage(ctx)
