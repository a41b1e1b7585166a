"""What booking tells the patient: confirmations, cancellations, moves and reminders (SMS).

Every message is a durable job (``consult.core.jobs``, kind ``notify``) queued in the transaction
of the change it reports (``enqueue_notice_sync``) and sent by ``perform_notice``: a crash after
the commit delays a message, never loses it. A reminder is marked sent only once it was sent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import sqlite_utils
from aiohttp import web

from consult.booking import catalogue
from consult.booking.visits import get_visit_sync
from consult.core import i18n, jobs, keys
from consult.core.config import ConfigError
from consult.core.formatting import to_local
from consult.core.i18n import _
from consult.core.outbox import Message

REMINDER_DAY, REMINDER_HOUR = 1, 2  # values of visits.reminder_sent
NOTIFY_JOB = "notify"

log = logging.getLogger(__name__)


def enqueue_notice_sync(
    db: sqlite_utils.Database,
    visit: Any,
    kind: str,
    *,
    now: float,
    level: int | None = None,
    minutes: int | None = None,
) -> bool:
    """Queue a message about a visit in the caller's transaction (once per visit, kind and time).

    ``visit`` is the visit's row as it stands after the change (moves and reminders are keyed by
    its time, so a move gets its own message and a reminder for an old time is never sent).
    """
    key = f"visit:{visit['id']}:{kind}"
    payload: dict[str, Any] = {"visit_id": visit["id"], "kind": kind}
    if kind in ("moved", "reminder"):
        key += f":{visit['starts_at']}"
        payload["starts_at"] = visit["starts_at"]
    if level is not None:
        key += f":{level}"
        payload["level"] = level
    if minutes is not None:  # "late": how late the doctor is running
        payload["minutes"] = minutes
    return jobs.enqueue_sync(db, NOTIFY_JOB, payload, key=key, now=now)


# Visits a reminder write queues at most: 9,950 due at once (a big clinic's next hour) were one
# 220 ms write, mostly Python holding the GIL, while the loop served calls; in steps of 500 the
# loop runs between them.
REMINDER_STEP = 500

# Confirmed visits within the next day whose reminder at their level (a day before, then an hour
# before) is neither sent nor queued: the key's text is `enqueue_notice_sync`'s.
_REMINDERS_DUE = (
    "SELECT id, starts_at, level FROM (SELECT v.id, v.starts_at, v.reminder_sent, CASE"  # noqa: S608
    f" WHEN v.starts_at - ? <= 3600 THEN {REMINDER_HOUR} ELSE {REMINDER_DAY} END AS level FROM visits v"
    " WHERE v.status = 'confirmed' AND v.starts_at > ? AND v.starts_at <= ?) due"
    " WHERE due.reminder_sent < due.level AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.kind = ?"
    " AND j.key = 'visit:' || due.id || ':reminder:' || due.starts_at || ':' || due.level)"
    " ORDER BY due.starts_at, due.id LIMIT ?"
)


def unqueued_reminders_sync(db: sqlite_utils.Database, now: float, limit: int) -> list[Any]:
    """Up to ``limit`` visits due a reminder that is neither sent nor queued, soonest first: rows of
    ``id``, ``starts_at`` and the reminder's ``level``."""
    return db.execute(_REMINDERS_DUE, [now, now, now + 86400, NOTIFY_JOB, limit]).fetchall()


def reminders_due_sync(db: sqlite_utils.Database, now: float, limit: int = REMINDER_STEP) -> int:
    """Queue the reminders confirmed visits are due (a day before, then an hour before), at most
    ``limit``; how many. Fewer than ``limit``: none is left (`booking.housekeeping` calls again
    until then). ``visits.reminder_sent`` changes only when the job has sent it; a reminder
    already queued is not read again.
    """
    rows = unqueued_reminders_sync(db, now, limit)
    queued = sum(enqueue_notice_sync(db, r, "reminder", now=now, level=r["level"]) for r in rows)
    if queued < len(rows):  # read as not queued, yet its key was there: the two keys disagree
        log.warning("%d reminders read as not queued were queued already", len(rows) - queued)
    return queued


def mark_reminded_sync(db: sqlite_utils.Database, visit_id: int, starts_at: int, level: int) -> None:
    db.execute(
        "UPDATE visits SET reminder_sent = max(reminder_sent, ?) WHERE id = ? AND starts_at = ?",
        [level, visit_id, starts_at],
    )


def base_url(settings: Any, request: web.Request | None = None) -> str:
    """Absolute origin for links sent to people (call links, .ics, QR codes, SMS): public_url.

    Only in demo mode, without public_url, the request's own origin stands in (else this
    machine's). In production a request's Host never makes a link: anyone can send any Host,
    and `consult serve` refuses to start without public_url, so this raises instead.
    """
    if settings.public_url:
        return settings.public_url.rstrip("/")
    if not settings.demo:
        raise ConfigError("public_url is not set: links to patients cannot be made (docs/install.md)")
    if request is not None:
        return str(request.url.origin())
    return f"{'https' if settings.tls else 'http'}://localhost:{settings.port}"


@contextlib.contextmanager
def speaking(locale: str | None) -> Iterator[None]:
    token = i18n.set_locale(locale or "en")
    try:
        yield
    finally:
        i18n._current.reset(token)


def visit_message(settings: Any, visit: dict, kind: str, origin: str, minutes: int = 0) -> Message:
    locale = visit.get("patient_locale") or settings.default_locale
    with speaking(locale):
        when = to_local(visit["starts_at"], settings.timezone).strftime("%Y-%m-%d %H:%M")
        dep = catalogue.localized(
            {"name_zh": visit["department_name_zh"], "name_en": visit["department_name_en"]}, "name", locale
        )
        params = {
            "hospital": settings.hospital_name,
            "when": when,
            "doctor": visit["doctor_name"],
            "department": dep,
            "url": f"{origin}/visits/{visit['public_id']}",
            "minutes": minutes,
        }
        if kind == "confirmed":
            subject = _("Visit confirmed")
            body = _(
                "%(hospital)s: your online visit with %(doctor)s (%(department)s) is confirmed for"
                " %(when)s. Details and the call link: %(url)s"
            )
        elif kind == "cancelled":
            subject = _("Visit cancelled")
            body = _(
                "%(hospital)s: your online visit with %(doctor)s on %(when)s was cancelled."
                " Any payment will be refunded. Details: %(url)s"
            )
        elif kind == "moved":
            subject = _("Visit moved")
            body = _(
                "%(hospital)s: your online visit with %(doctor)s now starts at %(when)s. Details: %(url)s"
            )
        elif kind == "late":
            subject = _("Your doctor is running late")
            body = _(
                "%(hospital)s: %(doctor)s is running about %(minutes)d minutes late. Your visit at"
                " %(when)s will start later; keep your call page open and you will be admitted."
                " Details: %(url)s"
            )
        else:
            subject = _("Visit reminder")
            body = _(
                "%(hospital)s: reminder, your online visit with %(doctor)s starts at %(when)s."
                " Open the call link from: %(url)s"
            )
        return Message("sms", visit["patient_phone"] or "", subject, body % params)


async def notify_visit(app: web.Application, visit_id: int, kind: str, origin: str | None = None) -> None:
    settings = app[keys.SETTINGS]
    visit = await app[keys.DB].execute_fn(lambda db: get_visit_sync(db, visit_id=visit_id))
    if visit is None or not visit["patient_phone"]:
        return
    await app[keys.NOTIFIER].send(visit_message(settings, visit, kind, origin or base_url(settings)))


async def after_confirmed(app: web.Application, visit_id: int, base_url: str | None = None) -> None:
    """Tell the patient their visit is confirmed (SMS with time and page link), now."""
    await notify_visit(app, visit_id, "confirmed", base_url)


async def perform_notice(app: web.Application, job: jobs.Job) -> str | jobs.Finish:
    """The ``notify`` job: send one message about a visit, unless the visit has moved on since."""
    payload = job.payload
    visit_id, kind = int(payload["visit_id"]), payload["kind"]
    db = app[keys.DB]
    visit = await db.execute_fn(lambda d: get_visit_sync(d, visit_id=visit_id))
    if visit is None:
        return "gone"
    if kind in ("moved", "reminder") and visit["starts_at"] != payload.get("starts_at"):
        return "stale"  # moved again: that move queued its own message
    level = int(payload.get("level") or 0)
    if kind == "reminder" and (visit["status"] != "confirmed" or visit["reminder_sent"] >= level):
        return "stale"
    if kind == "late" and visit["status"] != "confirmed":
        return "stale"  # seen, cancelled or missed meanwhile
    if visit["patient_phone"]:
        settings = app[keys.SETTINGS]
        minutes = int(payload.get("minutes") or 0)
        await app[keys.NOTIFIER].send(visit_message(settings, visit, kind, base_url(settings), minutes))
    if kind == "reminder":  # marked sent in the write that finishes the job
        return jobs.Finish("sent", lambda d: mark_reminded_sync(d, visit_id, visit["starts_at"], level))
    return "sent"
