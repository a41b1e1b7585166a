"""What the slot page shows everybody alike, kept for a second.

At a slot release thousands of patients load the same doctor's page within seconds: the date
strip and the day's times are the same for all of them (only the form's CSRF token differs), so
they are read once and rendered once per change and reused. Two kinds of change:

- a hold of this process took a slot (`took`): it only ever turns a free time into a taken one,
  so what was read from the database stays good and the slot is simply marked taken over it
  (`taken`); only what was rendered is made again, and of what shows one day alone (a day's
  panel, a refused hold's page for a day with a free time left) only that day's. In a rush holds
  commit all the time: if each dropped what was read, every read finishing after the next hold
  would be thrown away and the page read and rendered for nearly every patient; if each dropped
  every day's panels, the 300 holds of a week's release made every panel rendered again 300
  times instead of once per hold on that day;
- anything else (a cancellation, a move, expired holds released, a schedule edited): `changed`
  drops the doctor's entries and what was taken over them.

An entry is in any case dropped after ``TTL_S``, which bounds what it cannot see (a payment
confirming a lapsed hold, another process). What a page shows is only ever a hint: the hold
itself is checked in the database, where the partial UNIQUE index decides.

A read that is not kept is made once for everybody who asks while it runs (`read_once`): in a
rush a thousand requests a second find the entry gone when its second is up, and each started
its own read of the doctor's two weeks, queued on the few reader threads ahead of every other
request's session read (a fifth of the server's time in a 5,000-patient surge went to such
repeated reads).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

TTL_S = 1.0
MAX_ENTRIES = 512  # doctors x days x languages in use at once; the oldest go first
MAX_TAKEN = 4096  # slots marked taken over one read of a doctor; beyond, the doctor is re-read


class SlotCache:
    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._epoch = 0  # every doctor at once
        self._doctor: dict[int, int] = {}
        # doctor -> {start taken by a hold since the doctor's version: until when the hold lasts}
        self._taken: dict[int, dict[int, float]] = {}
        self._takes: dict[int, int] = {}  # doctor -> holds marked since its version
        self._day_takes: dict[int, dict[Any, int]] = {}  # doctor -> {local day: holds marked on it}
        self._entries: OrderedDict[tuple, tuple[tuple[int, ...], float, Any]] = OrderedDict()
        self._reads: dict[tuple, asyncio.Task] = {}  # (doctor, key, version) -> the read under way

    def version(self, doctor_id: int, *, with_takes: bool = False, day: Any = None) -> tuple:
        """The doctor's version: what was read from the database is good while it holds; with
        ``with_takes``, also how many slots holds took since (what was rendered from every day
        is good while that holds); with ``day`` (a local date), how many slots of that day
        holds took since (what shows that day alone is good while that holds)."""
        base = (self._epoch, self._doctor.get(doctor_id, 0))
        if day is not None:
            return (*base, self._day_takes.get(doctor_id, {}).get(day, 0), day)
        return (*base, self._takes.get(doctor_id, 0)) if with_takes else base

    def _current(self, doctor_id: int, version: tuple) -> tuple:
        """The doctor's version now, of the kind ``version`` is (read, every day, one day)."""
        if len(version) == 4:
            return self.version(doctor_id, day=version[3])
        return self.version(doctor_id, with_takes=len(version) == 3)

    def get(self, doctor_id: int, key: tuple) -> Any | None:
        """What is kept under ``key`` if the version it was kept with still holds."""
        found = self._entries.get((doctor_id, *key))
        if found is None:
            return None
        version, expires, value = found
        if version != self._current(doctor_id, version) or time.monotonic() >= expires:
            del self._entries[(doctor_id, *key)]
            return None
        return value

    def put(self, doctor_id: int, key: tuple, value: Any, version: tuple) -> None:
        """Keep ``value``, computed from data read when the doctor's version was ``version``
        (taken before the read: a change during the read makes the entry stale at once)."""
        if version != self._current(doctor_id, version):
            return
        self._entries[(doctor_id, *key)] = (version, time.monotonic() + self.ttl_s, value)
        self._entries.move_to_end((doctor_id, *key))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def read_once(self, doctor_id: int, key: tuple, read: Callable[[], Awaitable[Any]]) -> Any:
        """What is kept under ``key`` (a database read, versioned without the takes), else the
        result of ``read()``, kept; one read at a time per doctor, key and version: whoever asks
        while it runs waits for it rather than reading again. A read started before a change is
        not joined by those asking after it (their version differs). A failed read is not
        shared: each waiter then reads for itself (its error in its own language)."""
        found = self.get(doctor_id, key)
        if found is not None:
            return found
        version = self.version(doctor_id)
        flight = (doctor_id, *key, version)
        task = self._reads.get(flight)
        if task is None:
            task = asyncio.ensure_future(self._read(flight, doctor_id, key, version, read))
            self._reads[flight] = task
            return await asyncio.shield(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            return await read()

    async def _read(
        self, flight: tuple, doctor_id: int, key: tuple, version: tuple, read: Callable[[], Awaitable[Any]]
    ) -> Any:
        try:
            value = await read()
        finally:
            self._reads.pop(flight, None)
        self.put(doctor_id, key, value, version)
        return value

    def taken(self, doctor_id: int) -> set[int]:
        """The starts that holds of this process took since the doctor's version and that are
        still held: taken whatever an older read says."""
        marks = self._taken.get(doctor_id)
        if not marks:
            return set()
        now = time.time()
        return {s for s, until in marks.items() if until > now}

    def is_taken(self, doctor_id: int, starts_at: int) -> bool:
        until = self._taken.get(doctor_id, {}).get(starts_at)
        return until is not None and until > time.time()

    def took(self, doctor_id: int, starts_at: int, until: float, day: Any) -> None:
        """A hold committed on ``starts_at`` (on the local date ``day``), held until ``until``
        (a time.time()): that slot is taken now. (Paid by then, the database says so: what was
        read is never older than the TTL.)"""
        marks = self._taken.setdefault(doctor_id, {})
        if len(marks) >= MAX_TAKEN:
            self.changed(doctor_id)
            marks = self._taken.setdefault(doctor_id, {})
        marks[starts_at] = until
        self._takes[doctor_id] = self._takes.get(doctor_id, 0) + 1
        days = self._day_takes.setdefault(doctor_id, {})
        days[day] = days.get(day, 0) + 1

    def changed(self, doctor_id: int | None = None) -> None:
        """A doctor's visits changed otherwise than by a hold (None: any doctor's may have)."""
        if doctor_id is None:
            self._epoch += 1
            self._doctor.clear()
            self._taken.clear()
            self._takes.clear()
            self._day_takes.clear()
            self._entries.clear()
        else:
            self._doctor[doctor_id] = self._doctor.get(doctor_id, 0) + 1
            self._taken.pop(doctor_id, None)
            self._takes.pop(doctor_id, None)
            self._day_takes.pop(doctor_id, None)


SLOT_CACHE = web.AppKey("booking_slot_cache", SlotCache)


def setup(app: web.Application) -> None:
    app[SLOT_CACHE] = SlotCache()


def changed(app: web.Application, doctor_id: int | None = None) -> None:
    """Called after a booking write has committed; a no-op in an app without the cache."""
    cache = app.get(SLOT_CACHE)
    if cache is not None:
        cache.changed(doctor_id)


def took(app: web.Application, doctor_id: int, starts_at: int, until: float, day: Any) -> None:
    """Called after a hold has committed on ``starts_at`` (the local date ``day``, held until
    ``until``); a no-op in an app without the cache."""
    cache = app.get(SLOT_CACHE)
    if cache is not None:
        cache.took(doctor_id, starts_at, until, day)
