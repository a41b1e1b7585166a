"""Landing page, health check and each role's home page."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import aiohttp_jinja2
from aiohttp import web

from consult import booking
from consult.accounts.users import HOME_BY_ROLE
from consult.audit.reads import audit_read
from consult.booking import schedules
from consult.core import keys, security


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index, name="index")
    r.add_get("/healthz", healthz, name="healthz")
    r.add_get("/patient", patient_home, name="patient_home")
    r.add_get("/doctor", doctor_home, name="doctor_home")


async def healthz(request: web.Request) -> web.Response:
    await request.app[keys.DB].query_one("SELECT 1")
    return web.json_response({"ok": True})


async def index(request: web.Request) -> web.Response:
    user = request.get(keys.USER)
    if user is not None:
        raise web.HTTPSeeOther(HOME_BY_ROLE[user.role])
    return aiohttp_jinja2.render_template("index.html", request, {})


def _effective(visit: dict, now: float) -> dict:
    """A hold past its time shows as expired even before the reaper has run."""
    if visit["status"] == "held" and visit["hold_expires"] is not None and visit["hold_expires"] < now:
        visit["status"] = "expired"
    return visit


async def patient_home(request: web.Request) -> web.Response:
    user = security.require(request, "patient")
    now = time.time()
    locale = request[keys.LOCALE]
    rows = await request.app[keys.DB].execute_fn(
        lambda db: db.execute(
            booking.VISIT_SELECT + " WHERE v.patient_id = ? ORDER BY v.starts_at DESC LIMIT 200", [user.id]
        ).fetchall()
    )
    visits = [_effective(booking.visit_view(dict(r), locale), now) for r in rows]
    extras = await _patient_extras(request, user.id)
    for v in visits:
        v.update(extras.get(v["id"], {"reports": 0, "receipt": None, "prescriptions": []}))
    upcoming = [v for v in visits if v["status"] in booking.OPEN_STATUSES and v["ends_at"] > now]
    upcoming.reverse()  # soonest first
    past = [v for v in visits if v not in upcoming]
    await audit_read(request, "visit.list", "visit", None, user.id)
    return aiohttp_jinja2.render_template(
        "patient_home.html", request, {"me": user, "upcoming": upcoming, "past": past}
    )


async def _patient_extras(request: web.Request, patient_id: int) -> dict[int, dict]:
    """Per visit: how many reports, the paid order (for its receipt), the prescriptions."""

    def read(db) -> dict[int, dict]:
        out: dict[int, dict] = {}

        def slot(visit_id: int) -> dict:
            return out.setdefault(visit_id, {"reports": 0, "receipt": None, "prescriptions": []})

        for r in db.execute(
            "SELECT r.visit_id, count(*) FROM reports r JOIN visits v ON v.id = r.visit_id"
            " WHERE v.patient_id = ? GROUP BY r.visit_id",
            [patient_id],
        ):
            slot(r[0])["reports"] = r[1]
        for r in db.execute(
            "SELECT p.visit_id, p.order_id, p.status FROM payments p JOIN visits v ON v.id = p.visit_id"
            " WHERE v.patient_id = ? AND p.status IN ('paid', 'refunded') ORDER BY p.id",
            [patient_id],
        ):
            slot(r[0])["receipt"] = {"order_id": r[1], "status": r[2]}
        for r in db.execute(
            "SELECT visit_id, number FROM prescriptions WHERE patient_id = ? ORDER BY id", [patient_id]
        ):
            slot(r[0])["prescriptions"].append(r[1])
        return out

    return await request.app[keys.DB].execute_fn(read)


async def doctor_home(request: web.Request) -> web.Response:
    user = security.require(request, "doctor")
    settings = request.app[keys.SETTINGS]
    now = time.time()
    today = schedules.local_date(now, settings.timezone)
    tz = schedules.zone(settings.timezone)
    day_start = datetime(today.year, today.month, today.day, tzinfo=tz).timestamp()
    tomorrow = today + timedelta(days=1)
    day_end = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=tz).timestamp()
    rows = await request.app[keys.DB].query(
        "SELECT v.id, v.public_id, v.starts_at, v.ends_at, v.status, v.needs_reschedule,"
        " u.display_name AS patient_name,"
        " (SELECT count(*) FROM reports r WHERE r.visit_id = v.id) AS reports,"
        " (SELECT p.status FROM payments p WHERE p.visit_id = v.id ORDER BY p.id DESC LIMIT 1) AS payment"
        " FROM visits v JOIN users u ON u.id = v.patient_id"
        " WHERE v.doctor_id = ? AND v.status IN ('confirmed', 'completed') AND v.ends_at > ?"
        " AND v.starts_at < ? ORDER BY v.starts_at LIMIT 300",
        [user.id, day_start, now + 30 * 86400],
    )
    visits = [dict(r) for r in rows]
    today_visits = [v for v in visits if v["starts_at"] < day_end]
    later = [v for v in visits if v["starts_at"] >= day_end]
    await audit_read(request, "visit.list", "visit", None, None, doctor=user.id)
    return aiohttp_jinja2.render_template(
        "doctor_home.html", request, {"me": user, "today": today_visits, "later": later}
    )
