"""Delivery of room events to the policy, off the rooms' critical path.

Rooms emit synchronously (after their state change); one task per server awaits
`policy.on_event` in order. A slow or failing event sink therefore never delays a relay or a
timer, and an exception in it is logged, never propagated into a room. A room that ends waits
(`delivered`) until the events it emitted before have reached the policy, so that the policy
records the end after everything that led to it. When the policy answers an event with False
(not stored: that seat's storage budget is used up), `over_budget(event)` is called.

A policy that also has `on_events(events) -> list[bool | None]` is handed everything queued at
once (up to `BATCH_MAX`, in order), so that a burst (a clinic's sockets connecting together) is
stored in one write; it answers for each event what `on_event` would and must keep one event's
failure from losing the others (an exception loses the whole batch, logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from signaling.policy import RoomEvent, RoomPolicy

log = logging.getLogger(__name__)

# Telemetry may be shed under pressure; state-changing events are never dropped on purpose.
_SHEDDABLE: Final = frozenset({"stats", "ice_state"})
# Events handed to `policy.on_events` at once, at most.
BATCH_MAX: Final = 256


class EventDispatcher:
    def __init__(
        self,
        policy: RoomPolicy,
        *,
        max_pending: int = 10_000,
        over_budget: Callable[[RoomEvent], None] | None = None,
    ) -> None:
        self._policy = policy
        self._over_budget = over_budget
        self._max_pending = max_pending
        # Events, and the futures of `delivered` calls (resolved when the task reaches them).
        self._queue: asyncio.Queue[RoomEvent | asyncio.Future[None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def emit(self, event: RoomEvent) -> None:
        if event.name in _SHEDDABLE and self._queue.qsize() >= self._max_pending:
            self.dropped += 1
            return
        self._queue.put_nowait(event)
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def delivered(self, timeout_s: float = 5) -> None:
        """Wait until every event emitted before this call has been handed to the policy (not
        those emitted meanwhile); give up after `timeout_s`, logging it."""
        if self._queue.empty() and (self._task is None or self._task.done()):
            return
        marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(marker)
        self._ensure_task()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(marker)
        except TimeoutError:
            log.warning("room events still undelivered after %.0f s", timeout_s)

    async def flush(self) -> None:
        """Wait until every event emitted so far has been handed to the policy."""
        await self._queue.join()

    async def aclose(self, timeout_s: float = 5) -> None:
        if self._task is not None and not self._task.done():
            try:
                async with asyncio.timeout(timeout_s):
                    await self.flush()
            except TimeoutError:
                log.warning("%d room events not delivered at shutdown", self._queue.qsize())
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        on_events = getattr(self._policy, "on_events", None)
        while True:
            item = await self._queue.get()
            if isinstance(item, asyncio.Future):
                self._reached(item)
                continue
            batch = [item]
            marker: asyncio.Future[None] | None = None
            while on_events is not None and len(batch) < BATCH_MAX and not self._queue.empty():
                queued = self._queue.get_nowait()
                if isinstance(queued, asyncio.Future):
                    marker = queued  # resolved once the events before it are delivered
                    break
                batch.append(queued)
            try:
                if on_events is not None:
                    results = await on_events(batch)
                else:
                    results = [await self._policy.on_event(item)]
                if self._over_budget is not None:
                    for event, stored in zip(batch, results, strict=True):
                        if stored is False:
                            self._over_budget(event)
            except Exception:
                log.exception(
                    "policy.on_event failed for %s in room %s%s",
                    item.name,
                    item.room_id,
                    f" (and {len(batch) - 1} events after it)" if len(batch) > 1 else "",
                )
            finally:
                for _ in batch:
                    self._queue.task_done()
            if marker is not None:
                self._reached(marker)

    def _reached(self, marker: asyncio.Future[None]) -> None:
        if not marker.done():
            marker.set_result(None)
        self._queue.task_done()
