"""Live pages: "something changed on topic T" from whoever changed it, to the open pages that show T.

A page that updates itself (the doctor's clinic board, the patient's waiting page) holds a
server-sent-events stream; its handler subscribes to a topic (a doctor's board, a doctor's
running-late notice) and, at each nudge, reads what it shows again and sends it. A nudge carries
no data: readers always read the database (and the live rooms), so a lost or coalesced nudge
costs nothing but a moment, and nothing private travels through here.

Each topic takes a bounded number of subscribers (``Live.limit``), so no client can hold
unbounded memory by opening streams; at shutdown every stream is told to end.

With several nodes (PostgreSQL), a page may follow a topic on one node while the change happens
on another: every nudge also goes out as a PostgreSQL ``NOTIFY`` and each node publishes the
nudges it hears from the others (`Relay`). A nudge lost while a node reconnects costs what a lost
nudge always costs: the page's next periodic read picks the change up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Hashable
from typing import Any

from aiohttp import web

from consult.core.errors import TooManyRequests
from consult.core.i18n import _

log = logging.getLogger(__name__)
CHANNEL = "consult_live"


class Subscription:
    """One open stream's mailbox: at most one pending nudge (nudges coalesce)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def nudge(self) -> None:
        self._event.set()

    def close(self) -> None:
        self.closed = True
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """True when nudged (or closed) within ``timeout_s``; False on a quiet timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Live:
    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._topics: dict[Hashable, set[Subscription]] = {}
        self.relay: Relay | None = None  # the other nodes, when there are any

    def publish(self, topic: Hashable) -> None:
        self.publish_here(topic)
        if self.relay is not None:
            self.relay.send(topic)

    def publish_here(self, topic: Hashable) -> None:
        for sub in self._topics.get(topic, ()):
            sub.nudge()

    def count(self, topic: Hashable) -> int:
        return len(self._topics.get(topic, ()))

    @contextlib.contextmanager
    def subscribe(self, topic: Hashable, limit: int | None = None):  # -> Iterator[Subscription]
        subs = self._topics.setdefault(topic, set())
        if len(subs) >= (limit or self.limit):
            if not subs:
                self._topics.pop(topic, None)
            raise TooManyRequests(
                _("Too many windows are following this page. Close one and reload."), code="too_many_streams"
            )
        sub = Subscription()
        subs.add(sub)
        try:
            yield sub
        finally:
            subs.discard(sub)
            if not subs:
                self._topics.pop(topic, None)

    def close_all(self) -> None:
        for subs in self._topics.values():
            for sub in subs:
                sub.close()


LIVE = web.AppKey("live", Live)


def publish(app: web.Application, topic: Hashable) -> None:
    """Nudge the open pages following ``topic`` (a no-op in an app without live pages)."""
    live = app.get(LIVE)
    if live is not None:
        live.publish(topic)


class Relay:
    """Nudges to and from the other nodes over PostgreSQL LISTEN/NOTIFY (no other broker).

    One connection of its own listens on `CHANNEL`; nudges to send wait in a small set (a burst of
    nudges on one topic goes out once) for the sender. Each nudge names the node that sent it, so
    a node does not publish its own twice. The connection is re-made after any failure.
    """

    def __init__(self, live: Live, url: str, *, max_pending: int = 1000) -> None:
        self.live = live
        self.url = url
        self.node = secrets.token_hex(6)
        self.max_pending = max_pending
        self._pending: dict[str, None] = {}
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()

    def send(self, topic: Hashable) -> None:
        if len(self._pending) >= self.max_pending:
            return  # coalesced away: pages still re-read on their own timer
        self._pending[json.dumps([self.node, list(topic) if isinstance(topic, tuple) else topic])] = None
        self._wake.set()

    def _heard(self, payload: str) -> None:
        try:
            node, topic = json.loads(payload)
        except (ValueError, TypeError):
            return
        if node == self.node:
            return
        self.live.publish_here(tuple(topic) if isinstance(topic, list) else topic)

    async def run(self) -> None:
        import psycopg

        delay = 0.5
        while True:
            try:
                # Two connections: psycopg's notifies() holds its connection while it waits.
                async with (
                    await psycopg.AsyncConnection.connect(self.url, autocommit=True) as listener,
                    await psycopg.AsyncConnection.connect(self.url, autocommit=True) as sender,
                ):
                    await listener.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    delay = 0.5
                    sending = asyncio.create_task(self._send_loop(sender))
                    try:
                        async for note in listener.notifies():
                            self._heard(note.payload)
                            if sending.done():
                                sending.result()  # the sender failed: start over
                    finally:
                        sending.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await sending
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("live nudges between nodes interrupted (%s); reconnecting in %.1f s", exc, delay)
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _send_loop(self, conn: Any) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = list(self._pending), {}
            for payload in batch:
                await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])


async def stop_task(task: asyncio.Task, within_s: float = 5.0) -> None:
    """Cancel a connection's task and wait for it a bounded time: a database connection that
    does not answer its cancellation must not hold the app's shutdown."""
    task.cancel()
    done, _pending = await asyncio.wait({task}, timeout=within_s)
    if not done:
        log.warning("%s did not stop within %.0f s; shutting down without it", task.get_name(), within_s)
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


def setup(app: web.Application, database_url: str = "") -> None:
    """Called by ``create_app``: the app's topics, and every stream ends at shutdown; with a
    PostgreSQL ``database_url``, nudges also travel to and from the other nodes."""
    live = app[LIVE] = Live()

    async def end_streams(_app: web.Application) -> None:
        live.close_all()

    app.on_shutdown.append(end_streams)
    if database_url:

        async def relay_ctx(_app: web.Application) -> AsyncIterator[None]:
            live.relay = Relay(live, database_url)
            task = asyncio.get_running_loop().create_task(live.relay.run(), name="live-relay")
            try:
                yield
            finally:
                await stop_task(task)
                live.relay = None

        app.cleanup_ctx.append(relay_ctx)


def board_topic(doctor_id: int) -> tuple[str, int]:
    """A doctor's clinic board: their visits' rooms, reports, bookings."""
    return ("board", doctor_id)


def late_topic(doctor_id: int) -> tuple[str, int]:
    """A doctor's running-late notice, followed by that doctor's patients' waiting pages."""
    return ("late", doctor_id)
