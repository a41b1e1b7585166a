"""Landing page, health check and each role's home page."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from consult import keys, security
from consult.views.auth import HOME_BY_ROLE


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


async def patient_home(request: web.Request) -> web.Response:
    user = security.require(request, "patient")
    return aiohttp_jinja2.render_template("patient_home.html", request, {"me": user})


async def doctor_home(request: web.Request) -> web.Response:
    user = security.require(request, "doctor")
    return aiohttp_jinja2.render_template("doctor_home.html", request, {"me": user})
