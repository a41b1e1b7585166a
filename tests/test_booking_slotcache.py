"""Issue 15, the slot-release surge: what the slot cache (consult.booking.slotcache) keeps and
reads. In a rush a thousand requests a second ask for the same doctor's week; when what was kept
runs out they must share one database read, not each start their own."""

from __future__ import annotations

import asyncio

import pytest

from consult.booking.slotcache import SlotCache


class Reads:
    """A read of the doctor's week that waits until let go and counts how often it ran."""

    def __init__(self) -> None:
        self.count = 0
        self.go = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self) -> dict:
        self.count += 1
        n = self.count
        await self.go.wait()
        if self.fail is not None and n == 1:
            raise self.fail
        return {"read": n}


async def test_requests_asking_while_a_read_runs_share_it():
    cache, reads = SlotCache(), Reads()
    waiting = [asyncio.ensure_future(cache.read_once(7, ("week", 1), reads)) for _ in range(50)]
    await asyncio.sleep(0)
    reads.go.set()
    assert [await w for w in waiting] == [{"read": 1}] * 50
    assert reads.count == 1
    # Kept now: the next request reads nothing.
    assert await cache.read_once(7, ("week", 1), reads) == {"read": 1}
    assert reads.count == 1
    # Another doctor, or another key, is a read of its own.
    await cache.read_once(8, ("week", 1), reads)
    await cache.read_once(7, ("week", 2), reads)
    assert reads.count == 3


async def test_a_read_started_before_a_change_is_not_joined_after_it_nor_kept():
    cache, reads = SlotCache(), Reads()
    before = asyncio.ensure_future(cache.read_once(7, ("week", 1), reads))
    await asyncio.sleep(0)
    cache.changed(7)  # e.g. a cancellation committed while the first read ran
    after = asyncio.ensure_future(cache.read_once(7, ("week", 1), reads))
    await asyncio.sleep(0)
    reads.go.set()
    assert await before == {"read": 1} and await after == {"read": 2}
    assert cache.get(7, ("week", 1)) == {"read": 2}  # only the read made after the change is kept


async def test_a_failed_read_is_not_shared_each_waiter_reads_for_itself():
    cache, reads = SlotCache(), Reads()
    reads.fail = LookupError("no such doctor")
    first = asyncio.ensure_future(cache.read_once(7, ("week", 1), reads))
    others = [asyncio.ensure_future(cache.read_once(7, ("week", 1), reads)) for _ in range(3)]
    await asyncio.sleep(0)
    reads.go.set()
    with pytest.raises(LookupError):
        await first
    assert sorted(r["read"] for r in await asyncio.gather(*others)) == [2, 3, 4]


async def test_a_waiter_going_away_does_not_cancel_the_read_for_the_others():
    cache, reads = SlotCache(), Reads()
    leader = asyncio.ensure_future(cache.read_once(7, ("week", 1), reads))
    follower = asyncio.ensure_future(cache.read_once(7, ("week", 1), reads))
    await asyncio.sleep(0)
    leader.cancel()  # the first patient's connection dropped
    await asyncio.sleep(0)
    reads.go.set()
    assert await follower == {"read": 1} and reads.count == 1


def test_a_hold_makes_only_its_own_day_rendered_again():
    """What shows one day alone (its panel) stays kept when a hold takes a time of another day;
    what shows every day (the strip) and that day's own panel are made again."""
    from datetime import date

    cache = SlotCache()
    monday, tuesday = date(2026, 12, 7), date(2026, 12, 8)
    for day in (monday, tuesday):
        cache.put(7, ("day", day), f"panel {day}", cache.version(7, day=day))
    cache.put(7, ("page",), "strip", cache.version(7, with_takes=True))
    cache.put(7, ("week",), "read", cache.version(7))
    cache.took(7, 1_800_000_000, until=2e9, day=monday)
    assert cache.get(7, ("day", monday)) is None
    assert cache.get(7, ("day", tuesday)) == f"panel {tuesday}"
    assert cache.get(7, ("page",)) is None
    assert cache.get(7, ("week",)) == "read"  # what was read stays: the hold is marked over it
    assert cache.is_taken(7, 1_800_000_000)
    # Another doctor's hold changes nothing of this one's; a change other than a hold, everything.
    cache.took(8, 1_800_000_000, until=2e9, day=tuesday)
    assert cache.get(7, ("day", tuesday)) == f"panel {tuesday}"
    cache.changed(7)
    assert cache.get(7, ("day", tuesday)) is None and cache.get(7, ("week",)) is None
