"""Landing page, health check and each role's home page."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import aiohttp_jinja2
from aiohttp import web

from consult import booking
from consult.accounts.users import HOME_BY_ROLE
from consult.audit.reads import audit_read
from consult.booking import pages, schedules
from consult.core import health, keys, security


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index, name="index")
    r.add_get("/healthz", healthz, name="healthz")
    r.add_get("/patient", patient_home, name="patient_home")
    r.add_get("/doctor", doctor_home, name="doctor_home")


async def healthz(request: web.Request) -> web.Response:
    settings = request.app[keys.SETTINGS]
    healthy, report = await health.check(request.app[keys.DB], settings.data_dir, settings.disk_min_free_mb)
    return web.json_response(report, status=200 if healthy else 503)


async def index(request: web.Request) -> web.Response:
    user = request.get(keys.USER)
    if user is not None:
        raise web.HTTPSeeOther(HOME_BY_ROLE[user.role])
    return aiohttp_jinja2.render_template("index.html", request, {})


def _effective(visit: dict, now: float) -> dict:
    """A hold past its time shows as expired even before the reaper has run."""
    visit["status"] = booking.shown_status(visit, now)
    return visit


async def patient_home(request: web.Request) -> web.Response:
    user = security.require(request, "patient")
    now = time.time()
    locale = request[keys.LOCALE]
    rows, extras = await request.app[keys.DB].execute_fn(lambda db: pages.patient_visits(db, user.id))
    visits = [_effective(booking.visit_view(r, locale), now) for r in rows]
    for v in visits:
        v.update(extras.get(v["id"], pages.no_extras()))
    upcoming = [v for v in visits if v["status"] in booking.OPEN_STATUSES and v["ends_at"] > now]
    upcoming.reverse()  # soonest first
    past = [v for v in visits if v not in upcoming]
    await audit_read(request, "visit.list", "visit", None, user.id)
    return aiohttp_jinja2.render_template(
        "patient_home.html", request, {"me": user, "upcoming": upcoming, "past": past}
    )


async def doctor_home(request: web.Request) -> web.Response:
    user = security.require(request, "doctor")
    settings = request.app[keys.SETTINGS]
    now = time.time()
    today = schedules.local_date(now, settings.timezone)
    tz = schedules.zone(settings.timezone)
    day_start = datetime(today.year, today.month, today.day, tzinfo=tz).timestamp()
    tomorrow = today + timedelta(days=1)
    day_end = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=tz).timestamp()
    visits = await request.app[keys.DB].execute_fn(
        lambda db: pages.doctor_agenda(db, user.id, since=day_start, until=now + 30 * 86400)
    )
    today_visits = [v for v in visits if v["starts_at"] < day_end]
    later = [v for v in visits if v["starts_at"] >= day_end]
    await audit_read(request, "visit.list", "visit", None, None, doctor=user.id)
    return aiohttp_jinja2.render_template(
        "doctor_home.html", request, {"me": user, "today": today_visits, "later": later}
    )
