"""How the worker claims jobs: one statement that flips the oldest due jobs of its kinds to
running, each with its kind's lease, and never hands one job to two claimers. Runs on the suite's
engine (SQLite, or PostgreSQL with CONSULT_TEST_ENGINE=postgresql); what two nodes on one
PostgreSQL do at once is in tests/test_cluster_parts.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from consult.core import jobs, keys
from consult.core.db import Database


async def nothing(app: web.Application, job: jobs.Job) -> None:
    return None


def node(settings, database: Database, *kinds: str) -> web.Application:
    """What the worker of one process needs: its settings, its database and the kinds it runs."""
    app = web.Application()
    app[keys.SETTINGS] = settings
    app[keys.DB] = database
    runner = jobs.setup(app)
    for kind in kinds:
        runner.register(kind, nothing, timeout_s=60 if kind == "slow" else 10)
    return app


def enqueue(database: Database, kind: str, keys_and_times: list[tuple[str, float]]) -> None:
    database.write_sync(
        lambda d: [jobs.enqueue_sync(d, kind, {"key": k}, key=k, run_after=at) for k, at in keys_and_times]
    )


def rows(database: Database) -> dict[str, dict]:
    return database.read_sync(
        lambda d: {f"{r['kind']}:{r['key']}": dict(r) for r in d.execute("SELECT * FROM jobs")}
    )


@contextlib.asynccontextmanager
async def worker(app: web.Application) -> AsyncIterator[jobs.Runner]:
    """The node's worker loop, running for the block; stopped with the attempts it left."""
    runner = app[jobs.JOBS]
    loop = asyncio.ensure_future(runner.work(app))
    try:
        yield runner
    finally:
        loop.cancel()
        await asyncio.gather(loop, *runner.running, return_exceptions=True)


async def test_a_claim_takes_the_oldest_due_jobs_of_its_kinds_each_with_its_kinds_lease(settings, database):
    now = time.time()
    enqueue(database, "fast", [("f1", now - 30), ("f2", now - 10), ("later", now + 600)])
    enqueue(database, "slow", [("s1", now - 20), ("s2", now - 5)])
    enqueue(database, "other", [("o1", now - 60)])  # a kind this node does not run
    app = node(settings, database, "fast", "slow")
    runner = app[jobs.JOBS]

    first = await runner.claim_due(app, 3, now)
    assert [(j.kind, j.key) for j in first] == [("fast", "f1"), ("slow", "s1"), ("fast", "f2")]
    assert all(j.attempts == 1 and j.claim for j in first)
    stored = rows(database)
    for job in first:
        row = stored[f"{job.kind}:{job.key}"]
        assert (row["status"], row["claim"], row["claimed_at"]) == ("running", job.claim, now)
        assert row["lease_until"] == pytest.approx(now + runner.lease_s(job.kind))
    assert runner.lease_s("slow") - runner.lease_s("fast") == 50

    assert [j.key for j in await runner.claim_due(app, 3, now)] == ["s2"]  # what is left and due
    assert await runner.claim_due(app, 3, now) == []
    stored = rows(database)
    assert stored["fast:later"]["status"] == stored["other:o1"]["status"] == "queued"

    # The claim is what a record must show: a stale one changes nothing.
    f1 = first[0]
    stale = jobs.Job(f1.id, f1.kind, f1.key, f1.payload, f1.attempts, f1.max_attempts, "not-the-claim")
    assert not await database.execute_write_fn(lambda d: jobs.finish_sync(d, stale, now))
    assert await database.execute_write_fn(lambda d: jobs.finish_sync(d, f1, now))
    assert rows(database)["fast:f1"]["status"] == "done"


async def test_run_now_claims_one_job_before_its_time_and_only_once(settings, database):
    now = time.time()
    enqueue(database, "fast", [("k", now + 3600)])
    app = node(settings, database, "fast")
    lease = app[jobs.JOBS].lease_s("fast")
    job = await database.execute_write_fn(
        lambda d: jobs.claim_key_sync(d, "fast", "k", now, lease), exclusive=False
    )
    assert job is not None and (job.key, job.attempts, job.payload) == ("k", 1, {"key": "k"})
    again = await database.execute_write_fn(
        lambda d: jobs.claim_key_sync(d, "fast", "k", now, lease), exclusive=False
    )
    assert again is None  # running already
    assert (
        await database.execute_write_fn(lambda d: jobs.claim_key_sync(d, "fast", "none", now, lease)) is None
    )
    outcome = await jobs.run_now(app, "fast", "k")
    assert (outcome.status, outcome.ran) == ("running", False)


async def test_run_now_waits_for_the_attempt_this_processs_worker_took_a_moment_before(settings, database):
    """Someone asks for a refund and waits for it (run_now), but the worker, woken by the same
    write, claimed the job first: the person waits for that attempt, not for nothing."""
    release = asyncio.Event()

    async def refund(app: web.Application, job: jobs.Job) -> str:
        await release.wait()
        return "refunded"

    app = node(settings, database)
    runner = app[jobs.JOBS]
    runner.register("refund", refund, timeout_s=10)
    enqueue(database, "refund", [("r1", time.time() - 1)])
    (claimed,) = await runner.claim_due(app, 1)
    worker_attempt = runner.start(app, claimed)

    asked = asyncio.ensure_future(jobs.run_now(app, "refund", "r1", wait=10))
    await asyncio.sleep(0.2)
    assert not asked.done()  # waiting for the worker's attempt
    release.set()
    outcome = await asyncio.wait_for(asked, 10)
    assert (outcome.status, outcome.result, outcome.ran) == ("done", "refunded", False)
    await worker_attempt
    assert rows(database)["refund:r1"]["status"] == "done"

    # Its wait is bounded like its own attempt's: still running when it ends says so.
    release.clear()
    enqueue(database, "refund", [("r2", time.time() - 1)])
    (claimed,) = await runner.claim_due(app, 1)
    second = runner.start(app, claimed)
    outcome = await jobs.run_now(app, "refund", "r2", wait=0.2)
    assert outcome.status == "running"
    release.set()
    await second


async def test_claimers_racing_on_one_node_take_every_job_exactly_once(settings, database):
    now = time.time()
    enqueue(database, "fast", [(str(n), now - n % 17) for n in range(200)])
    app = node(settings, database, "fast")
    runner = app[jobs.JOBS]

    async def claimer() -> list[int]:
        taken: list[int] = []
        while batch := await runner.claim_due(app, 7, now):
            taken += [j.id for j in batch]
            await asyncio.sleep(0)
        return taken

    taken = await asyncio.wait_for(asyncio.gather(*(claimer() for _ in range(6))), 60)
    ids = [i for got in taken for i in got]
    assert len(ids) == len(set(ids)) == 200
    assert {(r["status"], r["attempts"]) for r in rows(database).values()} == {("running", 1)}


async def test_a_burst_is_claimed_in_batches_and_every_job_runs_once(make_settings, database, monkeypatch):
    """9,950 reminders due at once (the signaling bench's rooms) are a backlog: the worker claims
    them once half its slots are free, not once per finished job, and stops reading whether
    anything is due first. Still at most ``job_concurrency`` at once, each job exactly once."""
    settings = make_settings(job_poll_seconds=60)  # only jobs' ends wake the worker
    assert settings.job_concurrency == 4
    ran: list[str] = []
    all_ran = asyncio.Event()
    inside = {"now": 0, "max": 0}

    async def send(app: web.Application, job: jobs.Job) -> None:
        inside["now"] += 1
        inside["max"] = max(inside["max"], inside["now"])
        await asyncio.sleep(0.002 * (int(job.key) % 3))  # jobs take their own times, as sends do
        inside["now"] -= 1
        ran.append(job.key)
        if len(ran) == 60:
            all_ran.set()

    calls = {"claims": 0, "looks": 0}

    def counted(name: str, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(jobs, "claim_due_sync", counted("claims", jobs.claim_due_sync))
    monkeypatch.setattr(jobs, "any_due_sync", counted("looks", jobs.any_due_sync))
    app = node(settings, database)
    runner = app[jobs.JOBS]
    runner.register("remind", send, timeout_s=10)
    enqueue(database, "remind", [(str(n), time.time() - 1) for n in range(60)])

    async with worker(app):
        await asyncio.wait_for(all_ran.wait(), 30)
        await asyncio.gather(*runner.running)  # the last ones' finishing writes
    assert sorted(ran, key=int) == [str(n) for n in range(60)]  # each once
    assert {r["status"] for r in rows(database).values()} == {"done"}
    assert 2 <= inside["max"] <= 4
    # 60 jobs in claims of 2 to 4: at most 30 claims, plus the one that finds the queue empty and
    # a margin; a look only when a claim got less than it asked. Claimed as each job ended, it
    # was 50 claims and 54 looks.
    assert calls["claims"] <= 33, calls
    assert calls["looks"] <= 8, calls


async def test_a_handlers_record_commits_in_the_write_that_finishes_its_job(settings, database):
    """A reminder is marked sent in the same transaction that marks its job done: one write, and
    never one without the other. A record that fails is a failed attempt, recorded in that same
    transaction; a record made after the claim was lost is still written."""

    def note(text: str, fail: bool = False):
        def record(d) -> None:
            d.execute(
                "INSERT INTO outbox (channel, recipient, subject, body, created)"
                " VALUES ('sms', '', ?, '', 0)",
                [text],
            )
            if fail:
                raise RuntimeError("the record failed")

        return record

    async def sends(app: web.Application, job: jobs.Job) -> jobs.Finish:
        if job.key == "lost":  # its lease ran out meanwhile and another node took it over
            await database.execute_write_fn(
                lambda d: d.execute("UPDATE jobs SET claim = 'another node' WHERE id = ?", [job.id])
            )
        if job.key == "broken":  # the database refuses the record's statement
            return jobs.Finish("sent", lambda d: d.execute("UPDATE no_such_table SET x = 1"))
        return jobs.Finish(f"sent {job.key}", note(job.key, fail=job.key == "bad"))

    app = node(settings, database)
    app[jobs.JOBS].register("remind", sends, timeout_s=10)
    later = time.time() + 600
    enqueue(database, "remind", [("good", later), ("bad", later), ("lost", later), ("broken", later)])
    written = lambda: database.read_sync(  # noqa: E731
        lambda d: [r[0] for r in d.execute("SELECT subject FROM outbox ORDER BY id")]
    )

    outcome = await jobs.run_now(app, "remind", "good")
    assert (outcome.status, outcome.result, outcome.ran) == ("done", "sent good", True)
    assert written() == ["good"]

    before = time.time()
    outcome = await jobs.run_now(app, "remind", "bad")
    assert (outcome.status, outcome.result, outcome.ran) == ("queued", None, True)
    assert written() == ["good"]  # nothing of the failed record
    bad = rows(database)["remind:bad"]
    assert (bad["status"], bad["attempts"], bad["claim"]) == ("queued", 1, None)
    assert bad["last_error"] == "RuntimeError: the record failed"
    assert bad["next_run_at"] >= before + app[jobs.JOBS].backoff(1)  # after its backoff

    # A statement the database refuses: on PostgreSQL it aborts the transaction, which the
    # savepoint brings back for the failed attempt's record.
    outcome = await jobs.run_now(app, "remind", "broken")
    assert (outcome.status, outcome.ran) == ("queued", True)
    broken = rows(database)["remind:broken"]
    assert broken["status"] == "queued" and "no_such_table" in broken["last_error"]

    outcome = await jobs.run_now(app, "remind", "lost")
    assert (outcome.status, outcome.result) == ("running", "sent lost")  # the other node's attempt
    assert written() == ["good", "lost"]


async def test_a_job_queued_while_the_worker_batches_takes_a_free_slot_at_once(make_settings, database):
    """Three refunds wait on a slow provider and a message ended: one slot is free, and the
    worker, whose last claim got all it asked for, would wait for half its slots before claiming.
    A job queued now (its enqueue wakes the worker) must not wait for the refunds."""
    settings = make_settings(job_poll_seconds=60)  # no poll comes to the rescue
    release = asyncio.Event()
    ran: list[str] = []

    async def work(app: web.Application, job: jobs.Job) -> None:
        if job.key.startswith("refund"):
            await release.wait()
        ran.append(job.key)

    app = node(settings, database)
    runner = app[jobs.JOBS]
    runner.register("task", work, timeout_s=30)
    now = time.time()
    enqueue(
        database, "task", [("refund1", now - 4), ("refund2", now - 3), ("refund3", now - 2), ("sms", now - 1)]
    )
    async with worker(app):
        try:
            for _ in range(500):
                if ran == ["sms"] and len(runner.running) == 3:
                    break
                await asyncio.sleep(0.01)
            assert ran == ["sms"] and len(runner.running) == 3
            await asyncio.sleep(0.2)  # the worker's round after the message ended: one slot, batching

            enqueue(database, "task", [("urgent", time.time() - 1)])
            jobs.wake(app)
            for _ in range(1000):
                if "urgent" in ran:
                    break
                await asyncio.sleep(0.01)
            assert ran == ["sms", "urgent"]  # while the refunds still wait
        finally:
            release.set()


async def test_drain_waits_for_the_jobs_the_worker_is_claiming(make_settings, database):
    """The worker's claim has committed but its jobs have not started: they are no longer due and
    not yet running. A drain then (a test's, a one-off's) must wait for them, not return; so must
    a person asking for one of them (run_now), as for any attempt the worker took first."""
    settings = make_settings(job_poll_seconds=60)
    app = node(settings, database)
    runner = app[jobs.JOBS]
    ran: list[str] = []

    async def work(app: web.Application, job: jobs.Job) -> None:
        ran.append(job.key)

    runner.register("task", work, timeout_s=10)
    claim = runner.claim_due
    claimed = asyncio.Event()

    async def slow_to_start(*args, **kwargs) -> list[jobs.Job]:
        got = await claim(*args, **kwargs)
        if got:  # the worker's: its claim committed, its jobs start only a moment later
            claimed.set()
            await asyncio.sleep(0.3)
        return got

    runner.claim_due = slow_to_start
    enqueue(database, "task", [("k", time.time() - 1), ("m", time.time() - 1)])
    async with worker(app):
        await asyncio.wait_for(claimed.wait(), 10)
        assert rows(database)["task:m"]["status"] == "running"
        outcome = await jobs.run_now(app, "task", "m", wait=10)
        assert (outcome.status, outcome.ran) == ("done", False)  # the worker's attempt, waited for
        claimed.clear()
        enqueue(database, "task", [("n", time.time() - 1)])
        jobs.wake(app)
        await asyncio.wait_for(claimed.wait(), 10)
        assert rows(database)["task:n"]["status"] == "running"
        assert await jobs.drain(app) == 0  # none left for the drain to run itself
        assert sorted(ran) == ["k", "m", "n"]
        assert {r["status"] for r in rows(database).values()} == {"done"}
