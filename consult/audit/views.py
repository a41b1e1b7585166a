"""Audit trail pages: the admin search, the chain check, and a patient's own access log."""

from __future__ import annotations

import time
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from consult.audit import chain as audit
from consult.audit import reads as auditing
from consult.audit.reads import audit_read
from consult.core import keys, security


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/audit", audit_search, name="audit_admin")
    r.add_get("/admin/audit/verify", audit_verify, name="audit_verify")
    r.add_get("/patient/access-log", access_log, name="patient_access_log")


def _next_url(request: web.Request, name: str, query: dict[str, str], before: int | None) -> str | None:
    if before is None:
        return None
    return str(request.app.router[name].url_for()) + "?" + urlencode({**query, "before": str(before)})


async def audit_search(request: web.Request) -> web.Response:
    security.require(request, "admin")
    tz = request.app[keys.SETTINGS].timezone
    f = auditing.AuditFilters.from_query(request.query)
    before = auditing.parse_before(request.query.get("before"))
    rows, next_before = await request.app[keys.DB].execute_fn(
        lambda d: auditing.search_sync(d, f, before, tz=tz)
    )
    # Who read whose records is itself about patients: the search is logged like any read.
    await audit_read(request, "audit.search", "audit_log", None, None, filters=f.to_query())
    query = f.to_query()
    return aiohttp_jinja2.render_template(
        "audit_list.html",
        request,
        {
            "rows": rows,
            "filters": f,
            "next_url": _next_url(request, "audit_admin", query, next_before),
            "first_url": str(request.app.router["audit_admin"].url_for())
            + ("?" + urlencode(query) if query else "")
            if before
            else None,
        },
    )


async def audit_verify(request: web.Request) -> web.Response:
    security.require(request, "admin")
    start = time.perf_counter()
    ok, message = await request.app[keys.DB].execute_fn(audit.verify)
    return aiohttp_jinja2.render_template(
        "audit_verify.html",
        request,
        {"ok": ok, "message": message, "elapsed_ms": (time.perf_counter() - start) * 1000},
    )


async def access_log(request: web.Request) -> web.Response:
    user = security.require(request, "patient")
    before = auditing.parse_before(request.query.get("before"))
    rows, next_before = await request.app[keys.DB].execute_fn(
        lambda d: auditing.access_log_sync(d, user.id, before)
    )
    await audit_read(request, "access_log.view", "audit_log", None, user.id)
    return aiohttp_jinja2.render_template(
        "audit_access_log.html",
        request,
        {"rows": rows, "next_url": _next_url(request, "patient_access_log", {}, next_before)},
    )
