"""Transform's auto-provisioning of a slow-path batch: create the unknown devices whose uplinks
map a value (:mod:`pipeline.provision`, within the integration's limits), then write those
uplinks like the rest; uplinks that map nothing are acked and counted (``nothing_mapped``),
not given a device."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from redis.exceptions import RedisError

from pipeline import metrics
from pipeline.errors import Permanent, Reason, Retryable
from pipeline.logs import ThrottledLog
from pipeline.mapping import map_uplink, maps_a_value
from pipeline.provision import Provisioner
from pipeline.registry import Device
from pipeline.routing import WRITE, Route
from pipeline.streams import DeadItem, Entry, StreamReader
from workers.transform.outputs import Outputs
from workers.transform.templates import Templates

log = logging.getLogger("blynk_bridge.transform")
#: Uplinks waiting for the provisioning rate come back every claim_idle_ms until the rate
#: allows their device: one line per interval, not one per batch.
_rate_log = ThrottledLog(log, interval_s=30.0)

Ready = list[tuple[Entry, Route]]


class Creator:
    """Creates the devices a batch's ``CREATE`` routes ask for, and hands their uplinks on to
    ``write`` (or ``dead_letter``); ``emit(outputs, acks)`` is the stage's fenced commit.
    ``provisioner`` may be replaced (the stage opens its platform client at start-up)."""

    def __init__(self, templates: Templates, provisioner: Provisioner, outputs: Outputs,
                 reader: StreamReader,
                 emit: Callable[[list[tuple[str, bytes]], list[Entry]], Awaitable[None]], *,
                 dead_letter: Callable[[list[DeadItem]], Awaitable[None]],
                 write: Callable[[Ready, list[Entry]], Awaitable[None]]) -> None:
        self._templates = templates
        self.provisioner = provisioner
        self._outputs = outputs
        self._reader = reader
        self._emit = emit
        self._dead_letter = dead_letter
        self._write = write

    async def create(self, to_create: dict[str, list[tuple[Entry, Route]]]) -> None:
        """Create unknown devices (concurrently, one task per device) whose uplinks map at
        least one value, then write their uplinks; uplinks of devices over the provisioning
        rate stay pending (released); raise ``Retryable`` at the end if any other must wait."""
        await self._drop_unmappable(to_create)
        keys = list(to_create)

        async def one(key: str) -> Device:
            first = to_create[key][0][1]
            integ = first.integration
            assert integ is not None
            tname = integ.choose_template(first.uplink.device_meta)
            if tname is None or tname not in self._templates.by_name:
                raise Permanent(f"integration {integ.name!r} has no template to create "
                                "devices from", reason=Reason.PROVISION_FAILED)
            return await self.provisioner.ensure(key, tname, self._templates.by_name[tname].id)

        results = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
        ready: list[tuple[Entry, Route]] = []
        dead: list[DeadItem] = []
        parked: list[Entry] = []
        retry: Retryable | None = None
        for key, res in zip(keys, results, strict=True):
            if isinstance(res, Device):
                ready.extend((e, replace(r, kind=WRITE, device=res)) for e, r in to_create[key])
            elif isinstance(res, Permanent):
                dead.extend((e, res.reason, res.detail) for e, _ in to_create[key])
            elif isinstance(res, Retryable) and res.reason == Reason.PROVISION_RATE:
                parked.extend(e for e, _ in to_create[key])
            elif isinstance(res, Retryable | RedisError):
                retry = res if isinstance(res, Retryable) else Retryable(str(res))
            else:
                raise res
        await self._dead_letter(dead)
        await self._write(ready, [])
        if parked:
            # Left pending without counting a delivery; the partition's owner reclaims them
            # after claim_idle_ms, when the rate allows more devices (the stream is not held
            # up).
            await self._reader.release(parked)
            _rate_log.info(("provision_rate",),
                           "%d uplinks wait for the provisioning rate of their integration",
                           len(parked))
        if retry is not None:
            raise retry

    async def _drop_unmappable(self, to_create: dict[str, list[tuple[Entry, Route]]]) -> None:
        """No device is created for uplinks none of whose values would be written: they are
        acked and counted (``nothing_mapped``, unmapped keys), as for a known device."""
        acks: list[Entry] = []
        for key, items in list(to_create.items()):
            integ = items[0][1].integration
            assert integ is not None
            tname = integ.choose_template(items[0][1].uplink.device_meta)
            template = self._templates.by_name.get(tname or "")
            if template is None or any(maps_a_value(template, r.uplink) for _, r in items):
                continue  # no template: dead-lettered as provision_failed by create()
            del to_create[key]
            for e, r in items:
                acks.append(e)
                self._outputs.unmapped.add(template.name, map_uplink(template, r.uplink).unmapped)
        if acks:
            await self._emit([], acks)
            metrics.TRANSFORM_SKIPPED.labels(Reason.NOTHING_MAPPED).inc(len(acks))
