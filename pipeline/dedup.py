"""De-duplication of uplinks by ``event_id`` within a window.

One ``SET seen:<event_id> <mark> NX EX <window> GET`` per uplink, for the whole batch in one
script call (:class:`Claims`; one command instead of one per uplink: redis-py's per-command
cost in Python is higher than the mapping's), sent in the same round trip as
the registry's version check. The *mark* is the stream entry that claimed the event
(``<stream>/<entry id>``), which is what makes marking before writing safe:

* the reply is nil → the event is new; this entry now owns it;
* the reply is this entry's own mark → this is a *redelivery* of the entry that claimed the
  event (it crashed or failed between marking and writing), so it is processed again — a crash
  between marking and the ``XADD`` of the outputs loses nothing;
* any other mark → another entry carries the same event: a duplicate, acked and counted.

So the check costs no extra round trip and never drops the only copy of an event: a second
entry with the same event is dropped only because the first one owns it, and the first stays
pending until its outputs are written. The one duplicate write left is at-least-once itself: an
entry whose outputs landed but whose ack did not is processed again on redelivery (egress's
event-time ordering makes that write a no-op in Blynk).

Replaying a dead letter appends a *new* entry with the same ``event_id``: call :func:`forget`
first (transform does so itself for every uplink it dead-letters whole), or the replay would be
dropped as a duplicate within the window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redis.asyncio.client import Pipeline

from pipeline.keys import Keys
from pipeline.streams import Entry, Redis


def mark_of(entry: Entry) -> bytes:
    return f"{entry.stream}/{entry.id}".encode()


_CLAIM = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'EX', ARGV[1], 'GET')
end
return out
"""


class Claims:
    """The batched claim script, registered once per client."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._script = redis.register_script(_CLAIM)
        self._keys = keys

    async def queue(self, pipe: Pipeline, claims: Sequence[tuple[str, bytes]],
                    window_s: int) -> None:
        """Queue the claims of ``(event_id, mark)`` pairs; the reply is a list of old marks
        (``None`` where the event was new), in order."""
        seen = self._keys.seen
        await self._script(keys=[seen(e) for e, _ in claims],
                     args=[window_s, *(m for _, m in claims)], client=pipe)


def is_duplicate(reply: bytes | None, mark: bytes) -> bool:
    """Whether a claim's reply says another entry owns the event."""
    return reply is not None and reply != mark


async def forget(redis: Redis, keys: Keys, event_ids: Iterable[str]) -> None:
    """Forget events, so re-appended (replayed) uplinks carrying them are processed again."""
    ids = [keys.seen(e) for e in event_ids]
    if ids:
        await redis.delete(*ids)
