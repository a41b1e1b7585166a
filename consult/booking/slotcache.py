"""What the slot page shows everybody alike, kept for a second.

At a slot release thousands of patients load the same doctor's page within seconds: the date
strip and the day's times are the same for all of them (only the form's CSRF token differs), so
they are rendered once per change and reused. An entry is dropped when a booking write of this
process changes that doctor's visits (a hold, a cancellation, a move, expired holds released)
and in any case after ``TTL_S``, which bounds what it cannot see (a schedule edited, a payment
confirming a lapsed hold, another process). What a page shows is only ever a hint: the hold
itself is checked in the database, where the partial UNIQUE index decides.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

TTL_S = 1.0
MAX_ENTRIES = 512  # doctors x days x languages in use at once; the oldest go first


class SlotCache:
    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._epoch = 0  # every doctor at once
        self._doctor: dict[int, int] = {}
        self._entries: OrderedDict[tuple, tuple[tuple[int, int], float, Any]] = OrderedDict()

    def _version(self, doctor_id: int) -> tuple[int, int]:
        return self._epoch, self._doctor.get(doctor_id, 0)

    def get(self, doctor_id: int, key: tuple) -> Any | None:
        found = self._entries.get((doctor_id, *key))
        if found is None:
            return None
        version, expires, value = found
        if version != self._version(doctor_id) or time.monotonic() >= expires:
            del self._entries[(doctor_id, *key)]
            return None
        return value

    def put(self, doctor_id: int, key: tuple, value: Any, version: tuple[int, int]) -> None:
        """Keep ``value``, computed from data read when the doctor's version was ``version``
        (taken before the read: a change during the read makes the entry stale at once)."""
        if version != self._version(doctor_id):
            return
        self._entries[(doctor_id, *key)] = (version, time.monotonic() + self.ttl_s, value)
        self._entries.move_to_end((doctor_id, *key))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def version(self, doctor_id: int) -> tuple[int, int]:
        return self._version(doctor_id)

    def changed(self, doctor_id: int | None = None) -> None:
        """A doctor's visits changed (None: any doctor's may have)."""
        if doctor_id is None:
            self._epoch += 1
            self._doctor.clear()
            self._entries.clear()
        else:
            self._doctor[doctor_id] = self._doctor.get(doctor_id, 0) + 1


SLOT_CACHE = web.AppKey("booking_slot_cache", SlotCache)


def setup(app: web.Application) -> None:
    app[SLOT_CACHE] = SlotCache()


def changed(app: web.Application, doctor_id: int | None = None) -> None:
    """Called after a booking write has committed; a no-op in an app without the cache."""
    cache = app.get(SLOT_CACHE)
    if cache is not None:
        cache.changed(doctor_id)
