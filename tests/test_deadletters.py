"""Dead letters read back (:mod:`pipeline.deadletters`): bounded reads and masked summaries.

The reads run on the real Redis; :class:`CountingRedis` is the real client, which also notes how
many entries each ``XREVRANGE`` brought back, so a test can check what a bounded read costs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipeline import events
from pipeline.deadletters import DeadRow, letter_summary, scan_dead
from pipeline.keys import Keys
from pipeline.streams import Redis
from tests.conftest import REDIS_URL

BEARER = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LWJlYXJlci10b2tlbg.Zm9vYmFy"
URL_TOKEN = "Xq9sECRETtokenABCDEFGHIJKLmnop42"


class CountingRedis(Redis):
    """The real client; records the number of entries each ``XREVRANGE`` returned."""

    fetched: list[int]

    async def xrevrange(self, *args: Any, **kwargs: Any) -> Any:
        page = await super().xrevrange(*args, **kwargs)
        self.fetched.append(len(page or ()))
        return page


@pytest.fixture
async def counting(redis: Redis) -> AsyncIterator[CountingRedis]:
    """Depends on ``redis`` so the prefix's keys are deleted afterwards."""
    client = CountingRedis.from_url(REDIS_URL)
    assert isinstance(client, CountingRedis)
    client.fetched = []
    yield client
    await client.aclose()


def _letter(i: int, reason: str, detail: str = "") -> events.DeadLetter:
    return events.dead_letter(stream="bbt:uplinks", entry_id=f"{i}-0", raw=b"x" * 8000,
                              stage="transform", reason=reason, detail=detail or f"n{i}",
                              attempts=1, dead_ts_ms=1_700_000_000_000 + i)


async def _fill(redis: Redis, keys: Keys, n: int, reason_of: Any) -> list[str]:
    ids = []
    for i in range(n):
        eid = await redis.xadd(keys.dead, {events.FIELD: events.encode(_letter(i, reason_of(i)))})
        ids.append(eid.decode() if isinstance(eid, bytes) else eid)
    return ids


async def test_the_latest_few_fetch_only_as_many_entries(
    counting: CountingRedis, keys: Keys
) -> None:
    """The status page's latest ten cost ten entries, not a 200-entry page (~1.6 MB)."""
    ids = await _fill(counting, keys, 250, lambda i: "unknown_device")

    rows = await scan_dead(counting, keys, limit=10)

    assert [r.id for r in rows] == ids[::-1][:10]
    assert sum(counting.fetched) == 10


async def test_unbounded_and_filtered_scans_still_page_through_everything(
    counting: CountingRedis, keys: Keys
) -> None:
    ids = await _fill(counting, keys, 250, lambda i: "type_mismatch" if i % 50 == 0 else "other")

    everything = await scan_dead(counting, keys)
    assert [r.id for r in everything] == ids[::-1]

    filtered = await scan_dead(counting, keys, reason="type_mismatch", limit=4)
    assert [r.id for r in filtered] == [ids[200], ids[150], ids[100], ids[50]]

    counting.fetched.clear()
    assert len(await scan_dead(counting, keys, limit=230)) == 230
    assert sum(counting.fetched) == 230


def test_a_summary_masks_credentials_in_the_detail() -> None:
    detail = (f"upstream refused: Authorization: Bearer {BEARER}\n"
              f"GET https://fra1.blynk.cloud/external/api/update?token={URL_TOKEN}&V1=2")
    summary = letter_summary(DeadRow(id="1-0", letter=_letter(1, "http_401", detail)))

    assert BEARER not in summary["detail"] and URL_TOKEN not in summary["detail"]
    assert "Authorization: …" in summary["detail"]
    assert f"token=…{URL_TOKEN[-4:]}" in summary["detail"]
    assert "fra1.blynk.cloud/external/api/update" in summary["detail"]
