"""The parts that let nodes share one PostgreSQL: the periodic sweeps led by one node at a time,
and live-page nudges crossing from one node to another (LISTEN/NOTIFY). Real PostgreSQL (the
harness's throwaway server), whatever engine the rest of the suite runs on."""

from __future__ import annotations

import asyncio
import time

import psycopg

from consult.core import leader, live


async def wait_for(condition, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_exactly_one_node_leads_and_another_takes_over_when_it_dies(postgres_url):
    a, b = leader.Leadership(postgres_url, retry_s=0.2), leader.Leadership(postgres_url, retry_s=0.2)
    ta = asyncio.create_task(a.run())
    await wait_for(a.is_leader)
    tb = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(1.0)
        assert a.is_leader() and not b.is_leader()
        # a's node dies: its connection (and so the lock) goes with it.
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        started = time.monotonic()
        await wait_for(b.is_leader)
        print(f"the other node leads {time.monotonic() - started:.2f} s later")
    finally:
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)


async def test_one_node_alone_always_leads():
    assert leader.Leadership("").is_leader()


async def test_a_nudge_on_one_node_reaches_the_pages_following_it_on_another(postgres_url):
    here, there = live.Live(), live.Live()
    here.relay, there.relay = live.Relay(here, postgres_url), live.Relay(there, postgres_url)
    tasks = [asyncio.create_task(r.run()) for r in (here.relay, there.relay)]
    try:
        await asyncio.wait_for(asyncio.gather(here.relay.connected.wait(), there.relay.connected.wait()), 15)
        topic = live.board_topic(7)
        with (
            there.subscribe(topic) as far,
            here.subscribe(topic) as near,
            there.subscribe(live.board_topic(8)) as other,
        ):
            here.publish(topic)
            assert await far.wait(10), "the other node's page was not nudged"
            assert await near.wait(1)
            assert not await other.wait(0.5), "a page following another topic was nudged"
            # A node does not hear its own nudge twice.
            assert not await near.wait(0.5)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_relay_reconnects_after_its_connection_is_killed(postgres_url):
    here, there = live.Live(), live.Live()
    here.relay, there.relay = live.Relay(here, postgres_url), live.Relay(there, postgres_url)
    tasks = [asyncio.create_task(r.run()) for r in (here.relay, there.relay)]
    try:
        await asyncio.wait_for(asyncio.gather(here.relay.connected.wait(), there.relay.connected.wait()), 15)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid() AND datname = current_database()"
            )
        await wait_for(lambda: not there.relay.connected.is_set(), 10)
        await asyncio.wait_for(there.relay.connected.wait(), 20)
        await asyncio.wait_for(here.relay.connected.wait(), 20)
        topic = live.late_topic(3)
        with there.subscribe(topic) as far:
            here.publish(topic)
            assert await far.wait(10)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
