"""Shared set-up for the booking tests: a small clinic written straight into the database."""

from __future__ import annotations

import time
from dataclasses import dataclass

from consult.booking import catalogue, schedules
from consult.core.config import Settings
from consult.core.engine import open_database
from tests import db_helpers
from tests.conftest import csrf_of, login

# Every day, 00:00-23:59 local: the last 15-minute visit is 23:30-23:45 and the last 5-minute one
# 23:50-23:55, so the next slot is always at most half an hour away (15-minute visits) or ten
# minutes (5-minute ones, inside a call link's early window), whatever the clock says. Late in the
# evening the slots an hour ahead are tomorrow's, on another day of the strip.
ALL_DAY = [(d, "00:00", "23:59") for d in range(7)]


@dataclass
class Clinic:
    department_id: int
    doctor_ids: list[int]
    admin_id: int


def make_clinic(settings: Settings, make_user, *, doctors: int = 1, minutes: int = 15) -> Clinic:
    admin_id = make_user("admin", login="boss", name="Admin")
    doctor_ids = [make_user("doctor", login=f"doc{i}", name=f"Doctor {i}") for i in range(doctors)]
    db = open_database(settings)

    def write(d) -> int:
        dep = catalogue.save_department_sync(
            d, department_id=None, code="internal", name_zh="内科", name_en="Internal medicine"
        )
        for doc in doctor_ids:
            catalogue.save_doctor_sync(
                d,
                doc,
                title_en="Physician",
                title_zh="医师",
                fee_minor=5000,
                currency="CNY",
                visit_minutes=minutes,
                department_ids=[dep],
                tz=settings.timezone,
            )
            for weekday, start, end in ALL_DAY:
                schedules.add_template_sync(d, doc, weekday, start, end, tz=settings.timezone)
        return dep

    dep = db.write_sync(write)
    db.close()
    return Clinic(dep, doctor_ids, admin_id)


def free_slots(settings: Settings, doctor_id: int, after_s: float, count: int = 5) -> list[schedules.Slot]:
    """The first free slots starting at least ``after_s`` from now."""
    db = open_database(settings)
    now = time.time()
    try:
        found = db.read_sync(
            lambda d: schedules.slots(
                d,
                doctor_id,
                now + after_s,
                now + after_s + 3 * 86400,
                settings.timezone,
                now=now,
                free_only=True,
            )
        )
    finally:
        db.close()
    return found[:count]


def visit_row(settings: Settings, public_id: str) -> dict:
    db = open_database(settings)
    try:
        return db.read_sync(
            lambda d: dict(d.execute("SELECT * FROM visits WHERE public_id = ?", [public_id]).fetchone())
        )
    finally:
        db.close()


def write(settings: Settings, fn):
    return db_helpers.write(settings, fn)


def read(settings: Settings, fn):
    return db_helpers.read(settings, fn)


async def signed_in(aiohttp_client, server, identifier: str):
    """A client with its own cookies, signed in; its CSRF token is kept on ``client.csrf``."""
    client = await aiohttp_client(server)
    await login(client, identifier)
    client.csrf = await csrf_of(client, "/account")
    return client


async def post(client, path: str, data: dict, *, json: bool = False):
    headers = {"Accept": "application/json"} if json else {}
    return await client.post(
        path, data={**data, "csrf_token": client.csrf}, headers=headers, allow_redirects=False
    )


async def hold(client, clinic: Clinic, starts_at: int, *, doctor: int = 0, json: bool = True):
    return await post(
        client,
        "/book/hold",
        {
            "doctor_id": str(clinic.doctor_ids[doctor]),
            "department_id": str(clinic.department_id),
            "starts_at": str(starts_at),
        },
        json=json,
    )
