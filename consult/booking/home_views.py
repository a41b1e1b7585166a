"""Landing page, health check and the patient's home page (the doctor's is the clinic board,
``consult.calls.board_views``)."""

from __future__ import annotations

import time

import aiohttp_jinja2
from aiohttp import web

from consult import booking
from consult.accounts.users import HOME_BY_ROLE
from consult.audit.reads import audit_read
from consult.booking import pages
from consult.core import health, keys, security


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index, name="index")
    r.add_get("/healthz", healthz, name="healthz")
    r.add_get("/patient", patient_home, name="patient_home")


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
