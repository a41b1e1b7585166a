"""The call pages: the patient's phone page (the link is the credential) and the doctor's room."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from consult import booking
from consult.calls import board, recordings, sidebar
from consult.calls import links as calllinks
from consult.calls import policy as calls
from consult.clinical import prescriptions, reports
from consult.core import formatting, keys, live, security
from consult.core.errors import Forbidden, NotFound
from consult.core.forms import json_body
from consult.core.i18n import _, ngettext, pgettext
from consult.core.ids import is_public_id


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/call/{token}", call_page, name="call_page")
    r.add_get("/doctor/visits/{public_id}/room", consult_room, name="consult_room")
    r.add_get("/doctor/visits/{public_id}/room/token", host_token, name="consult_room_token")
    r.add_post("/call/{token}/recording-consent", patient_consent, name="call_recording_consent")
    r.add_post(
        "/doctor/visits/{public_id}/room/recording-consent", doctor_consent, name="room_recording_consent"
    )


def error_strings(host: bool) -> dict[str, str]:
    """What the page says for each signaling error code (`error_<code>`).

    The signaling server knows nothing of languages: its error frames carry a code (and an
    English note for developers); the page shows the text for the code, in the reader's
    language. A code not listed here reads as `refused`.
    """
    return {
        "error_too_early": _("This visit is not open yet. Open the link again at the visit time."),
        "error_too_late": _("The time to join this visit has passed."),
        "error_room_ended": _("This visit has ended."),
        "error_visit_not_confirmed": _("This visit is not confirmed or was cancelled."),
        "error_invalid_token": _("This page has expired. Reload the consult room.")
        if host
        else _("This call link is not valid any more. Open the visit from your visit page."),
        "error_forbidden": _("Only this visit's doctor can open its consult room."),
        "error_invalid_role": _("You cannot join this visit."),
        "error_unsupported_version": _("This page is out of date. Reload it."),
        "error_hello_timeout": _("The connection to the hospital was too slow. Try again."),
    }


def warning_strings(warning_s: float) -> dict[str, str]:
    """The end-of-visit warning in minutes, one text per whole minute the warning can show
    (`warning_minutes_<n>`, plurals by the catalogue), and `warning_soon` under a minute.
    The server's `warning` says seconds; the page rounds them to whole minutes."""
    most = min(60, max(1, round(warning_s / 60)))
    out = {
        f"warning_minutes_{n}": ngettext(
            "The visit ends in %(minutes)d minute.", "The visit ends in %(minutes)d minutes.", n
        )
        % {"minutes": n}
        for n in range(1, most + 1)
    }
    out["warning_soon"] = _("The visit ends in less than a minute.")
    return out


def call_strings(host: bool = False, warning_s: float = 120.0) -> dict[str, str]:
    """Everything call.js and its parts (call-*.js) say, in the request's language (as a JSON block)."""
    return {
        **error_strings(host),
        **warning_strings(warning_s),
        "connecting": _("Connecting…"),
        "checking": _("Checking…"),
        "can_connect": _("Connection to the hospital works."),
        "cannot_connect": _("Cannot reach the hospital's server. Check your network."),
        "camera_ok": _("Camera works."),
        "camera_failed": _("No camera or microphone: allow access in your browser's settings."),
        "waiting_doctor": _("Waiting for the doctor. The doctor will admit you shortly."),
        "waiting_patient": _("Waiting for the patient to join."),
        "patient_waiting": _("The patient is in the waiting room."),
        "peer_connecting": _("Connecting to the patient…") if host else _("Connecting you to the doctor…"),
        "in_call": _("Connected."),
        "reconnecting": _("The network is unstable. Reconnecting…"),
        "restored": _("Connected again."),
        "peer_left": _("The other side lost the connection. Waiting for them to come back…"),
        "ended": _("The visit has ended."),
        "ended_time_limit": _("The visit time is over."),
        "ended_host_ended": _("The doctor ended the visit."),
        "ended_room_ended": _("This visit is already over."),
        "left": _("You left the visit. You can rejoin while it lasts."),
        "replaced": _("This visit was opened on another device or tab."),
        "refused": _("You cannot join this visit."),
        "mute": _("Mute"),
        "unmute": _("Unmute"),
        "camera_off": _("Camera off"),
        "camera_on": _("Camera on"),
        "confirm_end": _("End the visit for both of you?"),
        "confirm_leave": _("Leave the visit?"),
        "chat_failed": _("The message could not be sent."),
        "you": _("You"),
        "quality_good": _("Good connection"),
        "quality_fair": _("Unstable connection"),
        "quality_poor": _("Poor connection"),
        "audio_only": _("Audio only"),
        "video_back": _("Turn video back on"),
        "audio_only_on": _("Audio only: video is paused to keep the sound clear."),
        "audio_only_auto": _("The network is too weak for video: switched to audio only."),
        "admitted": _("The patient was admitted."),
        "patient_admitted_not_joined": _("Patient admitted, waiting for them to press Join."),
        "recording": pgettext("call state", "Recording"),
        "consent_failed": _("Your answer could not be saved. Try again."),
    }


async def _visit(request: web.Request, public_id: str) -> dict[str, Any] | None:
    if not is_public_id(public_id):
        return None
    return await request.app[keys.DB].execute_fn(lambda db: booking.get_visit_sync(db, public_id=public_id))


def _ws_path(request: web.Request, public_id: str) -> str:
    return str(request.app.router["signaling"].url_for(room_id=public_id))


def _spoken_when(ts: float, tz: str, now: float) -> str:
    """A visit's start as a patient says it: "today, 14:30", "tomorrow, 09:00", or the date;
    no time-zone name (the hospital's time is the patient's)."""
    when = formatting.to_local(ts, tz)
    today = formatting.to_local(now, tz).date()
    time_text = when.strftime("%H:%M")
    days = (when.date() - today).days
    if days == 0:
        return _("Today at %(time)s") % {"time": time_text}
    if days == 1:
        return _("Tomorrow at %(time)s") % {"time": time_text}
    date_text = _("%(day)d %(month)s %(year)d") % {
        "day": when.day,
        "month": _MONTHS[when.month - 1](),
        "year": when.year,
    }
    return _("%(date)s at %(time)s") % {"date": date_text, "time": time_text}


# Month names, translated when used (not at import: the reader's language is per request).
_MONTHS = (
    lambda: _("January"),
    lambda: _("February"),
    lambda: _("March"),
    lambda: _("April"),
    lambda: _("May"),
    lambda: _("June"),
    lambda: _("July"),
    lambda: _("August"),
    lambda: _("September"),
    lambda: _("October"),
    lambda: _("November"),
    lambda: _("December"),
)


def early_strings() -> dict[str, str]:
    """What call-early.js says (the device test and the countdown)."""
    return {
        "camera_ok": _("Camera works."),
        "camera_failed": _("No camera or microphone: allow access in your browser's settings."),
        "opening": _("The visit room is opening…"),
    }


async def _patient_visit(request: web.Request, token: calllinks.CallToken) -> dict[str, Any]:
    """The visit a patient's (genuine) link names, or CallLinkInvalid when it was moved or cancelled."""
    visit = await _visit(request, token.public_id)
    if visit is None or visit["call_nonce"] != token.nonce:
        raise calllinks.CallLinkInvalid(
            _("This call link was replaced: the visit was moved. Open the new link from your visit page.")
        )
    if token.role == "patient" and visit["status"] not in ("confirmed", "completed"):
        raise calllinks.CallLinkInvalid(_("This visit is not confirmed or was cancelled."))
    return visit


async def call_page(request: web.Request) -> web.Response:
    """The patient's call page. The signed link is the credential: no sign-in.

    Three states: too early (the visit, a local device test and a countdown; the page reloads
    itself when the link opens), the call (pre-call check, waiting room, call), and ended (one
    screen saying what happens next)."""
    settings = request.app[keys.SETTINGS]
    raw = request.match_info["token"]
    now = time.time()
    try:
        token = calllinks.decode(settings, raw, now)
    except calllinks.CallLinkNotYetValid as exc:
        if exc.token is None:
            raise
        if exc.token.role == "doctor":  # the consult room has its own (earlier) window
            raise web.HTTPSeeOther(
                str(request.app.router["consult_room"].url_for(public_id=exc.token.public_id))
            ) from None
        visit = await _patient_visit(request, exc.token)
        if visit["status"] != "confirmed":
            raise calllinks.CallLinkInvalid(_("This visit is not confirmed or was cancelled.")) from None
        view = booking.visit_view(visit, request[keys.LOCALE])
        view.pop("call_nonce", None)
        response = aiohttp_jinja2.render_template(
            "call_patient.html",
            request,
            {
                "state": "early",
                "visit": view,
                "when": _spoken_when(visit["starts_at"], settings.timezone, now),
                "opens_at": exc.opens_at,
                "server_now": now,
                "strings": early_strings(),
            },
        )
        # A page, not an error: the link is right, only early (not cached: it moves on by itself).
        response.headers["Cache-Control"] = "no-store"
        return response
    visit = await _patient_visit(request, token)
    if token.role == "doctor":
        raise web.HTTPSeeOther(str(request.app.router["consult_room"].url_for(public_id=token.public_id)))
    view = booking.visit_view(visit, request[keys.LOCALE])
    view.pop("call_nonce", None)
    if visit["status"] == "completed":
        next_steps, recording = await _next_steps(request, visit), {}
    else:
        # Two independent reads at once: this page is the first step of a patient's join.
        next_steps, recording = await asyncio.gather(
            _next_steps(request, visit), _recording_context(request, visit, "patient")
        )
    context: dict[str, Any] = {
        "host_view": False,
        "visit": view,
        "when": _spoken_when(visit["starts_at"], settings.timezone, now),
        **next_steps,
    }
    if visit["status"] == "completed":
        return aiohttp_jinja2.render_template("call_patient.html", request, {**context, "state": "ended"})
    return aiohttp_jinja2.render_template(
        "call_patient.html",
        request,
        {
            **context,
            "state": "call",
            "ws_path": _ws_path(request, visit["public_id"]),
            "hello_token": raw,
            "strings": call_strings(warning_s=settings.warning_minutes * 60),
            **recording,
            "consent_url": str(request.app.router["call_recording_consent"].url_for(token=raw)),
            "reschedule_url": str(
                request.app.router["visit_reschedule"].url_for(public_id=visit["public_id"])
            ),
        },
    )


async def _next_steps(request: web.Request, visit: dict[str, Any]) -> dict[str, Any]:
    """What the end screen points to: the prescriptions issued so far, the visit record, booking."""
    issued = await prescriptions.list_for_visit(request.app[keys.DB], visit["id"])
    router = request.app.router
    return {
        "rx_links": [
            {"number": rx.number, "url": str(router["rx_view"].url_for(number=rx.number))} for rx in issued
        ],
        "record_url": str(router["patient_home"].url_for()),
        "book_url": str(router["book"].url_for()),
    }


async def _recording_context(request: web.Request, visit: dict[str, Any], role: str) -> dict[str, Any]:
    settings = request.app[keys.SETTINGS]
    terms = await request.app[keys.DB].execute_fn(
        lambda db: recordings.terms_sync(db, visit["id"], settings.recording_policy)
    )
    own = terms.consent(role)
    return {
        "recording": terms,
        "recording_answer": "" if own is None else ("yes" if own else "no"),
        "retention_days": settings.recording_retention_days,
    }


async def _store_consent(
    request: web.Request, visit: dict[str, Any], role: str, actor_id: int | None
) -> web.Response:
    try:
        body = await json_body(request)
    except ValueError:  # not JSON, or nested deeper than any form of ours
        body = None
    consent = body.get("consent") if isinstance(body, dict) else None
    if not isinstance(consent, bool):
        return web.json_response({"error": "consent must be true or false"}, status=400)
    if visit["status"] != "confirmed":
        return web.json_response({"error": "this visit is not open"}, status=409)
    settings = request.app[keys.SETTINGS]
    remote = security.client_address(request)
    terms = await request.app[keys.DB].execute_write_fn(
        lambda db: recordings.set_consent_sync(
            db,
            visit["id"],
            role,
            consent,
            settings.recording_policy,
            actor_id=actor_id,
            remote=remote,
            subject_user_id=visit["patient_id"],
        )
    )
    return web.json_response(
        {**terms.as_dict(), "may_join": terms.may_join(role), "records": terms.records(role)},
        headers={"Cache-Control": "no-store"},
    )


async def patient_consent(request: web.Request) -> web.Response:
    """The patient's answer to "this visit will be recorded" (the signed link is the credential)."""
    settings = request.app[keys.SETTINGS]
    try:
        token = calllinks.decode(settings, request.match_info["token"], time.time())
    except (calllinks.CallLinkInvalid, calllinks.CallLinkExpired, calllinks.CallLinkNotYetValid):
        raise NotFound(_("No such visit.")) from None
    visit = await _visit(request, token.public_id)
    if visit is None or visit["call_nonce"] != token.nonce or token.role != "patient":
        raise NotFound(_("No such visit."))
    return await _store_consent(request, visit, "patient", visit["patient_id"])


async def doctor_consent(request: web.Request) -> web.Response:
    user, visit = await _own_visit(request)
    return await _store_consent(request, visit, "doctor", user.id)


async def _own_visit(request: web.Request) -> tuple[Any, dict[str, Any]]:
    user = security.require(request, "doctor")
    visit = await _visit(request, request.match_info["public_id"])
    if visit is None:
        raise NotFound(_("No such visit."))
    if visit["doctor_id"] != user.id:
        raise Forbidden(_("Only this visit's doctor can open its consult room."))
    return user, visit


async def consult_room(request: web.Request) -> web.Response:
    user, visit = await _own_visit(request)
    settings = request.app[keys.SETTINGS]
    now = time.time()
    # Opened from the board's admit (a POST with CSRF): the room admits the waiting patient.
    auto_admit = board.admit_ticket_valid(
        settings, request.query.get("admit", ""), visit["public_id"], user.id, now
    )
    await request.app[keys.DB].execute_write_fn(
        lambda db: reports.mark_looked_sync(db, visit["id"], user.id, now)
    )
    live.publish(request.app, live.board_topic(user.id))  # its reports are no longer new
    view = booking.visit_view(visit, request[keys.LOCALE])
    view.pop("call_nonce", None)
    return aiohttp_jinja2.render_template(
        "consult_room.html",
        request,
        {
            "visit": view,
            "ended": visit["status"] == "completed",
            "host_view": True,
            "can_edit": False,
            "ws_path": _ws_path(request, visit["public_id"]),
            "hello_token": calls.make_host_token(settings, visit["public_id"], user.id, time.time()),
            "token_url": str(request.app.router["consult_room_token"].url_for(public_id=visit["public_id"])),
            "earlier": await sidebar.earlier_visits(request.app[keys.DB], visit),
            "strings": call_strings(host=True, warning_s=settings.warning_minutes * 60),
            **await _recording_context(request, visit, "doctor"),
            "consent_url": str(
                request.app.router["room_recording_consent"].url_for(public_id=visit["public_id"])
            ),
            "auto_admit": auto_admit,
            "next_url": str(request.app.router["doctor_next"].url_for().with_query(after=visit["public_id"])),
        },
    )


async def host_token(request: web.Request) -> web.Response:
    """A fresh host token: the room page asks for one before reconnecting after the first expired."""
    user, visit = await _own_visit(request)
    token = calls.make_host_token(request.app[keys.SETTINGS], visit["public_id"], user.id, time.time())
    return web.json_response({"token": token}, headers={"Cache-Control": "no-store"})
