"""The doctor's clinic board (their home page), its live stream, admitting from it, the next
patient, the running-late notice; and the patient's side of that notice on the call page."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from consult import booking
from consult.audit.reads import audit_read
from consult.booking import late, pages
from consult.calls import board
from consult.calls import links as calllinks
from consult.calls.policy import SIGNALING
from consult.core import keys, live, security
from consult.core.errors import BadRequest, Conflict, NotFound
from consult.core.formatting import to_local
from consult.core.forms import form
from consult.core.i18n import _, ngettext, pgettext
from consult.core.ids import is_public_id

# Open boards per doctor (a PC and a tablet, a few tabs); waiting pages per doctor's clinic day.
BOARD_STREAMS_PER_DOCTOR = 4
NOTICE_STREAMS_PER_DOCTOR = 64
NOTICE_STREAMS_PER_VISIT = 3  # so that one leaked link cannot take the doctor's other patients' places
# A stream re-reads at least this often (a booking paid elsewhere nudges nobody) and ends after
# STREAM_MAX_S: the browser reconnects, and the session and the link are checked again.
POLL_S = 15.0
STREAM_MAX_S = 300.0


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/doctor", doctor_home, name="doctor_home")
    # Event streams: no HEAD (a stream has no length to announce).
    r.add_get("/doctor/board/events", board_events, name="board_events", allow_head=False)
    r.add_post("/doctor/visits/{public_id}/admit", admit, name="board_admit")
    r.add_get("/doctor/next", next_patient, name="doctor_next")
    r.add_post("/doctor/running-late", running_late, name="running_late")
    r.add_get("/call/{token}/notices", call_notices, name="call_notices", allow_head=False)


def state_labels() -> dict[str, str]:
    return {
        board.BOOKED: _("Booked"),
        board.WAITING: _("In the waiting room"),
        board.IN_CALL: _("In the call"),
        board.FINISHED: pgettext("visit state", "Finished"),
        board.NO_SHOW: _("Did not come"),
    }


def late_choices() -> list[tuple[int, str]]:
    return [
        (
            m,
            _("On time")
            if m == 0
            else ngettext("About %(num)d minute late", "About %(num)d minutes late", m) % {"num": m},
        )
        for m in late.CHOICES
    ]


async def _snapshot(request: web.Request, doctor_id: int) -> dict[str, Any]:
    settings = request.app[keys.SETTINGS]
    found = await request.app[keys.DB].execute_fn(
        lambda db: board.today_sync(db, doctor_id, time.time(), settings.timezone)
    )
    labels = state_labels()
    url = request.app.router
    rows = []
    for v in board.with_states(request.app.get(SIGNALING), found):
        pid = v["public_id"]
        rows.append(
            {
                "public_id": pid,
                "time": to_local(v["starts_at"], settings.timezone).strftime("%H:%M"),
                "patient": v["patient_name"],
                "state": v["state"],
                "state_label": labels[v["state"]],
                "reports": v["reports"],
                "new_reports": v["new_reports"],
                "reports_label": (
                    ngettext("%(num)d new", "%(num)d new", v["new_reports"]) % {"num": v["new_reports"]}
                    if v["new_reports"]
                    else ""
                ),
                "visit_url": str(url["visit"].url_for(public_id=pid)),
                "room_url": str(url["consult_room"].url_for(public_id=pid))
                if v["state"] in board.OPEN_STATES
                else None,
                "admit_url": str(url["board_admit"].url_for(public_id=pid))
                if v["state"] == board.WAITING
                else None,
            }
        )
    return {"visits": rows, "late": found["late"]}


async def doctor_home(request: web.Request) -> web.Response:
    user = security.require(request, "doctor")
    settings = request.app[keys.SETTINGS]
    now = time.time()
    _day, _start, day_end = late.day_bounds(now, settings.timezone)
    snapshot = await _snapshot(request, user.id)
    agenda = await request.app[keys.DB].execute_fn(
        lambda db: pages.doctor_agenda(db, user.id, since=day_end, until=now + 30 * 86400)
    )
    later = [v for v in agenda if v["starts_at"] >= day_end and v["status"] == "confirmed"]
    await audit_read(request, "visit.list", "visit", None, None, doctor=user.id)
    return aiohttp_jinja2.render_template(
        "doctor_home.html",
        request,
        {
            "me": user,
            "board": snapshot,
            "later": later,
            "late_choices": late_choices(),
            "message": request.query.get("m", ""),
        },
    )


async def _stream(
    request: web.Request, topic: Hashable, limit: int, read: Callable[[], Awaitable[dict[str, Any]]]
) -> web.StreamResponse:
    """Server-sent events: what ``read`` returns, again whenever ``topic`` is nudged (sent only
    when it changed), a comment line when nothing did."""
    if "text/event-stream" not in request.headers.get("Accept", ""):
        # EventSource always asks for a stream; anything else would hang on an endless response.
        raise BadRequest(_("This address sends live updates to an open page only."), code="not_event_stream")
    loop = asyncio.get_running_loop()
    with request.app[live.LIVE].subscribe(topic, limit) as sub:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }
        )
        await response.prepare(request)
        deadline = loop.time() + STREAM_MAX_S
        last = None
        try:
            await response.write(b"retry: 3000\n\n")
            while not sub.closed and loop.time() < deadline:
                data = json.dumps(await read(), ensure_ascii=False, sort_keys=True)
                if data != last:
                    await response.write(f"data: {data}\n\n".encode())
                    last = data
                else:
                    await response.write(b": quiet\n\n")
                await sub.wait(min(POLL_S, max(0.0, deadline - loop.time())))
        except (ConnectionResetError, asyncio.CancelledError):
            if not request.transport or request.transport.is_closing():
                return response
            raise
        return response


async def board_events(request: web.Request) -> web.StreamResponse:
    """The board's live stream: only the signed-in doctor's own visits."""
    user = security.require(request, "doctor")
    await audit_read(request, "visit.list", "visit", None, None, doctor=user.id, stream=True)
    return await _stream(
        request,
        live.board_topic(user.id),
        BOARD_STREAMS_PER_DOCTOR,
        lambda: _snapshot(request, user.id),
    )


async def _own_visit(request: web.Request) -> tuple[Any, dict[str, Any]]:
    user = security.require(request, "doctor")
    public_id = request.match_info["public_id"]
    visit = None
    if is_public_id(public_id):
        visit = await request.app[keys.DB].execute_fn(
            lambda db: booking.get_visit_sync(db, public_id=public_id)
        )
    if visit is None or visit["doctor_id"] != user.id:
        raise NotFound(_("No such visit."))
    return user, visit


async def admit(request: web.Request) -> web.Response:
    """The board's "admit": into the consult room, which admits the waiting patient at once."""
    user, visit = await _own_visit(request)
    if visit["status"] != "confirmed":
        raise Conflict(_("This visit is not confirmed or was cancelled."))
    ticket = board.make_admit_ticket(request.app[keys.SETTINGS], visit["public_id"], user.id, time.time())
    room = request.app.router["consult_room"].url_for(public_id=visit["public_id"])
    raise web.HTTPSeeOther(str(room.with_query(admit=ticket)))


async def next_patient(request: web.Request) -> web.Response:
    """From the room's end screen: the consult room of the next patient waiting, else of the next
    visit booked today; the board when there is none."""
    user = security.require(request, "doctor")
    settings = request.app[keys.SETTINGS]
    found = await request.app[keys.DB].execute_fn(
        lambda db: board.today_sync(db, user.id, time.time(), settings.timezone)
    )
    after = request.query.get("after") or None
    chosen = board.next_visit(board.with_states(request.app.get(SIGNALING), found), after)
    if chosen is None:
        raise web.HTTPSeeOther(str(request.app.router["doctor_home"].url_for().with_query(m="no_next")))
    raise web.HTTPSeeOther(str(request.app.router["consult_room"].url_for(public_id=chosen["public_id"])))


async def running_late(request: web.Request) -> web.Response:
    user = security.require(request, "doctor")
    settings = request.app[keys.SETTINGS]
    minutes = late.parse_minutes((await form(request)).get("minutes"))
    remote = security.client_address(request)
    told = await request.app[keys.DB].execute_write_fn(
        lambda db: late.set_running_late_sync(
            db, user, minutes, now=time.time(), tz=settings.timezone, remote=remote
        )
    )
    live.publish(request.app, live.late_topic(user.id))
    live.publish(request.app, live.board_topic(user.id))
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({"late": minutes, "told": told})
    raise web.HTTPSeeOther(str(request.app.router["doctor_home"].url_for().with_query(m="late")))


def late_text(minutes: int) -> str:
    if not minutes:
        return ""
    return _(
        "Your doctor is running about %(minutes)d minutes late. Please keep this page open:"
        " you will be admitted as soon as the doctor is ready."
    ) % {"minutes": minutes}


async def call_notices(request: web.Request) -> web.StreamResponse:
    """The patient's waiting page follows their doctor's running-late notice (the signed call
    link is the credential, as for the page itself)."""
    settings = request.app[keys.SETTINGS]
    try:
        token = calllinks.decode(settings, request.match_info["token"], time.time())
    except (calllinks.CallLinkInvalid, calllinks.CallLinkExpired, calllinks.CallLinkNotYetValid):
        raise NotFound(_("No such visit.")) from None
    if token.role != "patient" or not is_public_id(token.public_id):
        raise NotFound(_("No such visit."))
    db = request.app[keys.DB]
    visit = await db.execute_fn(lambda d: booking.get_visit_sync(d, public_id=token.public_id))
    if visit is None or visit["call_nonce"] != token.nonce:
        raise NotFound(_("No such visit."))

    def minutes_sync(d: Any) -> int:
        now = booking.get_visit_sync(d, visit_id=visit["id"])  # finished or moved meanwhile?
        return 0 if now is None else late.late_for_visit_sync(d, now, time.time(), settings.timezone)

    async def read() -> dict[str, Any]:
        minutes = await db.execute_fn(minutes_sync)
        return {"late": minutes, "text": late_text(minutes)}

    # Counted per visit as well (this topic is never nudged: it only holds the count).
    with request.app[live.LIVE].subscribe(("notice-visit", visit["id"]), NOTICE_STREAMS_PER_VISIT):
        return await _stream(request, live.late_topic(visit["doctor_id"]), NOTICE_STREAMS_PER_DOCTOR, read)
