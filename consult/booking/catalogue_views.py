"""Admin pages for the catalogue: departments, doctors' profiles, schedules, visits to reschedule."""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation

import aiohttp_jinja2
from aiohttp import web

from consult import booking
from consult.audit.reads import audit_read
from consult.booking import catalogue, pages, schedules, slotcache
from consult.booking.views import weekday_names
from consult.calls import recordings
from consult.core import keys, security
from consult.core.errors import BadRequest, ConsultError
from consult.core.forms import field, form, small_int
from consult.core.i18n import _


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/catalogue", catalogue_page, name="catalogue_admin")
    r.add_post("/admin/catalogue/departments", department_create, name="catalogue_department_create")
    r.add_get(
        "/admin/catalogue/departments/{department_id:[0-9]{1,18}}",
        department_page,
        name="catalogue_department",
    )
    r.add_post("/admin/catalogue/departments/{department_id:[0-9]{1,18}}", department_update)
    r.add_get("/admin/catalogue/doctors/{doctor_id:[0-9]{1,18}}", doctor_page, name="catalogue_doctor")
    r.add_post("/admin/catalogue/doctors/{doctor_id:[0-9]{1,18}}", doctor_update)
    r.add_post(
        "/admin/catalogue/doctors/{doctor_id:[0-9]{1,18}}/templates",
        template_add,
        name="catalogue_template_add",
    )
    r.add_post(
        "/admin/catalogue/doctors/{doctor_id:[0-9]{1,18}}/templates/{item_id:[0-9]{1,18}}/delete",
        template_delete,
        name="catalogue_template_delete",
    )
    r.add_post(
        "/admin/catalogue/doctors/{doctor_id:[0-9]{1,18}}/exceptions",
        exception_add,
        name="catalogue_exception_add",
    )
    r.add_post(
        "/admin/catalogue/doctors/{doctor_id:[0-9]{1,18}}/exceptions/{item_id:[0-9]{1,18}}/delete",
        exception_delete,
        name="catalogue_exception_delete",
    )
    r.add_get("/admin/reschedule", reschedule_list, name="catalogue_reschedule")


def _department_values(data: dict) -> dict:
    return {
        "code": data.get("code", ""),
        "name_zh": field(data, "name_zh", max_len=100),
        "name_en": field(data, "name_en", max_len=100),
        "description_zh": field(data, "description_zh", required=False, max_len=1000),
        "description_en": field(data, "description_en", required=False, max_len=1000),
        "active": data.get("active") == "1",
        "sort": small_int(data.get("sort"), signed=True, max_digits=9) or 0,
    }


async def _catalogue_context(request: web.Request) -> dict:
    ctx = await request.app[keys.DB].execute_fn(pages.catalogue_overview)
    ctx.update(error=None, values={})
    return ctx


async def catalogue_page(request: web.Request) -> web.Response:
    security.require(request, "admin")
    return aiohttp_jinja2.render_template("catalogue_admin.html", request, await _catalogue_context(request))


async def department_create(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    data = await form(request)
    try:
        values = _department_values({**data, "active": "1"})
        await request.app[keys.DB].execute_write_fn(
            lambda db: catalogue.save_department_sync(db, department_id=None, actor=admin, **values)
        )
    except ConsultError as exc:
        ctx = await _catalogue_context(request)
        ctx.update(error=exc.message, values=data)
        return aiohttp_jinja2.render_template("catalogue_admin.html", request, ctx, status=exc.status)
    raise web.HTTPSeeOther(request.app.router["catalogue_admin"].url_for())


async def department_page(request: web.Request) -> web.Response:
    security.require(request, "admin")
    dep_id = int(request.match_info["department_id"])
    dep = await request.app[keys.DB].execute_fn(
        lambda db: catalogue.department(db, dep_id, active_only=False)
    )
    return aiohttp_jinja2.render_template(
        "catalogue_department.html", request, {"department": dep, "error": None}
    )


async def department_update(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    dep_id = int(request.match_info["department_id"])
    data = await form(request)
    try:
        values = _department_values(data)

        def write(db) -> None:
            catalogue.save_department_sync(db, department_id=dep_id, actor=admin, **values)
            if "recording_policy" in data:
                recordings.set_override_sync(db, "department", dep_id, data["recording_policy"], admin)

        await request.app[keys.DB].execute_write_fn(write)
    except ConsultError as exc:
        dep = {**data, "id": dep_id, "active": data.get("active") == "1"}
        return aiohttp_jinja2.render_template(
            "catalogue_department.html", request, {"department": dep, "error": exc.message}, status=exc.status
        )
    raise web.HTTPSeeOther(request.app.router["catalogue_admin"].url_for())


def parse_fee(raw: str) -> int:
    """``"50"`` or ``"50.00"`` (major units, as people type them) → 5000 minor units."""
    try:
        value = Decimal((raw or "").strip())
    except InvalidOperation:
        raise BadRequest(_("Enter the fee as a number, for example 50.00.")) from None
    if not value.is_finite() or value < 0 or value != value.quantize(Decimal("0.01")):
        raise BadRequest(_("Enter the fee as a number, for example 50.00."))
    return int(value * 100)


async def _doctor_context(request: web.Request, doctor_id: int, error: str | None = None) -> dict:
    settings = request.app[keys.SETTINGS]
    today = schedules.local_date(time.time(), settings.timezone).isoformat()

    ctx = await request.app[keys.DB].execute_fn(lambda db: pages.doctor_admin(db, doctor_id, today))
    ctx.update(
        error=error,
        weekdays=weekday_names(),
        default_fee=settings.default_fee_minor,
        default_minutes=int(settings.visit_minutes),
        flagged=small_int(request.query.get("flagged"), max_digits=6) or 0,
    )
    return ctx


async def doctor_page(request: web.Request) -> web.Response:
    security.require(request, "admin")
    ctx = await _doctor_context(request, int(request.match_info["doctor_id"]))
    return aiohttp_jinja2.render_template("catalogue_doctor.html", request, ctx)


def _back(request: web.Request, doctor_id: int, flagged: list[int]) -> web.HTTPSeeOther:
    url = request.app.router["catalogue_doctor"].url_for(doctor_id=str(doctor_id))
    return web.HTTPSeeOther(f"{url}?flagged={len(flagged)}" if flagged else str(url))


async def _doctor_write(request: web.Request, doctor_id: int, fn) -> web.Response:
    try:
        flagged = await request.app[keys.DB].execute_write_fn(fn)
        slotcache.changed(request.app, doctor_id)  # the slot page shows the new schedule at once
    except ConsultError as exc:
        ctx = await _doctor_context(request, doctor_id, exc.message)
        return aiohttp_jinja2.render_template("catalogue_doctor.html", request, ctx, status=exc.status)
    raise _back(request, doctor_id, flagged)


async def doctor_update(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    settings = request.app[keys.SETTINGS]
    doctor_id = int(request.match_info["doctor_id"])
    post = await security.read_form(request)
    data = {k: v for k, v in post.items() if isinstance(v, str)}
    dep_ids = [
        n for v in post.getall("departments", []) if isinstance(v, str) and (n := small_int(v)) is not None
    ]

    def write(db) -> list[int]:
        minutes = small_int(data.get("visit_minutes"), max_digits=4)
        if minutes is None:
            raise BadRequest(_("A visit lasts between 5 and 120 minutes."))
        flagged = catalogue.save_doctor_sync(
            db,
            doctor_id,
            title_zh=data.get("title_zh", ""),
            title_en=data.get("title_en", ""),
            bio_zh=data.get("bio_zh", ""),
            bio_en=data.get("bio_en", ""),
            fee_minor=parse_fee(data.get("fee", "")),
            currency=settings.currency,
            visit_minutes=minutes,
            active=data.get("active") == "1",
            department_ids=dep_ids,
            tz=settings.timezone,
            actor=admin,
        )
        if "recording_policy" in data:
            recordings.set_override_sync(db, "doctor", doctor_id, data["recording_policy"], admin)
        return flagged

    return await _doctor_write(request, doctor_id, write)


async def template_add(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    tz = request.app[keys.SETTINGS].timezone
    doctor_id = int(request.match_info["doctor_id"])
    data = await form(request)
    weekday = small_int(data.get("weekday"), max_digits=2)
    weekday = -1 if weekday is None else weekday
    return await _doctor_write(
        request,
        doctor_id,
        lambda db: schedules.add_template_sync(
            db,
            doctor_id,
            weekday,
            data.get("start_local", ""),
            data.get("end_local", ""),
            tz=tz,
            actor=admin,
            valid_from=data.get("valid_from") or None,
            valid_until=data.get("valid_until") or None,
        ),
    )


async def template_delete(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    tz = request.app[keys.SETTINGS].timezone
    doctor_id, item = int(request.match_info["doctor_id"]), int(request.match_info["item_id"])
    return await _doctor_write(
        request, doctor_id, lambda db: schedules.delete_template_sync(db, doctor_id, item, tz=tz, actor=admin)
    )


async def exception_add(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    tz = request.app[keys.SETTINGS].timezone
    doctor_id = int(request.match_info["doctor_id"])
    data = await form(request)
    return await _doctor_write(
        request,
        doctor_id,
        lambda db: schedules.add_exception_sync(
            db,
            doctor_id,
            data.get("day", ""),
            data.get("kind", ""),
            data.get("start_local") or None,
            data.get("end_local") or None,
            tz=tz,
            note=data.get("note", ""),
            actor=admin,
        ),
    )


async def exception_delete(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    tz = request.app[keys.SETTINGS].timezone
    doctor_id, item = int(request.match_info["doctor_id"]), int(request.match_info["item_id"])
    return await _doctor_write(
        request,
        doctor_id,
        lambda db: schedules.delete_exception_sync(db, doctor_id, item, tz=tz, actor=admin),
    )


async def reschedule_list(request: web.Request) -> web.Response:
    security.require(request, "admin")
    locale = request[keys.LOCALE]
    rows = await request.app[keys.DB].execute_fn(booking.needing_reschedule_sync)
    visits = [booking.visit_view(r, locale) for r in rows]
    await audit_read(request, "visit.list", "visit", None, None, reschedule=True)
    return aiohttp_jinja2.render_template("catalogue_reschedule.html", request, {"visits": visits})
