"""Every Redis key name blynk-bridge uses, built from one prefix in one place.

Two layouts (docs/DESIGN.md, "Redis Cluster"):

* one Redis (``cluster=False``, the default): the names below, unchanged by this module's
  cluster support — ``bb:uplinks`` or ``bb:{uplinks:3}`` partitioned, ``bb:dead``,
  ``bb:dev:…``, ``bb:registry:version``, ``bb:records:N``, ``bb:rate:…``.
* Redis Cluster (``cluster=True``): every key that a script or ``MULTI`` touches together with
  others carries its partition's hash tag ``{pN.k}`` (k: :meth:`Keys._tag`) —
  ``bb:{p3.k}:uplinks``, ``…:writes``, ``…:dead``, ``…:dev:…``, ``…:registry:version`` /
  ``:changes``, ``…:records``, ``…:lw:…``, ``…:rate:…``, ``…:echo:…``, ``…:down:last:…`` — with
  N = :meth:`Keys.partition_of` of the device, so a device's stream entries, row, order, rate
  state, echo records and last sent commands share one slot. The provisioning rate and count
  of an integration share a tag of their own. Keys only ever used alone keep their one-Redis
  names (a single-key command is in one slot anyway).
"""

from __future__ import annotations

import zlib

from redis.crc import key_slot

UPLINKS = "uplinks"
WRITES = "writes"
DOWNLINKS = "downlinks"
DEAD = "dead"

#: Consumer group of each stage on the stream it reads.
GROUP_TRANSFORM = "transform"
GROUP_EGRESS = "egress"
GROUP_DOWNLINK = "downlink"

#: Hash slots of a Redis Cluster.
SLOTS = 16384


class Keys:
    """Key names under one prefix (default ``bb:``)."""

    def __init__(self, prefix: str = "bb:", partitions: int = 1, *,
                 cluster: bool = False) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.prefix = prefix
        self.partitions = partitions
        #: Redis Cluster layout: every per-device key carries its partition's hash tag.
        self.cluster = cluster
        self._tags: dict[int, str] = {}

    def _tagged(self, partition: int, rest: str) -> str:
        return f"{self.prefix}{{{self._tag(partition)}}}:{rest}"

    def _tag(self, partition: int) -> str:
        """``p<N>.<k>``: the first ``k`` whose hash slot lies in partition N's share of the
        slot space (N/P … (N+1)/P of 16384), so partitions spread evenly over masters that
        own equal slot ranges (plain ``{p0}``, ``{p1}``, ``{p2}`` put two partitions on one of
        three default masters and none on another). Stable: a function of N and P only."""
        tag = self._tags.get(partition)
        if tag is None:
            if not 0 <= partition < self.partitions:
                raise ValueError(f"partition {partition} of {self.partitions}")
            tag = f"p{partition}"
            if self.partitions <= SLOTS:
                k = 0
                while key_slot(f"p{partition}.{k}".encode()) * self.partitions // SLOTS \
                        != partition:
                    k += 1
                tag = f"p{partition}.{k}"
            self._tags[partition] = tag
        return tag

    def stream(self, name: str, partition: int | None = None) -> str:
        """``bb:uplinks`` unpartitioned; ``bb:{uplinks:3}`` (a Cluster hash tag) partitioned;
        ``bb:{p3.k}:uplinks`` in the cluster layout (``partition`` ``None`` there = 0)."""
        if self.cluster:
            return self._tagged(partition or 0, name)
        if self.partitions == 1 or partition is None:
            return f"{self.prefix}{name}"
        return f"{self.prefix}{{{name}:{partition}}}"

    def streams(self, name: str) -> list[str]:
        """Every partition of one stream."""
        if self.partitions == 1 and not self.cluster:
            return [self.stream(name)]
        return [self.stream(name, p) for p in range(self.partitions)]

    def partition_of(self, source: str, device: str) -> int:
        """Stable partition of a device: the same on every process and Python version."""
        return zlib.crc32(f"{source}\0{device}".encode()) % self.partitions

    def partition_of_stream(self, key: str) -> int | None:
        """The partition a stream key names (``bb:{uplinks:3}`` or ``bb:{p3.k}:uplinks`` → 3);
        ``None`` unpartitioned."""
        if self.cluster:
            start = key.find("{p", len(self.prefix) - 1)
            end = key.find("}", start)
            number = key[start + 2:end].partition(".")[0] if start >= 0 and end > 0 else ""
            return int(number) if number.isdigit() else None
        if not key.endswith("}") or "{" not in key:
            return None
        return int(key[key.rindex(":") + 1:-1])

    def stream_for(self, name: str, source: str, device: str) -> str:
        if self.partitions == 1 and not self.cluster:
            return self.stream(name)
        return self.stream(name, self.partition_of(source, device))

    def partition_of_device_key(self, device_key: str) -> int:
        """The partition of a device key ``source:integration:device`` (a ``#<token hash>``
        suffix — :func:`pipeline.registry.token_device_key` — keeps its row's partition)."""
        source, _, rest = device_key.partition(":")
        device = rest.partition(":")[2].split("#", 1)[0]
        return self.partition_of(source, device)

    def _of_device(self, device_key: str, rest: str) -> str:
        """A per-device key: ``bb:<rest>``, or tagged with the device's partition (cluster)."""
        if self.cluster:
            return self._tagged(self.partition_of_device_key(device_key), rest)
        return f"{self.prefix}{rest}"

    def label(self, key: str) -> str:
        """A stream key as metric labels and the status page name it: without the prefix (which
        may be random, as the demo's is) or hash-tag braces (``bb:{uplinks:3}`` → ``uplinks:3``)."""
        name = key[len(self.prefix):] if key.startswith(self.prefix) else key
        partition = self.partition_of_stream(key) if self.cluster else None
        if partition is not None and "}:" in name:
            # bb:{p3.7}:uplinks → uplinks:3, as the one-Redis partitions are named
            return f"{name.partition('}:')[2]}:{partition}"
        return name.replace("{", "").replace("}", "")

    @property
    def dead(self) -> str:
        """The dead stream of writers that are in no partition (ingest refusals, downlinks).
        In the cluster layout each partition also has its own (:meth:`dead_for`)."""
        return f"{self.prefix}{DEAD}"

    def dead_for(self, stream: str) -> str:
        """Where an entry of ``stream`` is dead-lettered: :attr:`dead` on one Redis; in the
        cluster layout the dead stream of the stream's partition, so the dead letter and the
        entry's ack go in one script / ``MULTI`` (one slot)."""
        if not self.cluster:
            return self.dead
        partition = self.partition_of_stream(stream)
        return self.dead if partition is None else self._tagged(partition, DEAD)

    def dead_streams(self) -> list[str]:
        """Every dead stream (what ``dead list``, the status page and the monitor read)."""
        if not self.cluster:
            return [self.dead]
        return [self.dead, *(self._tagged(p, DEAD) for p in range(self.partitions))]

    # registry, de-duplication, order, leases, statuses
    def device(self, source: str, integration: str, device: str) -> str:
        if self.cluster:
            return self._tagged(self.partition_of(source, device),
                                f"dev:{source}:{integration}:{device}")
        return f"{self.prefix}dev:{source}:{integration}:{device}"

    def device_prefixes(self) -> list[str]:
        """What every registry row's key starts with (``SCAN`` patterns): ``bb:dev:``, or one
        per partition in the cluster layout."""
        if not self.cluster:
            return [f"{self.prefix}dev:"]
        return [self._tagged(p, "dev:") for p in range(self.partitions)]

    def broken_devices(self) -> str:
        """Sorted set device key → when (ms) it was marked broken."""
        return f"{self.prefix}registry:broken"

    def registry_partitions(self) -> list[int | None]:
        """The registry's version/change-log pairs: one (``None``) on one Redis, one per
        partition in the cluster layout (bumped with the rows of that partition)."""
        return list(range(self.partitions)) if self.cluster else [None]

    def registry_version(self, partition: int | None = None) -> str:
        if self.cluster:
            return self._tagged(partition or 0, "registry:version")
        return f"{self.prefix}registry:version"

    def registry_version_for(self, stream: str) -> str:
        """The registry version a batch read from ``stream`` is checked against."""
        return self.registry_version(self.partition_of_stream(stream))

    def registry_channel(self) -> str:
        return f"{self.prefix}registry:changed"

    def registry_changes(self, partition: int | None = None) -> str:
        """Stream of changed device keys, one entry per ``registry_version`` increment."""
        if self.cluster:
            return self._tagged(partition or 0, "registry:changes")
        return f"{self.prefix}registry:changes"

    def provision_lock(self, source: str, integration: str, device: str) -> str:
        return f"{self.prefix}lock:provision:{source}:{integration}:{device}"

    def provision_rate(self, source: str, integration: str) -> str:
        """GCRA state (:mod:`pipeline.ratelimit`) of an integration's device creations."""
        if self.cluster:  # one script touches it with provisioned(): one tag for both
            return f"{self.prefix}rate:provision:{{{source}:{integration}}}"
        return f"{self.prefix}rate:provision:{source}:{integration}"

    def provisioned(self, source: str, integration: str) -> str:
        """How many devices auto-provisioning created for an integration (``provision_max``)."""
        if self.cluster:
            return f"{self.prefix}provisioned:{{{source}:{integration}}}"
        return f"{self.prefix}provisioned:{source}:{integration}"

    def dedup(self, stream: str) -> str:
        """Base of the de-duplication blocks (:func:`pipeline.dedup.block_key`) of one uplinks
        stream: ``bb:dd``, or ``bb:dd:{uplinks:3}`` next to its partitioned stream (the same
        hash tag, so a partition's commit script touches one Redis Cluster slot)."""
        tag = stream.find("{")
        return f"{self.prefix}dd" if tag < 0 else f"{self.prefix}dd:{stream[tag:]}"

    def records(self, partition: int) -> str:
        """Hash device key → egress record (:mod:`pipeline.order`: its rate-limit state and,
        per pin, the event time (ms) of the last value written to Blynk) of one writes
        partition: in the cluster layout in the partition's slot, so the commit script writes
        it beside the lease it checks and the acks it makes."""
        if self.cluster:
            return self._tagged(partition, "records")
        return f"{self.prefix}records:{partition}"

    def last_written(self, device_key: str) -> str:
        """A device's egress record as versions before :meth:`records` kept it, one key per
        device: read only when its hash field is missing (an upgrade; docs/DESIGN.md)."""
        return self._of_device(device_key, f"lw:{device_key}")

    def region(self, token_hash: str) -> str:
        return f"{self.prefix}region:{token_hash}"

    def lease(self, kind: str, name: str) -> str:
        return f"{self.prefix}lease:{kind}:{name}"

    def egress_lease(self, partition: int) -> str:
        """The lease of egress's ownership of one writes partition: in the cluster layout in
        the partition's slot, so the commit script checks it beside the acks it makes."""
        if self.cluster:
            return self._tagged(partition, "lease:egress")
        return self.lease("egress", str(partition))

    def transform_lease(self, partition: int) -> str:
        """The lease of transform's ownership of one uplinks partition: in the cluster layout
        in the partition's slot, so the commit script checks it beside the writes it makes."""
        if self.cluster:
            return self._tagged(partition, "lease:transform")
        return self.lease("transform", str(partition))

    def owners(self, kind: str) -> str:
        """Sorted set replica → until when (ms) it is alive (the heartbeats of the replicas
        sharing ``kind``'s partition leases: ``sessions``, ``egress``, ``transform``)."""
        return f"{self.prefix}{kind}:replicas"

    def connected_replicas(self, kind: str, name: str) -> str:
        """Sorted set replica → until when (ms) it says its session of ``name`` is up."""
        return f"{self.prefix}connected:{kind}:{name}"

    def status(self) -> str:
        """Hash integration id → encoded status."""
        return f"{self.prefix}status"

    def stats(self, slot: int) -> str:
        """Hash field → increase of every process's counters in one 5-second slot
        (:mod:`pipeline.stats`)."""
        return f"{self.prefix}stats:{slot}"

    def replicas(self) -> str:
        """Sorted set ``<stages>@<consumer>`` → when (ms) that process was last heard from."""
        return f"{self.prefix}replicas"

    def unmapped(self, template: str) -> str:
        return f"{self.prefix}unmapped:{template}"

    def superseded(self) -> str:
        """Counter: values egress replaced by a newer one of the same device and pin before
        writing them (pins without ``history: true``), over every replica and restart."""
        return f"{self.prefix}egress:superseded"

    def rate(self, device_key: str) -> str:
        return self._of_device(device_key, f"rate:{device_key}")

    def echo(self, token_ref: str, pin: str, device_key: str | None = None,
             partition: int | None = None) -> str:
        """Values the bridge wrote to one Blynk device (named by a token hash) and pin. In the
        cluster layout tagged with the partition of the device key that wrote them (egress
        records them per partition, before it writes) — or ``partition``
        given outright (a token with no known device is looked for in every partition)."""
        if not self.cluster:
            return f"{self.prefix}echo:{token_ref}:{pin}"
        if partition is None:
            if device_key is None:
                raise ValueError("the cluster layout tags an echo list by its device key")
            partition = self.partition_of_device_key(device_key)
        return self._tagged(partition, f"echo:{token_ref}:{pin}")

    # device sessions (workers/blynk_sessions.py)
    def sessions_replicas(self) -> str:
        """Sorted set replica → until when (ms) it is alive (its heartbeat)."""
        return self.owners("sessions")

    # A partition's three keys share one hash tag (``{sessions:<p>}``): the scripts that keep
    # them consistent touch all three, which Redis Cluster allows only within one slot.
    def sessions_live(self, partition: int) -> str:
        """Sorted set device key → when (ms) its session may close (offline deadline)."""
        return f"{self.prefix}{{sessions:{partition}}}:live"

    def sessions_devices(self, partition: int) -> str:
        """Hash device key → what opening its session needs (``LiveDevice``)."""
        return f"{self.prefix}{{sessions:{partition}}}:dev"

    def sessions_changes(self, partition: int) -> str:
        """Stream of devices that became live (field ``k``: device key), newest last, capped:
        what an owner reads since its last scan instead of the whole live set."""
        return f"{self.prefix}{{sessions:{partition}}}:changes"

    def sessions_known(self, token_ref: str) -> str:
        """Hash pin → the last value known to have come down a device's session."""
        return f"{self.prefix}sessions:known:{token_ref}"

    # downlinks
    def blynk_index(self) -> str:
        """Hash ``t:<token hash>`` / ``i:<Blynk device id>`` → device key (reverse index)."""
        return f"{self.prefix}blynk:index"

    def blynk_index_backfilled(self) -> str:
        """When (ms) every registry row was last indexed (:func:`blynk_index.backfill`)."""
        return f"{self.prefix}blynk:index:backfilled"

    def down_last(self, device_key: str) -> str:
        """Hash pin → ``<Blynk ts>:<event id>`` of the last command sent to the device (in the
        device's partition in the cluster layout)."""
        return self._of_device(device_key, f"down:last:{device_key}")

    def down_command(self, event_id: str) -> str:
        """What outcome matching needs of one sent command (by its correlation id)."""
        return f"{self.prefix}down:cmd:{event_id}"

    def down_outcome(self, event_id: str, outcome: str) -> str:
        """Marks one TTS outcome of a command as handled (several replicas see it)."""
        return f"{self.prefix}down:out:{event_id}:{outcome}"
