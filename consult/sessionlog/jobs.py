"""The session log's background job: closing visits nobody joined."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from consult.core import keys, leader
from consult.sessionlog.events import mark_no_shows_sync

log = logging.getLogger(__name__)


async def no_show_marker(app: web.Application) -> AsyncIterator[None]:
    """Close visits nobody joined, every reaper interval, until the app stops."""
    settings = app[keys.SETTINGS]

    async def run() -> None:
        while True:
            try:
                if leader.leads(app):
                    await app[keys.DB].execute_write_fn(
                        lambda db: mark_no_shows_sync(db, time.time(), tz=settings.timezone)
                    )
            except Exception:
                log.exception("marking no-shows failed")
            await asyncio.sleep(settings.reaper_interval_seconds)

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
