"""Which node runs the periodic sweeps: exactly one at a time.

Expiring holds, marking no-shows and closing rooms a dead node left open are safe to run twice
(each is one idempotent write), but on several nodes they would run once per node for nothing.
On PostgreSQL the node holding a session-level advisory lock (`LEADER_KEY`) on a connection of
its own is the leader; when that node dies, its connection and so its lock go with it, and the
next node to try (every `RETRY_S`) takes over. With SQLite there is one node: it always leads.

Per-node work is not led: the job worker's claims, the rooms' lease renewals, a node's own
start-up repairs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from consult.core.live import stop_task

log = logging.getLogger(__name__)

LEADER_KEY = 0x4C656164  # "Lead"
RETRY_S = 2.0


class Leadership:
    def __init__(self, url: str = "", *, retry_s: float = RETRY_S) -> None:
        self.url = url
        self.retry_s = retry_s
        self._leading = not url  # one node (SQLite): always
        self.changed = asyncio.Event()

    def is_leader(self) -> bool:
        return self._leading

    def _set(self, leading: bool) -> None:
        if leading != self._leading:
            log.info("this node %s the periodic sweeps", "now runs" if leading else "no longer runs")
            self._leading = leading
            self.changed.set()

    async def run(self) -> None:
        """Try for the lock, hold it while the connection lives; never returns (cancel it)."""
        if not self.url:
            return
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    while True:
                        if not self._leading:
                            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_KEY])
                            self._set(bool((await cur.fetchone())[0]))
                        else:
                            await conn.execute("SELECT 1")  # the connection, and so the lock, lives
                        await asyncio.sleep(self.retry_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leadership connection lost (%s)", exc)
            self._set(False)
            await asyncio.sleep(self.retry_s)


LEADER = web.AppKey("leader", Leadership)


def setup(app: web.Application, database_url: str = "") -> None:
    """Called by ``create_app``: with PostgreSQL, this node competes for the sweeps."""
    leadership = app[LEADER] = Leadership(database_url)
    if not database_url:
        return

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(leadership.run(), name="leadership")
        try:
            yield
        finally:
            await stop_task(task)

    app.cleanup_ctx.append(ctx)


def leads(app: web.Application) -> bool:
    """Whether this node runs the periodic sweeps now (always, in an app without leadership)."""
    leadership = app.get(LEADER)
    return leadership is None or leadership.is_leader()
