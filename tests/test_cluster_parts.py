"""The parts that let nodes share one PostgreSQL: the periodic sweeps led by one node at a time,
live-page nudges crossing from one node to another (LISTEN/NOTIFY), and jobs claimed by several
nodes at once (FOR UPDATE SKIP LOCKED, outside the cluster's write lock). Real PostgreSQL (the
harness's throwaway server), whatever engine the rest of the suite runs on."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from consult.core import jobs, keys, leader, live
from consult.core.pg import WRITE_LOCK_KEY, PgDatabase
from tests.test_jobs_claims import enqueue, node, rows


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


# -- jobs claimed by two nodes -------------------------------------------------------------------


@pytest.fixture
def jobs_url(postgres_template):
    """A migrated database of this test's own on the session's PostgreSQL."""
    name = postgres_template.take()
    yield postgres_template.server.url(name)
    postgres_template.drop(name)


@pytest.fixture
async def two_nodes(settings, jobs_url):
    """Two nodes' workers (each its own PgDatabase: reader pool, writer thread) on one database,
    connected before the test starts, so that neither has a head start."""
    nodes = [node(settings, PgDatabase(jobs_url), "test") for _ in range(2)]
    try:
        for app in nodes:
            await app[jobs.JOBS].claim_due(app, 1)  # nothing due: opens the reader pool
            await app[keys.DB].execute_write_fn(lambda d: None, exclusive=False)  # the writer
        yield nodes
    finally:
        for app in nodes:
            app[keys.DB].close()


def waiting_for_a_lock(conn: psycopg.Connection) -> int:
    """How many other sessions on this database wait for a lock (advisory, or a row's)."""
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    ).fetchone()[0]


async def test_two_nodes_claiming_at_once_take_every_job_exactly_once(two_nodes):
    a, b = two_nodes
    now = time.time()
    enqueue(a[keys.DB], "test", [(str(n), now - 1 - n % 13) for n in range(300)])

    async def claimer(app) -> list[int]:
        taken: list[int] = []
        while batch := await app[jobs.JOBS].claim_due(app, 5, now):
            taken += [job.id for job in batch]
        return taken

    on_a, on_b = await asyncio.wait_for(asyncio.gather(claimer(a), claimer(b)), 120)
    print(f"node a claimed {len(on_a)} jobs, node b {len(on_b)}")
    assert not set(on_a) & set(on_b), "a job was claimed by both nodes"
    assert len(on_a) + len(on_b) == len(set(on_a) | set(on_b)) == 300, "a job was lost or claimed twice"
    assert on_a and on_b, "one node took every job: the claims did not run side by side"
    assert {(r["status"], r["attempts"]) for r in rows(a[keys.DB]).values()} == {("running", 1)}


async def test_a_claim_proceeds_while_another_connection_holds_the_cluster_write_lock(two_nodes, jobs_url):
    a, b = two_nodes
    now = time.time()
    enqueue(a[keys.DB], "test", [("1", now - 2), ("2", now - 1)])
    # Node b's writer waits for the lock as long as it takes (not its 5 s lock_timeout), so
    # that what it is doing when the claim returns does not depend on the machine's speed.
    await b[keys.DB].execute_write_fn(lambda d: d.raw.execute("SET lock_timeout = 0"))
    with psycopg.connect(jobs_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [WRITE_LOCK_KEY])
        try:
            # Every ordinary write waits for the lock: b's does ...
            write = asyncio.create_task(b[keys.DB].execute_write_fn(lambda d: "written"))
            await wait_for(lambda: waiting_for_a_lock(holder) == 1)
            # ... while a claim on a goes ahead (it used to wait, then fail after 5 s).
            claimed = await asyncio.wait_for(a[jobs.JOBS].claim_due(a, 10, now), 20)
            assert [job.key for job in claimed] == ["1", "2"]
            assert {r["status"] for r in rows(a[keys.DB]).values()} == {"running"}
            assert not write.done()
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", [WRITE_LOCK_KEY])
    assert await asyncio.wait_for(write, 20) == "written"


async def test_a_claim_passes_over_a_job_another_transaction_has_locked(two_nodes, jobs_url):
    a, _b = two_nodes
    now = time.time()
    enqueue(a[keys.DB], "test", [("1", now - 3), ("2", now - 2), ("3", now - 1)])
    with psycopg.connect(jobs_url) as other:  # not autocommit: the lock lasts until rollback
        other.execute("SELECT id FROM jobs WHERE key = '1' FOR UPDATE")
        # Skipped, not waited for (a wait would end in "database unavailable" after 5 s).
        claimed = await asyncio.wait_for(a[jobs.JOBS].claim_due(a, 10, now), 20)
        assert [job.key for job in claimed] == ["2", "3"]
        assert rows(a[keys.DB])["test:1"]["status"] == "queued"
        other.rollback()
    assert [job.key for job in await a[jobs.JOBS].claim_due(a, 10, now)] == ["1"]


async def test_run_now_waits_for_another_nodes_claim_of_the_same_job_and_finds_it_running(
    two_nodes, jobs_url
):
    a, _b = two_nodes
    now = time.time()
    enqueue(a[keys.DB], "test", [("1", now + 3600)])  # not due: only a person asking runs it now
    with psycopg.connect(jobs_url) as other:
        # Another node's claim of this very job, not committed yet.
        other.execute("UPDATE jobs SET status = 'running', attempts = 1, claim = 'elsewhere' WHERE key = '1'")
        asked = asyncio.create_task(jobs.run_now(a, "test", "1"))
        await wait_for(lambda: waiting_for_a_lock(other) == 1)
        assert not asked.done()
        other.commit()
        outcome = await asyncio.wait_for(asked, 20)
    assert (outcome.status, outcome.ran) == ("running", False)  # not run twice
    assert rows(a[keys.DB])["test:1"]["claim"] == "elsewhere"
