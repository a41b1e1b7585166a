"""Live pages: "something changed on topic T" from whoever changed it, to the open pages that show T.

A page that updates itself (the doctor's clinic board, the patient's waiting page) holds a
server-sent-events stream; its handler subscribes to a topic (a doctor's board, a doctor's
running-late notice) and, at each nudge, reads what it shows again and sends it. A nudge carries
no data: readers always read the database (and the live rooms), so a lost or coalesced nudge
costs nothing but a moment, and nothing private travels through here.

Each topic takes a bounded number of subscribers (``Live.limit``), so no client can hold
unbounded memory by opening streams; at shutdown every stream is told to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable

from aiohttp import web

from consult.core.errors import TooManyRequests
from consult.core.i18n import _


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

    def publish(self, topic: Hashable) -> None:
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


def setup(app: web.Application) -> None:
    """Called by ``create_app``: the app's topics, and every stream ends at shutdown."""
    app[LIVE] = Live()

    async def end_streams(_app: web.Application) -> None:
        app[LIVE].close_all()

    app.on_shutdown.append(end_streams)


def board_topic(doctor_id: int) -> tuple[str, int]:
    """A doctor's clinic board: their visits' rooms, reports, bookings."""
    return ("board", doctor_id)


def late_topic(doctor_id: int) -> tuple[str, int]:
    """A doctor's running-late notice, followed by that doctor's patients' waiting pages."""
    return ("late", doctor_id)
