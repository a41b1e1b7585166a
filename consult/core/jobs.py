"""Durable background jobs: work that must still happen after a crash.

A job is written by ``enqueue_sync`` INSIDE the write transaction of the fact that causes it (a
payment to refund, a message to send): both commit, or neither does. ``(kind, key)`` is unique,
so the same job is never queued twice; enqueueing it again changes nothing.

The worker (``worker_ctx``, started by ``consult.app.create_app``) claims due jobs in one
statement (``queued`` -> ``running``, with a claim token and a lease), runs the handler that the
owning package registered for the job's kind (``Runner.register``), and records what happened:
``done``; ``queued`` again after an exponential backoff (capped); or ``dead`` after its last
attempt (logged as an error, counted in /metrics, kept until an admin acts). A job left
``running`` by a dead process is due again once its lease has expired; finished jobs are deleted
after the retention period (``sweep_sync``, at start-up and then periodically). Claims are per
job, so different jobs run concurrently and one job never runs twice at once.

Several nodes on one PostgreSQL claim side by side: a claim is the one write that does not take
the cluster's write lock (``execute_write_fn(..., exclusive=False)``); it locks the rows it takes
with ``FOR UPDATE SKIP LOCKED`` (``core.db.skip_locked``), so a node passes over the jobs another
is claiming. The records (finish, fail, release, the sweep) take the lock as every write does;
they address ``running`` rows by id and claim token, which no claim touches.

Handlers must be idempotent: a crash after the work but before the record runs it again.
This module knows nothing of payments or booking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils
from aiohttp import web

from consult.core import keys, metrics
from consult.core.config import Settings
from consult.core.db import savepoint, skip_locked

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, DEAD = "queued", "running", "done", "dead"
LEASE_MARGIN_S = 30.0  # a claim outlives its attempt's timeout by this much


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    attempts: int  # including this one
    max_attempts: int | None
    claim: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"],
            kind=row["kind"],
            key=row["key"],
            payload=json.loads(row["payload"]),
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            claim=row["claim"],
        )


@dataclass(frozen=True)
class Outcome:
    """A job's status after ``run_now`` or an attempt; ``result`` is its handler's return value."""

    status: str | None  # done, queued (will be retried), running (elsewhere), dead; None: no such job
    result: Any = None
    ran: bool = False  # whether the handler ran in this call


class Retry(Exception):
    """Raised by a handler whose work is not finished yet: try again later, like a failure."""


@dataclass(frozen=True)
class Finish:
    """What a handler may return when its work leaves a fact to write: ``record(db)`` runs in the
    transaction that marks the job done, so the two commit together (one write instead of two,
    and never the job done without its fact). ``result`` is what the caller of ``run_now`` gets.

    A record that raises is rolled back alone (a savepoint) and the attempt counts as failed, in
    the same transaction: queued again after its backoff, or dead. The record is written even
    when the claim was lost meanwhile, as a write the handler made itself would have been.
    """

    result: Any
    record: Callable[[sqlite_utils.Database], None]


Handler = Callable[[web.Application, Job], Awaitable[Any]]
Sweep = Callable[[sqlite_utils.Database, float], int]


# -- storage (each *_sync runs in a write transaction, except the reads) -----------------------


def enqueue_sync(
    db: sqlite_utils.Database,
    kind: str,
    payload: dict[str, Any],
    *,
    key: str,
    now: float | None = None,
    run_after: float | None = None,
    max_attempts: int | None = None,
) -> bool:
    """Queue a job in the caller's write transaction; False when ``(kind, key)`` already exists."""
    if not db.conn.in_transaction:
        raise RuntimeError("enqueue_sync belongs inside the write transaction of the fact it follows")
    now = time.time() if now is None else now
    cur = db.execute(
        "INSERT INTO jobs (kind, key, payload, status, max_attempts, next_run_at, created, updated)"
        " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?) ON CONFLICT (kind, key) DO NOTHING",
        [
            kind,
            key,
            json.dumps(payload, sort_keys=True, ensure_ascii=False),
            max_attempts,
            now if run_after is None else run_after,
            now,
            now,
        ],
    )
    return cur.rowcount == 1


_CLAIM = (
    "UPDATE jobs SET status = 'running', attempts = attempts + 1, claim = ?, claimed_at = ?,"
    " lease_until = {lease_until}, updated = ? WHERE {where} RETURNING *"
)


def claim_due_sync(db: sqlite_utils.Database, now: float, limit: int, leases: dict[str, float]) -> list[Job]:
    """Flip up to ``limit`` due jobs of the given kinds (kind -> lease seconds) to running.

    One statement, which needs no cluster-wide write lock (run it with ``exclusive=False``): on
    PostgreSQL the due rows are selected ``FOR UPDATE SKIP LOCKED``, so a node claiming at the
    same moment passes over the rows this one is taking and takes others, and no job is claimed
    twice. The rows are chosen once, in a materialised CTE: as ``WHERE id IN (SELECT ... LIMIT)``
    PostgreSQL may run the subquery again for each row it compares (a nested-loop semi-join) and
    claim more than ``limit``. The jobs come back oldest due first.
    """
    if limit <= 0 or not leases:
        return []
    marks = ",".join("?" * len(leases))
    due = (
        "WITH due AS MATERIALIZED (SELECT id FROM jobs WHERE status = 'queued' AND next_run_at <= ?"  # noqa: S608
        f" AND kind IN ({marks}) ORDER BY next_run_at, id LIMIT ?{skip_locked(db)}) "
    )
    lease_until = "CASE kind" + " WHEN ? THEN ?" * len(leases) + " END"  # each kind its own lease
    rows = db.execute(
        due + _CLAIM.format(lease_until=lease_until, where="id IN (SELECT id FROM due)"),
        [
            now,
            *leases,
            limit,
            secrets.token_hex(8),
            now,
            *(value for kind, lease_s in leases.items() for value in (kind, now + lease_s)),
            now,
        ],
    ).fetchall()
    rows.sort(key=lambda r: (r["next_run_at"], r["id"]))  # RETURNING promises no order
    return [Job.from_row(r) for r in rows]


def claim_key_sync(db: sqlite_utils.Database, kind: str, key: str, now: float, lease_s: float) -> Job | None:
    """Claim one queued job now, even if its retry time has not come (someone asked for it).

    One statement, like `claim_due_sync`, without skipping: if another node is claiming this
    very job, PostgreSQL waits the moment until that claim commits and then finds the job
    running (None), as SQLite's one writer would.
    """
    row = db.execute(
        _CLAIM.format(lease_until="?", where="kind = ? AND key = ? AND status = 'queued'"),
        [secrets.token_hex(8), now, now + lease_s, now, kind, key],
    ).fetchone()
    return Job.from_row(row) if row is not None else None


def finish_sync(db: sqlite_utils.Database, job: Job, now: float) -> bool:
    """Record success; False when the claim was lost (its lease expired and it was taken over)."""
    cur = db.execute(
        "UPDATE jobs SET status = 'done', finished_at = ?, updated = ?, lease_until = NULL, claim = NULL"
        " WHERE id = ? AND claim = ? AND status = 'running'",
        [now, now, job.id, job.claim],
    )
    return cur.rowcount == 1


def fail_sync(
    db: sqlite_utils.Database, job: Job, now: float, error: str, *, limit: int, delay: float
) -> str | None:
    """Record a failed attempt: queued again after ``delay``, or dead after ``limit`` attempts."""
    status = DEAD if job.attempts >= limit else QUEUED
    cur = db.execute(
        "UPDATE jobs SET status = ?, next_run_at = ?, last_error = ?, updated = ?, lease_until = NULL,"
        " claim = NULL, finished_at = ? WHERE id = ? AND claim = ? AND status = 'running'",
        [status, now + delay, error[:1000], now, now if status == DEAD else None, job.id, job.claim],
    )
    return status if cur.rowcount == 1 else None


def release_sync(db: sqlite_utils.Database, jobs: list[Job], now: float) -> None:
    """Shutdown interrupted these attempts: queue them again at once; the attempt does not count."""
    for job in jobs:
        db.execute(
            "UPDATE jobs SET status = 'queued', attempts = max(0, attempts - 1), next_run_at = ?,"
            " updated = ?, lease_until = NULL, claim = NULL, last_error = 'interrupted by shutdown'"
            " WHERE id = ? AND claim = ? AND status = 'running'",
            [now, now, job.id, job.claim],
        )


def sweep_sync(
    db: sqlite_utils.Database, now: float, *, retention_s: float, default_max_attempts: int
) -> dict[str, Any]:
    """Finish what a crash left: expired leases become due (or dead); prune old finished jobs."""
    expired = db.execute(
        "SELECT id, kind, key, attempts, coalesce(max_attempts, ?) AS limit_ FROM jobs"
        " WHERE status = 'running' AND lease_until < ?",
        [default_max_attempts, now],
    ).fetchall()
    dead = []
    for row in expired:
        gone = row["attempts"] >= row["limit_"]
        if gone:
            dead.append(f"{row['kind']}:{row['key']}")
        db.execute(
            "UPDATE jobs SET status = ?, next_run_at = ?, updated = ?, lease_until = NULL, claim = NULL,"
            " finished_at = ?, last_error = 'lease expired: the process stopped during this attempt'"
            " WHERE id = ?",
            [DEAD if gone else QUEUED, now, now, now if gone else None, row["id"]],
        )
    pruned = db.execute(
        "DELETE FROM jobs WHERE status = 'done' AND finished_at < ?", [now - retention_s]
    ).rowcount
    counts = {r[0]: r[1] for r in db.execute("SELECT status, count(*) FROM jobs GROUP BY status")}
    return {"recovered": len(expired) - len(dead), "dead": dead, "pruned": pruned, "counts": counts}


def status_sync(db: sqlite_utils.Database, kind: str, key: str) -> str | None:
    row = db.execute("SELECT status FROM jobs WHERE kind = ? AND key = ?", [kind, key]).fetchone()
    return row[0] if row else None


def any_due_sync(db: sqlite_utils.Database, now: float, kinds: list[str]) -> bool:
    marks = ",".join("?" * len(kinds))
    return (
        db.execute(
            f"SELECT 1 FROM jobs WHERE status = 'queued' AND next_run_at <= ? AND kind IN ({marks}) LIMIT 1",  # noqa: S608
            [now, *kinds],
        ).fetchone()
        is not None
    )


def dead_sync(db: sqlite_utils.Database, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Jobs given up on, newest first, for admins."""
    # The kind's condition only when one is asked for: PostgreSQL cannot type a bare "? IS NULL".
    of_kind, params = (" AND kind = ?", [kind]) if kind is not None else ("", [])
    rows = db.execute(
        "SELECT id, kind, key, payload, attempts, last_error, finished_at FROM jobs WHERE status = 'dead'"  # noqa: S608
        f"{of_kind} ORDER BY finished_at DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]


def retry_sync(db: sqlite_utils.Database, kind: str, key: str, now: float) -> bool:
    """An admin asks for a dead job to be tried again, with a fresh count of attempts."""
    cur = db.execute(
        "UPDATE jobs SET status = 'queued', attempts = 0, next_run_at = ?, updated = ?, finished_at = NULL"
        " WHERE kind = ? AND key = ? AND status = 'dead'",
        [now, now, kind, key],
    )
    return cur.rowcount == 1


# -- the runner ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    handler: Handler
    max_attempts: int
    timeout_s: float


class Runner:
    """The kinds' handlers and the worker's state; one per application (``JOBS``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.kinds: dict[str, Kind] = {}
        self.sweeps: list[tuple[str, Sweep]] = []
        self.running: dict[asyncio.Task[Outcome], Job] = {}
        self.counts: dict[str, int] = {}
        self.clock: Callable[[], float] = time.time
        self._woken = False  # a wake-up that came while the worker was busy
        self._asked = False  # ... of those, one from outside (a job queued), not a job's end
        self._backlog = False  # the worker's last claim took all it asked for: more may be due
        self._idle: asyncio.Future[bool] | None = None
        self._claiming: asyncio.Future[None] | None = None  # the worker's claim, until its jobs start

    # registration, by the owning packages through the app factory
    def register(
        self, kind: str, handler: Handler, *, max_attempts: int | None = None, timeout_s: float | None = None
    ) -> None:
        if kind in self.kinds:
            raise ValueError(f"job kind {kind!r} registered twice")
        self.kinds[kind] = Kind(
            handler,
            max_attempts or self.settings.job_max_attempts,
            timeout_s or self.settings.job_timeout_seconds,
        )

    def add_sweep(self, name: str, fn: Sweep) -> None:
        """``fn(db, now) -> count`` runs in a write transaction at start-up and every sweep."""
        self.sweeps.append((name, fn))

    # policy
    def lease_s(self, kind: str) -> float:
        return self.kinds[kind].timeout_s + LEASE_MARGIN_S

    def backoff(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failure: base, 2 x base, 4 x base ... capped."""
        base = self.settings.job_retry_base_seconds
        return float(min(self.settings.job_retry_max_seconds, base * 2 ** max(0, attempts - 1)))

    def wake(self) -> None:
        """A job was queued: the worker claims now, into any free slot."""
        self._asked = True
        self._wake()

    def _wake(self) -> None:
        self._woken = True
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(True)

    async def _rest(self, seconds: float) -> bool:
        """Until woken (True), or ``seconds`` (False) (a plain future: no wait_for, whose 3.11
        version can swallow a cancellation and keep the worker alive at shutdown)."""
        if self._woken:
            self._woken = False
            return True
        loop = asyncio.get_running_loop()
        self._idle = loop.create_future()
        timer = loop.call_later(seconds, lambda f: f.done() or f.set_result(False), self._idle)
        try:
            return await self._idle
        finally:
            timer.cancel()
            self._idle = None
            self._woken = False

    # the work
    async def sweep(self, app: web.Application, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        settings = self.settings

        def write(db: sqlite_utils.Database) -> dict[str, Any]:
            found: dict[str, Any] = {}
            for name, fn in self.sweeps:
                try:
                    with savepoint(db, "job_sweep"):
                        found[name] = fn(db, now)
                except Exception:  # one package's sweep must not stop the others
                    log.exception("job sweep %s failed", name)
            found.update(
                sweep_sync(
                    db,
                    now,
                    retention_s=settings.job_retention_days * 86400,
                    default_max_attempts=settings.job_max_attempts,
                )
            )
            return found

        found = await app[keys.DB].execute_write_fn(write)
        self.counts = found["counts"]
        for name in found["dead"]:
            log.error("job %s is dead: its lease expired after its last attempt", name)
            metrics.count(app, "jobs_died")
        if found["recovered"] or found["dead"]:
            log.warning("jobs left running by a stopped process: %d due again", found["recovered"])
        if any(found.get(name) for name, _fn in self.sweeps) or found["recovered"]:
            self.wake()
        return found

    async def claim_due(
        self, app: web.Application, limit: int, now: float | None = None, *, look_first: bool = True
    ) -> list[Job]:
        """Claim up to ``limit`` due jobs. ``look_first``: read whether any is due before taking
        the writer for the claim (the common case, nothing due, stays off the writer); a worker
        in a backlog knows there is more and claims straight away."""
        now = self.clock() if now is None else now
        kinds = list(self.kinds)
        db = app[keys.DB]
        if limit <= 0 or not kinds:
            return []
        if look_first and not await db.execute_fn(lambda d: any_due_sync(d, now, kinds)):
            return []
        leases = {kind: self.lease_s(kind) for kind in kinds}
        return await db.execute_write_fn(lambda d: claim_due_sync(d, now, limit, leases), exclusive=False)

    def start(self, app: web.Application, job: Job, now: float | None = None) -> asyncio.Task[Outcome]:
        task = asyncio.get_running_loop().create_task(
            self._perform(app, job, now), name=f"job-{job.kind}-{job.id}"
        )
        self.running[task] = job
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Outcome]) -> None:
        self.running.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("job task %s failed", task.get_name(), exc_info=task.exception())
        self._wake()  # room for the next job

    async def _perform(self, app: web.Application, job: Job, now: float | None) -> Outcome:
        kind = self.kinds[job.kind]
        db = app[keys.DB]
        limit = job.max_attempts or kind.max_attempts
        delay = self.backoff(job.attempts)
        try:
            result = await asyncio.wait_for(kind.handler(app, job), kind.timeout_s)
        except Exception as exc:
            at = self.clock() if now is None else now
            error = _error_text(exc)
            status = await db.execute_write_fn(
                lambda d: fail_sync(d, job, at, error, limit=limit, delay=delay)
            )
            return self._failed(app, job, status, exc, limit, delay)
        at = self.clock() if now is None else now
        record = None
        if isinstance(result, Finish):
            result, record = result.result, result.record

        def finish(
            d: sqlite_utils.Database,
        ) -> tuple[Any, Exception | None]:  # (done, None) or (status, error)
            if record is not None:
                try:
                    with savepoint(d, "job_record"):
                        record(d)
                except Exception as exc:  # the attempt failed after all: its record's error
                    return fail_sync(d, job, at, _error_text(exc), limit=limit, delay=delay), exc
            return finish_sync(d, job, at), None

        finished, failure = await db.execute_write_fn(finish)
        if failure is not None:
            return self._failed(app, job, finished, failure, limit, delay)
        if finished:
            metrics.count(app, "jobs_done")
            return Outcome(DONE, result, ran=True)
        log.warning("job %s:%s finished after its claim was taken over", job.kind, job.key)
        return Outcome(await db.execute_fn(lambda d: status_sync(d, job.kind, job.key)), result, ran=True)

    def _failed(
        self, app: web.Application, job: Job, status: str | None, exc: Exception, limit: int, delay: float
    ) -> Outcome:
        """Count and log a failed attempt that ``fail_sync`` recorded as ``status``."""
        metrics.count(app, "jobs_failed")
        error = _error_text(exc)
        if status == DEAD:
            metrics.count(app, "jobs_died")
            log.error("job %s:%s is dead after %d attempts: %s", job.kind, job.key, job.attempts, error)
        elif isinstance(exc, Retry):
            log.info("job %s:%s not finished (%s); again in %.0f s", job.kind, job.key, error, delay)
        else:
            log.warning(
                "job %s:%s failed (attempt %d of %d); again in %.0f s",
                job.kind,
                job.key,
                job.attempts,
                limit,
                delay,
                exc_info=exc,
            )
        return Outcome(status, None, ran=True)

    async def run_now(
        self, app: web.Application, kind: str, key: str, *, wait: float | None = None
    ) -> Outcome:
        """Claim one job and run it now, waiting at most ``wait`` s (it carries on regardless)."""
        if kind not in self.kinds:
            raise KeyError(kind)
        db = app[keys.DB]
        now = self.clock()
        job = await db.execute_write_fn(
            lambda d: claim_key_sync(d, kind, key, now, self.lease_s(kind)), exclusive=False
        )
        if job is None:  # done, dead, missing, or running: here (the worker took it first) or elsewhere
            if self._claiming is not None:  # the worker's claim, perhaps of this job, not started yet
                await asyncio.wait({self._claiming})
            task = next((t for t, j in self.running.items() if (j.kind, j.key) == (kind, key)), None)
            if task is None:
                return Outcome(await db.execute_fn(lambda d: status_sync(d, kind, key)))
            # This process's worker claimed it a moment before: wait for that attempt as for
            # ours, and say what it did (the handler did not run in this call).
            try:
                done = await asyncio.wait_for(asyncio.shield(task), wait)
            except TimeoutError:
                return Outcome(RUNNING)
            return Outcome(done.status, done.result, ran=False)
        task = self.start(app, job)
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return Outcome(RUNNING)

    async def drain(self, app: web.Application, *, now: float | None = None, rounds: int = 1000) -> int:
        """Run every due job (and wait for those running, or being claimed by the worker) until
        none is due; how many ran here."""
        ran = 0
        for _ in range(rounds):
            jobs = await self.claim_due(app, max(1, self.settings.job_concurrency), now)
            if not jobs:
                if self._claiming is not None:  # what it claims is no longer due, and not yet running
                    await asyncio.wait({self._claiming})
                    continue
                if not self.running:
                    break
                await asyncio.gather(*list(self.running), return_exceptions=True)
                continue
            await asyncio.gather(*(self.start(app, job, now) for job in jobs), return_exceptions=True)
            ran += len(jobs)
        return ran

    async def work(self, app: web.Application) -> None:
        """The worker's loop: claim what is due, up to the concurrency; sweep now and then."""
        poll = max(0.01, float(self.settings.job_poll_seconds))
        sweep_every = max(0.05, float(self.settings.reaper_interval_seconds))
        next_sweep = time.monotonic() + sweep_every
        fill = True  # into any free slot: the first round, and after a rest that timed out
        while True:
            self._woken = False
            fill, self._asked = fill or self._asked, False
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_every
                    await self.sweep(app)
                free = self.settings.job_concurrency - len(self.running)
                # In a backlog (the last claim got all it asked for: a burst of reminders, say)
                # the worker claims in batches, once half its slots are free rather than each
                # time a job ends, and without reading first whether anything is due: fewer
                # writes per job. A job queued meanwhile (a wake from outside), a rest that timed
                # out, or no backlog: any free slot is filled at once.
                batching = self._backlog and not fill
                if free > 0 and (not batching or 2 * free >= self.settings.job_concurrency):
                    self._claiming = asyncio.get_running_loop().create_future()
                    try:
                        claimed = await self.claim_due(app, free, look_first=not self._backlog)
                        self._backlog = free >= 2 and len(claimed) == free  # a claim of one is no batch
                        for job in claimed:
                            self.start(app, job)
                    finally:
                        self._claiming.set_result(None)
                        self._claiming = None
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job worker round failed")
            fill = not await self._rest(poll)

    async def close(self, app: web.Application) -> None:
        """Stop the attempts in flight and queue them again (the database is still open)."""
        interrupted = list(self.running.values())
        for task in list(self.running):
            task.cancel()
        for task in list(self.running):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if interrupted:
            now = self.clock()
            with contextlib.suppress(Exception):
                await app[keys.DB].execute_write_fn(lambda d: release_sync(d, interrupted, now))


def _error_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, Retry) else f"{type(exc).__name__}: {exc}"


JOBS = web.AppKey("jobs", Runner)


def setup(app: web.Application) -> Runner:
    """The app factory calls this before the packages register their kinds."""
    runner = app[JOBS] = Runner(app[keys.SETTINGS])
    return runner


def wake(app: web.Application) -> None:
    """After committing a transaction that queued jobs: run them soon rather than at the next poll."""
    runner = app.get(JOBS)
    if runner is not None:
        runner.wake()


async def run_now(app: web.Application, kind: str, key: str, *, wait: float | None = None) -> Outcome:
    return await app[JOBS].run_now(app, kind, key, wait=wait)


async def drain(app: web.Application, *, now: float | None = None) -> int:
    return await app[JOBS].drain(app, now=now)


async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: at start-up, finish what a crash left (sweep); then the worker's loop."""
    runner = app[JOBS]
    if app.get(metrics.METRICS) is not None:
        metrics.provide(
            app, "jobs_queued", lambda: runner.counts.get(QUEUED, 0) + runner.counts.get(RUNNING, 0)
        )
        metrics.provide(app, "jobs_dead", lambda: runner.counts.get(DEAD, 0))
    try:
        await runner.sweep(app)
    except Exception:
        log.exception("the start-up job sweep failed")
    task = asyncio.get_running_loop().create_task(runner.work(app), name="jobs-worker")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.close(app)
