"""Booking pages: department → doctor → slot → held visit; the visit page, its QR code and .ics."""

from __future__ import annotations

import dataclasses
import secrets
import time
from datetime import date, datetime, timedelta

import aiohttp_jinja2
from aiohttp import web
from markupsafe import Markup

from consult import booking
from consult.audit.reads import audit_read
from consult.booking import catalogue, ics, pages, schedules, slotcache
from consult.calls import links as calllinks
from consult.clinical import reports
from consult.core import keys, live, metrics, qr, security
from consult.core.errors import BadRequest, Conflict, ConsultError, Forbidden, NotFound
from consult.core.formatting import day_words, to_local, weekday_name
from consult.core.forms import form, small_int
from consult.core.i18n import _, pgettext
from consult.core.ids import is_public_id

BOOKING_DAYS = 14
NEXT_SLOTS = 4


def setup(app: web.Application) -> None:
    slotcache.setup(app)
    r = app.router
    r.add_get("/book", departments_page, name="book")
    r.add_get("/book/{department_id:[0-9]{1,18}}", doctors_page, name="book_department")
    r.add_get(
        "/book/{department_id:[0-9]{1,18}}/doctors/{doctor_id:[0-9]{1,18}}", slots_page, name="book_doctor"
    )
    r.add_get(
        "/book/{department_id:[0-9]{1,18}}/doctors/{doctor_id:[0-9]{1,18}}/days/{day}",
        slots_day_fragment,
        name="book_doctor_day",
    )
    r.add_post("/book/hold", hold_submit, name="book_hold")
    r.add_get("/visits/{public_id}", visit_page, name="visit")
    r.add_get("/visits/{public_id}/cancel", cancel_page, name="visit_cancel")
    r.add_post("/visits/{public_id}/cancel", cancel_submit)
    r.add_get("/visits/{public_id}/reschedule", reschedule_page, name="visit_reschedule")
    r.add_post("/visits/{public_id}/reschedule", reschedule_submit)
    r.add_get("/visits/{public_id}/qr.svg", visit_qr, name="visit_qr")
    r.add_get("/visits/{public_id}/visit.ics", visit_ics, name="visit_ics")


def weekday_names() -> list[str]:
    return [weekday_name(i) for i in range(7)]


def group_by_day(slots: list[schedules.Slot], tz: str) -> list[dict]:
    days: list[dict] = []
    for s in slots:
        local = to_local(s.starts_at, tz)
        label = day_words(local)
        if not days or days[-1]["label"] != label:
            days.append({"label": label, "date": local.date().isoformat(), "slots": []})
        days[-1]["slots"].append({"starts_at": s.starts_at, "ends_at": s.ends_at, "taken": s.taken})
    return days


def _part_of_day(hour: int) -> str:
    if hour < 12:
        return pgettext("time of day", "Morning")
    if hour < 18:
        return pgettext("time of day", "Afternoon")
    return pgettext("time of day", "Evening")


def _day_names(day: date, today: date) -> dict:
    if day == today:
        name = _("Today")
    elif day == today + timedelta(days=1):
        name = _("Tomorrow")
    else:
        name = weekday_name(day.weekday())
    return {
        "date": day.isoformat(),
        "name": name,
        "short": _("%(month)d/%(day)d") % {"month": day.month, "day": day.day},
        "words": day_words(datetime(day.year, day.month, day.day)),
    }


def day_groups(slots: list[schedules.Slot], tz: str, *, now: float, late_s: float) -> list[dict]:
    """One day's slots grouped by part of the day, each labelled and marked taken or late."""
    groups: list[dict] = []
    for s in slots:
        local = to_local(s.starts_at, tz)
        late = not s.taken and s.starts_at - now < late_s
        part = _part_of_day(local.hour)
        if not groups or groups[-1]["name"] != part:
            groups.append({"name": part, "slots": []})
        groups[-1]["slots"].append(
            {"starts_at": s.starts_at, "label": f"{local:%H:%M}", "taken": s.taken, "late": late}
        )
    return groups


def day_strip(
    by_day: dict[date, list[schedules.Slot]],
    tz: str,
    *,
    now: float,
    until: float,
    late_s: float,
    chosen: str | None,
) -> tuple[list[dict], dict | None]:
    """Every local day from today to ``until`` with how many slots it has, how many are free and
    whether a free one is inside the no-change window (``late_s`` from ``now``); and the day shown,
    ``chosen`` (an ISO date) if it has a free slot, else the first day with one. Only the shown
    day gets its slots labelled and grouped (``groups``); the others are fetched when chosen."""
    today, last = to_local(now, tz).date(), to_local(until, tz).date()
    strip: list[dict] = []
    day = today
    while day <= last:
        found = by_day.get(day, [])
        entry = _day_names(day, today)
        entry["slots"] = found
        entry["total"] = len(found)
        entry["free"] = sum(1 for s in found if not s.taken)
        entry["late"] = any(not s.taken and s.starts_at - now < late_s for s in found)
        entry["groups"] = []
        strip.append(entry)
        day += timedelta(days=1)
    shown = next((d for d in strip if d["date"] == chosen and d["free"]), None)
    shown = shown or next((d for d in strip if d["free"]), None)
    for d in strip:
        d["shown"] = d is shown
    if shown is not None:
        shown["groups"] = day_groups(shown["slots"], tz, now=now, late_s=late_s)
    return strip, shown


def parse_day(value: str | None) -> date | None:
    """An ISO date (YYYY-MM-DD) from a URL, or None for anything else."""
    if not value or len(value) != 10:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _int(value: str | None, what: str) -> int:
    found = small_int(value, signed=True)  # ASCII digits that fit SQLite: no OverflowError later
    if found is None:
        raise BadRequest(_("Please pick a time from the list.") if what == "time" else _("Bad request."))
    return found


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


# -- choosing -------------------------------------------------------------------------


async def departments_page(request: web.Request) -> web.Response:
    security.require(request, "patient")
    locale = request[keys.LOCALE]
    rows = await request.app[keys.DB].execute_fn(lambda db: catalogue.departments(db))
    deps = [catalogue.department_view(r, locale) for r in rows]
    return aiohttp_jinja2.render_template("book_departments.html", request, {"departments": deps})


async def doctors_page(request: web.Request) -> web.Response:
    security.require(request, "patient")
    settings = request.app[keys.SETTINGS]
    locale = request[keys.LOCALE]
    department_id = int(request.match_info["department_id"])
    now = time.time()
    dep, found = await request.app[keys.DB].execute_fn(
        lambda db: pages.department_doctors(
            db,
            department_id,
            now=now,
            horizon=now + BOOKING_DAYS * 86400,
            tz=settings.timezone,
            lead_s=settings.booking_lead_minutes * 60,
        )
    )
    doctors = []
    for d, free in found:
        view = catalogue.doctor_view(d, locale)
        view["next_slots"] = free[:NEXT_SLOTS]
        view["free_count"] = len(free)
        doctors.append(view)
    return aiohttp_jinja2.render_template(
        "book_doctors.html",
        request,
        {"department": catalogue.department_view(dep, locale), "doctors": doctors},
    )


async def _week(request: web.Request, department_id: int, doctor_id: int) -> dict:
    """The doctor (of that department) with every slot of the strip's days, free or taken, as
    read from the database: kept (``slotcache``) until a change other than a hold, or a second.
    What holds of this process took since is marked over it by `_marked`."""
    settings = request.app[keys.SETTINGS]

    async def read() -> dict:
        now = time.time()
        week = await request.app[keys.DB].execute_fn(
            lambda db: pages.doctor_slots(
                db,
                department_id,
                doctor_id,
                now=now,
                horizon=now + BOOKING_DAYS * 86400,
                tz=settings.timezone,
                lead_s=settings.booking_lead_minutes * 60,
            )
        )
        week["taken"] = frozenset(s.starts_at for day in week["by_day"].values() for s in day if s.taken)
        return week

    cache = request.app.get(slotcache.SLOT_CACHE)
    if cache is None:
        return await read()
    # One read of the doctor's two weeks for all who ask while it runs (see slotcache).
    return await cache.read_once(doctor_id, ("week", department_id), read)


def _marked(week: dict, took: set[int] | tuple) -> dict[date, list[schedules.Slot]]:
    """The week's slots by day with every time in ``took`` (taken by a hold since the read)
    marked taken."""
    if not took:
        return week["by_day"]
    return {
        day: [dataclasses.replace(s, taken=True) if not s.taken and s.starts_at in took else s for s in slots]
        for day, slots in week["by_day"].items()
    }


def _strip_days(request: web.Request) -> tuple[float, float, date, date]:
    """(now, horizon, first day, last day) of the date strip."""
    tz = request.app[keys.SETTINGS].timezone
    now = time.time()
    horizon = now + BOOKING_DAYS * 86400
    return now, horizon, to_local(now, tz).date(), to_local(horizon, tz).date()


async def _slots_context(
    request: web.Request, department_id: int, doctor_id: int, chosen: str | None = None
) -> dict:
    """The slot page: the doctor, the date strip and the chosen day's times. The strip and the
    day are the same for every patient, so they are rendered once and kept (``slotcache``)
    until a booking changes the doctor's visits or a second has passed."""
    settings = request.app[keys.SETTINGS]
    locale = request[keys.LOCALE]
    now, horizon, first, last = _strip_days(request)
    wanted = parse_day(chosen)
    if wanted is not None and not first <= wanted <= last:
        wanted = None  # a day not on the strip: the first day with a free time, as for none
    cache = request.app.get(slotcache.SLOT_CACHE)
    key = ("page", department_id, locale, wanted)
    shown = cache.get(doctor_id, key) if cache is not None else None
    if shown is None:
        week = await _week(request, department_id, doctor_id)
        # No await from here to the put: the version and the marks are read together.
        version = _version(request, doctor_id)
        days, day = day_strip(
            _marked(week, _took(request, doctor_id)),
            settings.timezone,
            now=now,
            until=horizon,
            late_s=settings.cancel_free_hours * 3600,
            chosen=wanted.isoformat() if wanted else None,
        )
        parts = {
            "department": catalogue.department_view(week["dep"], locale),
            "doctor": catalogue.doctor_view(week["doc"], locale),
            "days": days,
            "d": day,
            "change_hours": round(settings.cancel_free_hours),
        }
        shown = {
            "department": parts["department"],
            "doctor": parts["doctor"],
            "strip_html": _rendered("_slot_strip.html", request, parts),
            "panel_html": _rendered("_slot_day.html", request, parts) if day else None,
        }
        if cache is not None:
            cache.put(doctor_id, key, shown, version)
    return {**shown, "hold_minutes": settings.hold_minutes, "error": None}


def _rendered(template: str, request: web.Request, context: dict) -> Markup:
    """A partial rendered by the autoescaping environment, to be placed in a page as it is."""
    return Markup(aiohttp_jinja2.render_string(template, request, context))  # noqa: S704 - escaped


async def _day_context(request: web.Request, department_id: int, doctor_id: int, day: date | None) -> dict:
    """One day of the slot page (the panel the date strip shows, rendered: ``panel_html``; how
    many times are free: ``free``), kept like the page's (``slotcache``). A day that is not one
    of the strip's is refused with a clear message."""
    settings = request.app[keys.SETTINGS]
    tz = settings.timezone
    locale = request[keys.LOCALE]
    now, _horizon, today, last = _strip_days(request)
    if day is None or not today <= day <= last:
        raise BadRequest(_("Please pick a day from the list."), code="bad_day")
    cache = request.app.get(slotcache.SLOT_CACHE)
    key = ("day", department_id, locale, day)
    kept = cache.get(doctor_id, key) if cache is not None else None
    if kept is None:
        week = await _week(request, department_id, doctor_id)
        version = _version(request, doctor_id, day)  # this day's holds only: what the panel shows
        slots = _marked(week, _took(request, doctor_id)).get(day, [])
        slots = [s for s in slots if s.starts_at >= now]
        late_s = settings.cancel_free_hours * 3600
        entry = _day_names(day, today)
        entry["free"] = sum(1 for s in slots if not s.taken)
        entry["late"] = any(not s.taken and s.starts_at - now < late_s for s in slots)
        entry["groups"] = day_groups(slots, tz, now=now, late_s=late_s)
        parts = {"d": entry, "change_hours": round(settings.cancel_free_hours)}
        kept = {
            "department": catalogue.department_view(week["dep"], locale),
            "doctor": catalogue.doctor_view(week["doc"], locale),
            "d": {"date": entry["date"]},
            "free": entry["free"],
            "panel_html": _rendered("_slot_day.html", request, parts),
        }
        if cache is not None:
            cache.put(doctor_id, key, kept, version)
    return {**kept, "error": None}


async def slots_page(request: web.Request) -> web.Response:
    security.require(request, "patient")
    doctor_id = int(request.match_info["doctor_id"])
    keep = set(request.query) <= {"day"}  # the URL is part of the key: nothing else in it
    key = _page_key(request, "book_slots.html") if keep else None
    kept = _kept_page(request, doctor_id, key)
    if kept is not None:
        return kept
    version = _version(request, doctor_id)
    ctx = await _slots_context(
        request, int(request.match_info["department_id"]), doctor_id, request.query.get("day")
    )
    return _keep_page(request, doctor_id, key, version, "book_slots.html", ctx)


# What stands for the form's CSRF token in a page kept whole; never leaves this process.
_CSRF_MARK = "csrfmark" + secrets.token_hex(16)


def _page_key(request: web.Request, template: str, *more: object) -> tuple:
    """What a whole page of the slot journey depends on besides the doctor's slots: the URL, the
    language, the large-text switch and the role (the top bar). Only the CSRF token is per user."""
    shared = request.get(aiohttp_jinja2.REQUEST_CONTEXT_KEY) or {}
    user = request.get(keys.USER)
    role = user.role if user else None
    return (
        "html",
        template,
        request.path_qs,
        request[keys.LOCALE],
        bool(shared.get("large_text")),
        role,
        *more,
    )


def _version(request: web.Request, doctor_id: int, day: date | None = None) -> tuple | None:
    """The doctor's version for what was rendered: from every day, or from ``day`` alone."""
    cache = request.app.get(slotcache.SLOT_CACHE)
    return cache.version(doctor_id, with_takes=True, day=day) if cache is not None else None


def _took(request: web.Request, doctor_id: int) -> set[int] | tuple:
    """The doctor's times that holds of this process took since what is kept was read."""
    cache = request.app.get(slotcache.SLOT_CACHE)
    return cache.taken(doctor_id) if cache is not None else ()


def _token(request: web.Request) -> str | None:
    return (request.get(aiohttp_jinja2.REQUEST_CONTEXT_KEY) or {}).get("csrf_token")


def _kept_page(
    request: web.Request, doctor_id: int, key: tuple | None, status: int = 200
) -> web.Response | None:
    """The page kept under ``key`` with this patient's CSRF token in it, if it is still good."""
    cache = request.app.get(slotcache.SLOT_CACHE)
    token = _token(request)
    if cache is None or key is None or not token:
        return None
    html = cache.get(doctor_id, key)
    if html is None:
        return None
    return web.Response(text=html.replace(_CSRF_MARK, token), status=status, content_type="text/html")


def _keep_page(
    request: web.Request,
    doctor_id: int,
    key: tuple | None,
    version: tuple[int, ...] | None,
    template: str,
    ctx: dict,
    status: int = 200,
) -> web.Response:
    """Render the page; keep it whole (``slotcache``) if nothing changed since ``version``, read
    before anything it shows was: the next patients get it with their own CSRF token."""
    token = _token(request)
    cache = request.app.get(slotcache.SLOT_CACHE)
    if cache is None or key is None or version is None or not token:
        return aiohttp_jinja2.render_template(template, request, ctx, status=status)
    html = aiohttp_jinja2.render_string(template, request, {**ctx, "csrf_token": _CSRF_MARK})
    cache.put(doctor_id, key, html, version)
    return web.Response(text=html.replace(_CSRF_MARK, token), status=status, content_type="text/html")


async def slots_day_fragment(request: web.Request) -> web.Response:
    """One day's panel of the slot page, for the date strip to show without reloading the page;
    the same permission as the page. Without script the strip's ``?day=`` links do the same."""
    security.require(request, "patient")
    ctx = await _day_context(
        request,
        int(request.match_info["department_id"]),
        int(request.match_info["doctor_id"]),
        parse_day(request.match_info["day"]),
    )
    return web.Response(
        text=str(ctx["panel_html"]), content_type="text/html", headers={"Cache-Control": "no-store"}
    )


async def hold_submit(request: web.Request) -> web.StreamResponse:
    patient = security.require(request, "patient")
    data = await form(request)
    doctor_id = _int(data.get("doctor_id"), "doctor")
    department_id = _int(data.get("department_id"), "department")
    try:
        starts_at = _int(data.get("starts_at"), "time")
        _refuse_if_known_taken(request, department_id, doctor_id, starts_at)
        visit = await booking.hold(
            request.app,
            patient,
            doctor_id=doctor_id,
            department_id=department_id,
            starts_at=starts_at,
            remote=security.client_address(request),
        )
    except ConsultError as exc:
        if wants_json(request):
            return web.json_response({"error": exc.code, "message": exc.message}, status=exc.status)
        return await _refused_hold(request, exc, department_id, doctor_id, data.get("starts_at"))
    metrics.count(request.app, "bookings")
    location = f"/visits/{visit['public_id']}"  # the "visit" route; url_for costs a rush's hold
    if wants_json(request):
        return web.json_response(
            {"public_id": visit["public_id"], "url": location, "hold_expires": visit["hold_expires"]},
            status=201,
        )
    # Returned, not raised: an exception through every middleware costs a rush's hold more than
    # the redirect itself.
    return web.Response(status=303, headers={"Location": location})


def _refuse_if_known_taken(request: web.Request, department_id: int, doctor_id: int, starts_at: int) -> None:
    """A time the kept slot page already shows as taken is refused here, without a turn of the
    one writer: in a rush most holds are for times just taken, and they queued behind the holds
    that could succeed. What is kept is marked by every hold and dropped by every cancellation
    and release in this process, so it only errs for a second at most, and only ever towards
    "taken"; a time not known taken goes to the database, where the UNIQUE index decides."""
    cache = request.app.get(slotcache.SLOT_CACHE)
    if cache is None:
        return
    if cache.is_taken(doctor_id, starts_at):
        raise Conflict(booking.taken_message(), code="slot_taken")
    week = cache.get(doctor_id, ("week", department_id))
    if week is not None and starts_at in week["taken"]:
        raise Conflict(booking.taken_message(), code="slot_taken")


async def _refused_hold(
    request: web.Request, exc: ConsultError, department_id: int, doctor_id: int, tried_value: str | None
) -> web.Response:
    """A refused hold (most often: the time was just taken) answers with a short page: why, and
    the fresh times of the day that was tried, to pick another at once; not the whole two weeks.
    When that day has no free time left, the page shows the first day that has one as well, or
    says that none is left: in a rush nobody has to go back to the strip to find out. In a rush
    the same page goes to hundreds of patients: it is kept whole, like the slot page."""
    tz = request.app[keys.SETTINGS].timezone
    tried = small_int(tried_value, signed=True)
    day = None
    if tried is not None and 0 <= tried < 2**40:  # back to the day of the time that was refused
        day = to_local(tried, tz).date()
    key = _page_key(request, "book_slot_refused.html", department_id, doctor_id, day, exc.status, exc.message)
    kept = _kept_page(request, doctor_id, key, exc.status)
    if kept is not None:
        return kept
    # Read before anything the page shows: the tried day's version if it still has a free time
    # (the page shows that day alone), else every day's (it shows the first day with one).
    version, day_version = _version(request, doctor_id), _version(request, doctor_id, day)
    try:
        ctx = await _day_context(request, department_id, doctor_id, day)
    except BadRequest:  # a time outside the strip: the page says why and leads back to every day
        dep, doc = await request.app[keys.DB].execute_fn(
            lambda db: pages.department_doctor(db, department_id, doctor_id)
        )
        locale = request[keys.LOCALE]
        ctx = {
            "department": catalogue.department_view(dep, locale),
            "doctor": catalogue.doctor_view(doc, locale),
            "d": None,
        }
        key = None  # not kept: the doctor was read without the cache
    else:
        if ctx["free"]:
            version = day_version
        else:
            other = await _first_free_day(request, department_id, doctor_id)
            if other is None:
                ctx["none_left"] = True
            else:
                ctx["next_panel_html"] = (await _day_context(request, department_id, doctor_id, other))[
                    "panel_html"
                ]
    ctx["error"] = exc.message
    return _keep_page(request, doctor_id, key, version, "book_slot_refused.html", ctx, exc.status)


async def _first_free_day(request: web.Request, department_id: int, doctor_id: int) -> date | None:
    """The first day of the strip with a free time, as the slot page would show it; None if none."""
    week = await _week(request, department_id, doctor_id)
    took = _took(request, doctor_id)
    now, _horizon, first, last = _strip_days(request)
    for day, slots in sorted(week["by_day"].items()):
        if first <= day <= last and any(
            not s.taken and s.starts_at not in took and s.starts_at >= now for s in slots
        ):
            return day
    return None


# -- a visit --------------------------------------------------------------------------


async def _visit_for(request: web.Request, user) -> dict:
    """The visit named in the URL, if this user may see it; 404 otherwise (no existence oracle)."""
    public_id = request.match_info["public_id"]
    if not is_public_id(public_id):
        raise NotFound(_("No such visit."))
    visit = await request.app[keys.DB].execute_fn(lambda db: booking.get_visit_sync(db, public_id=public_id))
    if visit is None or not booking.visit_access(user, visit):
        raise NotFound(_("No such visit."))
    return booking.visit_view(visit, request[keys.LOCALE])


def _call_token(request: web.Request, visit: dict, role: str) -> str:
    return calllinks.make_token(
        request.app[keys.SETTINGS],
        visit["public_id"],
        role,
        visit["call_nonce"],
        visit["starts_at"],
        visit["ends_at"],
    )


def _call_url(request: web.Request, visit: dict, role: str) -> str:
    settings = request.app[keys.SETTINGS]
    return booking.base_url(settings, request) + calllinks.call_path(_call_token(request, visit, role))


async def visit_page(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit_for(request, user)
    settings = request.app[keys.SETTINGS]
    now = time.time()
    free_s = settings.cancel_free_hours * 3600
    status = visit["status"] = booking.shown_status(visit, now)  # the reaper may not have run yet
    is_owner = user.role == "patient" and visit["patient_id"] == user.id
    ctx: dict = {
        "visit": visit,
        "status": status,
        "can_edit": is_owner and status in booking.OPEN_STATUSES and visit["starts_at"] > now,
        "is_owner": is_owner,
        "can_cancel": booking.can_cancel(user, visit, now, free_s),
        "can_reschedule": booking.can_reschedule(user, visit, now, free_s) and visit["starts_at"] > now,
        "cancel_free_hours": round(settings.cancel_free_hours),
        # Booked inside the no-change window: once paid, the patient cannot change it themselves.
        "no_change_window": is_owner and status == "held" and visit["starts_at"] - now < free_s,
        "hold_seconds": max(0, int((visit["hold_expires"] or 0) - now)) if status == "held" else 0,
        "call_url": None,
        "earlier_visits": [],
        "message": request.query.get("m", ""),
    }
    ctx["refund"] = None
    if ctx["message"] in ("cancelled_refunded", "cancelled_refund_pending"):  # say how much
        ctx["refund"] = await request.app[keys.DB].execute_fn(
            lambda db: pages.refund_amounts(db, visit["id"])
        )
    ctx["visit"] = {k: v for k, v in visit.items() if k != "call_nonce"}  # templates never need it
    if user.role == "doctor":
        # The visit's own doctor (``_visit_for`` shows a doctor only their visits): the doctor's
        # view, never the patient's page (no call link, QR code or "no sign-in needed").
        return await _doctor_visit_page(request, user, visit, ctx)
    if status == "confirmed" and user.role == "patient":
        ctx["call_url"] = _call_url(request, visit, user.role)
    if user.role == "admin":
        ctx["earlier_visits"] = await request.app[keys.DB].execute_fn(
            lambda db: pages.earlier_visits(db, visit)
        )
    ctx["recordings"] = []
    if user.role == "admin":
        from consult.calls import recordings

        ctx["recordings"] = await request.app[keys.DB].execute_fn(
            lambda db: recordings.for_visit_sync(db, visit["id"])
        )
    await audit_read(request, "visit.view", "visit", visit["id"], visit["patient_id"])
    return aiohttp_jinja2.render_template("visit_detail.html", request, ctx)


async def _cancellable(request: web.Request, user) -> dict:
    """The visit named in the URL, if this user may cancel it now; a clear refusal otherwise."""
    visit = await _visit_for(request, user)
    settings = request.app[keys.SETTINGS]
    now = time.time()
    if booking.shown_status(visit, now) not in booking.OPEN_STATUSES:
        raise Conflict(_("This visit can no longer be cancelled."), code="not_cancellable")
    if not booking.can_cancel(user, visit, now, settings.cancel_free_hours * 3600):
        raise Forbidden(
            _(
                "Visits can be cancelled only until %(hours)d hours before they start."
                " Please contact the clinic."
            )
            % {"hours": round(settings.cancel_free_hours)},
            code="too_late_to_cancel",
        )
    return visit


async def cancel_page(request: web.Request) -> web.Response:
    """The confirmation step before a cancellation: what it means, and the refund if paid."""
    user = security.require(request)
    visit = await _cancellable(request, user)
    refund = await request.app[keys.DB].execute_fn(lambda db: pages.refund_preview(db, visit["id"]))
    await audit_read(request, "visit.view", "visit", visit["id"], visit["patient_id"])
    ctx = {
        "visit": {k: v for k, v in visit.items() if k != "call_nonce"},
        "is_owner": user.role == "patient" and visit["patient_id"] == user.id,
        "refund": refund,
    }
    return aiohttp_jinja2.render_template("visit_cancel.html", request, ctx)


async def _doctor_visit_page(request: web.Request, user, visit: dict, ctx: dict) -> web.Response:
    from consult.calls import recordings

    now = time.time()
    db = request.app[keys.DB]
    found = await db.execute_fn(lambda d: pages.doctor_visit(d, visit))
    ctx.update(found)
    ctx["recordings"] = await db.execute_fn(lambda d: recordings.for_visit_sync(d, visit["id"]))
    ctx["room_url"] = (
        str(request.app.router["consult_room"].url_for(public_id=visit["public_id"]))
        if ctx["status"] == "confirmed"
        else None
    )
    # The reports are in front of the doctor now: the board stops counting them as new.
    await db.execute_write_fn(lambda d: reports.mark_looked_sync(d, visit["id"], user.id, now))
    live.publish(request.app, live.board_topic(user.id))
    await audit_read(request, "visit.view", "visit", visit["id"], visit["patient_id"])
    return aiohttp_jinja2.render_template("visit_doctor.html", request, ctx)


async def cancel_submit(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit_for(request, user)
    data = await form(request)
    page = request.app.router["visit"].url_for(public_id=visit["public_id"])
    if data.get("confirm") != "yes":  # only the confirmation page's button cancels
        raise web.HTTPSeeOther(request.app.router["visit_cancel"].url_for(public_id=visit["public_id"]))
    result = await booking.cancel(
        request.app,
        visit["id"],
        user,
        reason=(data.get("reason") or "").strip()[:500],
        remote=security.client_address(request),
    )
    live.publish(request.app, live.board_topic(visit["doctor_id"]))
    # Only money that is back is called refunded; a refund still queued is said to be under way.
    note = {"refunded": "cancelled_refunded", "pending": "cancelled_refund_pending"}.get(
        result["refund_state"], "cancelled"
    )
    raise web.HTTPSeeOther(f"{page}?m={note}")


async def _reschedule_context(request: web.Request, user, visit: dict, error: str | None) -> dict:
    settings = request.app[keys.SETTINGS]
    now = time.time()
    horizon = max(now, visit["starts_at"]) + BOOKING_DAYS * 86400
    free = await request.app[keys.DB].execute_fn(
        lambda db: schedules.slots(
            db,
            visit["doctor_id"],
            now,
            horizon,
            settings.timezone,
            now=now,
            lead_s=settings.booking_lead_minutes * 60,
            free_only=True,
        )
    )
    return {"visit": visit, "days": group_by_day(free, settings.timezone), "error": error}


async def reschedule_page(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit_for(request, user)
    ctx = await _reschedule_context(request, user, visit, None)
    return aiohttp_jinja2.render_template("visit_reschedule.html", request, ctx)


async def reschedule_submit(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit_for(request, user)
    data = await form(request)
    try:
        await booking.reschedule(
            request.app,
            visit["id"],
            user,
            _int(data.get("starts_at"), "time"),
            remote=security.client_address(request),
        )
    except ConsultError as exc:
        ctx = await _reschedule_context(request, user, visit, exc.message)
        return aiohttp_jinja2.render_template("visit_reschedule.html", request, ctx, status=exc.status)
    live.publish(request.app, live.board_topic(visit["doctor_id"]))
    raise web.HTTPSeeOther(f"{request.app.router['visit'].url_for(public_id=visit['public_id'])}?m=moved")


async def visit_qr(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit_for(request, user)
    # The patient's own link only: a doctor enters through the consult room, not a phone.
    if visit["status"] != "confirmed" or user.role != "patient":
        raise NotFound(_("There is no call link for this visit yet."))
    body = qr.svg(_call_url(request, visit, user.role))
    return web.Response(body=body, content_type="image/svg+xml", headers={"Cache-Control": "no-store"})


async def visit_ics(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit_for(request, user)
    settings = request.app[keys.SETTINGS]
    page = booking.base_url(settings, request) + str(
        request.app.router["visit"].url_for(public_id=visit["public_id"])
    )
    summary = _("Online visit with %(doctor)s (%(hospital)s)") % {
        "doctor": visit["doctor_name"],
        "hospital": settings.hospital_name,
    }
    body = ics.event(
        uid=f"{visit['public_id']}@consult",
        starts_at=visit["starts_at"],
        ends_at=visit["ends_at"],
        summary=summary,
        description=_("Open your visit page for the call link: %(url)s") % {"url": page},
        url=page,
        cancelled=visit["status"] not in (*booking.OPEN_STATUSES, "completed"),
        sequence=max(0, int(visit["updated"] - visit["created"])),  # grows with every change
    )
    return web.Response(
        text=body,
        content_type="text/calendar",
        charset="utf-8",
        headers={"Content-Disposition": 'attachment; filename="visit.ics"'},
    )
