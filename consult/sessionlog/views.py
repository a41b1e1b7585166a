"""Admin session logs: the list with filters, one session's timeline and charts, the overview, CSV."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import logging
import re
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import NamedTuple
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import aiohttp_jinja2
import sqlite_utils
from aiohttp import web
from markupsafe import Markup, escape

from consult import sessionlog
from consult.audit.reads import audit_read
from consult.core import keys, security
from consult.core.errors import NotFound
from consult.core.formatting import to_local
from consult.core.i18n import _, get_locale, pgettext
from consult.core.ids import PUBLIC_ID_PATTERN
from consult.sessionlog import charts

log = logging.getLogger(__name__)
OVERVIEW_DAYS = 30
CSV_CHUNK = 2000


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/sessions", sessions_list, name="sessions_admin")
    r.add_get("/admin/sessions.csv", sessions_csv, name="sessions_csv")
    r.add_get("/admin/sessions/overview", sessions_overview, name="sessions_overview")
    r.add_get("/admin/sessions/{public_id:" + PUBLIC_ID_PATTERN + "}", session_page, name="session_admin")


def _outcome_labels() -> dict[str, str]:
    return {
        "completed": _("Completed"),
        "no_show": _("No-show"),
        "failed": _("Failed"),
        "cancelled": _("Cancelled"),
        "in_progress": _("In progress"),
    }


def _end_reason_labels() -> dict[str, str]:
    return {
        "time_limit": _("Time limit reached"),
        "host_ended": _("Doctor ended"),
        "patient_left": _("Patient left"),
        "connection_failed": _("Connection failed"),
        "no_show": _("Patient did not join"),
        "server_restart": _("Server restarted"),
    }


def _device_kinds() -> dict[str, str]:
    # The device label is stored as "mobile · iOS 17.2 · WeChat 8.0": the kind is ours to say.
    return {
        "desktop": _("desktop"),
        "mobile": _("mobile"),
        "tablet": _("tablet"),
        "bot": _("bot"),
        "unknown": _("unknown"),
    }


def device_label(stored: str | None) -> str:
    """A stored device label in the reader's language (the OS and browser are names)."""
    if not stored:
        return ""
    kinds = _device_kinds()
    first, sep, rest = stored.partition(" · ")
    return kinds.get(first, first) + sep + rest


def _detail_names() -> dict[str, str]:
    """The names of the timeline's details (sessionlog.describe_event)."""
    return {
        "device": _("Device"),
        "address": _("Address"),
        "state": _("State"),
        "pair": _("Route"),
        "rtt": _("Round-trip time"),
        "reason": _("Reason"),
        "seconds_left": _("Seconds left"),
        "minutes": _("Minutes"),
        "code": _("Code"),
        "chars": _("Characters"),
    }


def _detail_values() -> dict[str, str]:
    """Words the timeline's details use: why someone left or the visit ended, ICE states."""
    return {
        "left": _("Left"),
        "disconnected": _("Connection lost"),
        **_end_reason_labels(),
        "new": pgettext("ICE state", "New"),
        "checking": pgettext("ICE state", "Checking"),
        "connected": pgettext("ICE state", "Connected"),
        "completed": pgettext("ICE state", "Completed"),
        "failed": pgettext("ICE state", "Failed"),
        "closed": pgettext("ICE state", "Closed"),
    }


def _timeline_details(info: dict[str, str]) -> dict[str, str]:
    names, values = _detail_names(), _detail_values()
    out = {}
    for k, v in info.items():
        if k in ("reason", "state"):
            v = values.get(v, v)
        elif k == "device":
            v = device_label(v)
        out[names.get(k, k)] = v
    return out


def _filters(request: web.Request) -> sessionlog.Filters:
    return sessionlog.Filters.from_query(request.query)


class RowText(NamedTuple):
    """What the list's rows need from the request, made once per page on the event loop: the
    labels in the reader's language (escaped) and the link to a session around its id."""

    outcomes: dict[str, str]
    reasons: dict[str, str]
    yes: str
    zh: bool
    href_head: str
    href_tail: str

    @classmethod
    def of(cls, request: web.Request) -> RowText:
        # The route's pattern, "/admin/sessions/{public_id}": the id goes where its name is.
        head, _m, tail = str(escape(request.app.router["session_admin"].canonical)).partition("{public_id}")
        outcomes, reasons, yes = _row_labels(get_locale())
        return cls(outcomes, reasons, yes, request.get(keys.LOCALE) == "zh_CN", head, tail)


@functools.lru_cache(maxsize=8)  # one per locale: the catalogues do not change while the server runs
def _row_labels(locale: str) -> tuple[dict[str, str], dict[str, str], str]:
    """The rows' outcome and end-reason labels and "yes", escaped, in ``locale`` (the current one)."""
    return (
        {k: str(escape(v)) for k, v in _outcome_labels().items()},
        {k: str(escape(v)) for k, v in _end_reason_labels().items()},
        str(escape(_("yes"))),
    )


_BADGES = {"completed": "ok", "failed": "warn", "no_show": "warn"}
# One line of the list. Every %s receives text escaped by `rows_html`, or digits and punctuation
# (times, minutes, counts), so the page places the whole block without escaping it again.
_ROW = (
    '<tr data-visit="%s">\n'
    '    <td><a href="%s">%s</a></td><td>%s</td><td>%s</td><td>%s</td>\n'
    '    <td><span class="badge %s">%s</span></td><td>%s</td>\n'
    '    <td class="num">%s</td><td>%s</td><td class="num">%s</td>\n'
    "  </tr>"
)
_NEEDS_ESCAPE = re.compile(r"[&<>\"']").search


def _esc(text: str) -> str:
    """``text`` HTML-escaped as markupsafe does it; most names and ids need nothing."""
    return str(escape(text)) if _NEEDS_ESCAPE(text) else text


def local_minutes(tz: str) -> Callable[[float], str]:
    """``ts -> "YYYY-MM-DD HH:MM"`` in ``tz`` (what the ``localtime`` filter shows), one zone lookup."""
    zone = ZoneInfo(tz)

    def fmt(ts: float) -> str:
        d = datetime.fromtimestamp(ts, zone)
        return f"{d.year:04d}-{d.month:02d}-{d.day:02d} {d.hour:02d}:{d.minute:02d}"

    return fmt


def rows_html(rows: list[sessionlog.PageRow], text: RowText, tz: str) -> Markup:
    """The page's rows as one block of HTML, in the reader's language, every cell escaped.

    Made in Python, in the same reader-thread job as the query, because the page shows 50 rows
    per request, 8 admins at once (bench/admin.py): Jinja writing 12 cells per row, each one a
    step of the template's generator, was most of the page's cost.
    """
    outcomes, reasons, yes = text.outcomes, text.reasons, text.yes
    head, tail = text.href_head, text.href_tail
    when = local_minutes(tz)
    names: dict[str, str] = {}  # a page names a few doctors and departments many times: escape each once
    out = []
    for (
        _v,
        start,
        outcome,
        end_reason,
        seconds,
        turn,
        reconnects,
        public_id,
        patient,
        doctor,
        dep_en,
        dep_zh,
    ) in rows:
        public_id = _esc(public_id)
        department = dep_zh if text.zh else dep_en
        dep = names.get(department)
        if dep is None:
            dep = names[department] = _esc(department)
        doc = names.get(doctor)
        if doc is None:
            doc = names[doctor] = _esc(doctor)
        out.append(
            _ROW
            % (
                public_id,
                head + public_id + tail,
                when(start),
                dep,
                doc,
                _esc(patient),
                _BADGES.get(outcome, ""),
                outcomes.get(outcome) or _esc(outcome),
                reasons.get(end_reason or "", ""),
                f"{seconds / 60:.1f}",
                yes if turn else "",
                int(reconnects),
            )
        )
    return Markup("\n  ".join(out))  # noqa: S704 - every cell escaped or digits, above


@functools.lru_cache(maxsize=64)
def options_html(choices: tuple[tuple[int, str], ...], selected: int | None) -> Markup:
    """A select's options, escaped, as HTML: 60 doctors on every list page, the same each time
    (the page reads the choices afresh; the HTML is made again only when they change)."""
    return Markup("").join(
        Markup('<option value="%s"%s>%s</option>')
        % (value, Markup(" selected") if value == selected else "", label)
        for value, label in choices
    )


class ListRead(NamedTuple):
    rows: Markup  # rows_html
    shown: int
    next_cursor: tuple[int, int] | None
    departments: tuple[tuple[int, str], ...]  # (id, name in the reader's language)
    doctors: tuple[tuple[int, str], ...]


def _list_page_sync(
    db: sqlite_utils.Database,
    f: sessionlog.Filters,
    cursor: tuple[int, int] | None,
    tz: str,
    text: RowText,
) -> ListRead:
    """The page, its rows made into HTML, and the filter form's choices: one trip to the reader
    pool, whose thread holds the rows already."""
    rows, next_cursor = sessionlog.list_page_sync(db, f, cursor, tz=tz)
    departments, doctors = sessionlog.filter_choices_sync(db)
    return ListRead(
        rows_html(rows, text, tz),
        len(rows),
        next_cursor,
        tuple((d_id, zh if text.zh else en) for d_id, en, zh in departments),
        doctors,
    )


async def sessions_list(request: web.Request) -> web.Response:
    security.require(request, "admin")
    settings = request.app[keys.SETTINGS]
    db = request.app[keys.DB]
    f = _filters(request)
    cursor = sessionlog.decode_cursor(request.query.get("cursor"))
    text = RowText.of(request)
    # The list shows patients' names: one read entry per page, naming the search that was made.
    # It is written (by the writer thread) while a reader fetches the page, and committed before
    # the page is sent: neither waits for the other, and a page is never shown unaudited.
    page, _entry = await asyncio.gather(
        db.execute_fn(lambda d: _list_page_sync(d, f, cursor, settings.timezone, text)),
        audit_read(request, "session.list", "session", None, None, filters=f.to_query(), page=bool(cursor)),
    )
    base = f.to_query()
    admin_url = request.app.router["sessions_admin"].canonical  # a plain path: no URL to build
    return aiohttp_jinja2.render_template(
        "sessions_list.html",
        request,
        {
            "rows": page.rows,
            "shown": page.shown,
            "filters": f,
            "query": base,
            "department_options": options_html(page.departments, f.department_id),
            "doctor_options": options_html(page.doctors, f.doctor_id),
            "outcomes": _outcome_labels(),
            "end_reasons": _end_reason_labels(),
            "next_url": (
                admin_url + "?" + urlencode({**base, "cursor": sessionlog.encode_cursor(*page.next_cursor)})
                if page.next_cursor
                else None
            ),
            "first_url": admin_url + ("?" + urlencode(base) if base else "") if cursor else None,
            "csv_url": request.app.router["sessions_csv"].canonical + ("?" + urlencode(base) if base else ""),
        },
    )


def _minutes_label(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _quality_charts(samples: dict[str, list[dict]]) -> list:
    sides = (("patient", _("Patient")), ("doctor", _("Doctor")))
    out = []
    for field, title, unit in (
        ("bitrate_kbps", _("Bitrate received"), "kbit/s"),
        ("loss_pct", _("Packet loss"), "%"),
        ("fps", _("Frames per second"), "fps"),
        ("rtt_ms", _("Round-trip time"), "ms"),
    ):
        series = [
            charts.Series(label, [(s["t"], s[field]) for s in samples[key]])
            for key, label in sides
            if samples[key]
        ]
        out.append(
            charts.line_chart(
                series,
                title=title,
                unit=unit,
                x_label=_minutes_label,
                y_max=100.0 if field == "loss_pct" and not series else None,
                empty_text=_("No quality samples"),
            )
        )
    return out


async def session_page(request: web.Request) -> web.Response:
    security.require(request, "admin")
    settings = request.app[keys.SETTINGS]
    detail = await request.app[keys.DB].execute_fn(
        lambda d: sessionlog.session_detail_sync(d, request.match_info["public_id"])
    )
    if detail is None:
        raise NotFound(_("No such visit."))
    visit = detail["visit"]
    await audit_read(request, "session.view", "visit", visit["id"], visit["patient_id"])
    start = (detail["summary"] or {}).get("room_opened") or visit["starts_at"]
    timeline = [
        {
            **e,
            "offset": _minutes_label(max(0.0, e["created"] - start)),
            "info": _timeline_details(sessionlog.describe_event(e, mask=settings.mask_addresses)),
        }
        for e in detail["events"]
    ]
    return aiohttp_jinja2.render_template(
        "sessions_detail.html",
        request,
        {
            **detail,
            "timeline": timeline,
            "charts": _quality_charts(detail["samples"]),
            "outcomes": _outcome_labels(),
            "end_reasons": _end_reason_labels(),
            "event_labels": _event_labels(),
            "device_label": device_label,
        },
    )


def _event_labels() -> dict[str, str]:
    return {
        "room_opened": _("Room opened"),
        "joined": _("Joined"),
        "left": _("Left"),
        "replaced": _("Connection replaced"),
        "waiting": _("Waiting room"),
        "admitted": _("Admitted"),
        "ready": _("Patient pressed Join"),
        "clock_started": _("Visit clock started"),
        "warning": _("End warning"),
        "ended": _("Ended"),
        "ice_state": _("Connection state"),
        "reconnect": _("Reconnected"),
        "ice_restart": _("ICE restart"),
        "chat": _("Chat message"),
        "error": _("Error"),
        "recording_started": _("Recording started"),
        "recording_stopped": _("Recording stopped"),
    }


def _overview_range(request: web.Request, tz: str) -> tuple[date, date]:
    today = sessionlog.local_day(time.time(), tz)
    last = date.fromisoformat(today)
    first = last - timedelta(days=OVERVIEW_DAYS - 1)
    f = _filters(request)
    if f.date_to:
        last = f.date_to
    if f.date_from:
        first = f.date_from
    if first > last or (last - first).days > 366:
        first = last - timedelta(days=OVERVIEW_DAYS - 1)
    return first, last


def _pct(value: float | None) -> float | None:
    return None if value is None else value * 100


async def sessions_overview(request: web.Request) -> web.Response:
    security.require(request, "admin")
    tz = request.app[keys.SETTINGS].timezone
    first, last = _overview_range(request, tz)
    days = await request.app[keys.DB].execute_fn(lambda d: sessionlog.overview_sync(d, first, last))
    labels = [d.day[5:] for d in days]  # MM-DD

    def bars(values: list[float | None]) -> list[tuple[str, float | None]]:
        return list(zip(labels, values, strict=True))

    def pct_label(v: float) -> str:
        return f"{v:.0f}%"

    chart_list = [
        charts.bar_chart(bars([d.visits for d in days]), title=_("Visits per day"), integer=True),
        charts.bar_chart(
            bars([_pct(d.completion_rate) for d in days]),
            title=_("Completion rate"),
            unit="%",
            y_max=100,
            value_format=pct_label,
            color=charts.PALETTE[2],
        ),
        charts.bar_chart(
            bars([d.avg_connected_minutes for d in days]),
            title=_("Average connected minutes"),
            unit="min",
            color=charts.PALETTE[3],
        ),
        charts.bar_chart(
            bars([_pct(d.turn_share) for d in days]),
            title=_("Share of calls needing TURN"),
            unit="%",
            y_max=100,
            value_format=pct_label,
            color=charts.PALETTE[4],
        ),
        charts.bar_chart(
            bars([_pct(d.no_show_rate) for d in days]),
            title=_("No-show rate"),
            unit="%",
            y_max=100,
            value_format=pct_label,
            color=charts.PALETTE[1],
        ),
    ]
    return aiohttp_jinja2.render_template(
        "sessions_overview.html",
        request,
        {"first": first, "last": last, "charts": chart_list, "total": sessionlog.totals(days)},
    )


CSV_COLUMNS = (
    "visit",
    "scheduled_start",
    "department",
    "doctor",
    "patient",
    "outcome",
    "end_reason",
    "room_opened",
    "started_at",
    "ended_at",
    "connected_minutes",
    "used_turn",
    "reconnects",
    "ice_restarts",
    "patient_device",
    "doctor_device",
    "recording",
)


def csv_header() -> list[str]:
    """The CSV's column names in the reader's language (English: the column keys)."""
    names = {
        "visit": pgettext("CSV column", "visit"),
        "scheduled_start": pgettext("CSV column", "scheduled_start"),
        "department": pgettext("CSV column", "department"),
        "doctor": pgettext("CSV column", "doctor"),
        "patient": pgettext("CSV column", "patient"),
        "outcome": pgettext("CSV column", "outcome"),
        "end_reason": pgettext("CSV column", "end_reason"),
        "room_opened": pgettext("CSV column", "room_opened"),
        "started_at": pgettext("CSV column", "started_at"),
        "ended_at": pgettext("CSV column", "ended_at"),
        "connected_minutes": pgettext("CSV column", "connected_minutes"),
        "used_turn": pgettext("CSV column", "used_turn"),
        "reconnects": pgettext("CSV column", "reconnects"),
        "ice_restarts": pgettext("CSV column", "ice_restarts"),
        "patient_device": pgettext("CSV column", "patient_device"),
        "doctor_device": pgettext("CSV column", "doctor_device"),
        "recording": pgettext("CSV column", "recording"),
    }
    return [names[c] for c in CSV_COLUMNS]


def csv_rows(rows: list[dict], tz: str, locale: str = "en") -> str:
    """The rows as CSV. In English the outcome and end reason stay codes (for scripts); in
    another language they are the words the list page shows, and so are device kinds."""
    english = locale == "en"
    outcomes, reasons = _outcome_labels(), _end_reason_labels()

    def ts(value: float | None) -> str:
        return "" if value is None else to_local(float(value), tz).strftime("%Y-%m-%d %H:%M:%S")

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for r in rows:
        writer.writerow(
            [
                sessionlog.csv_safe(v)
                for v in (
                    r["public_id"],
                    ts(r["scheduled_start"]),
                    r["department_name_en"] if english else r["department_name_zh"],
                    r["doctor_name"],
                    r["patient_name"],
                    r["outcome"] if english else outcomes.get(r["outcome"], r["outcome"]),
                    (r["end_reason"] or "") if english else reasons.get(r["end_reason"] or "", ""),
                    ts(r["room_opened"]),
                    ts(r["started_at"]),
                    ts(r["ended_at"]),
                    f"{r['connected_seconds'] / 60:.1f}",
                    int(r["used_turn"]),
                    r["reconnects"],
                    r["ice_restarts"],
                    (r["patient_device"] or "") if english else device_label(r["patient_device"]),
                    (r["doctor_device"] or "") if english else device_label(r["doctor_device"]),
                    int(r["recording"]),
                )
            ]
        )
    return buffer.getvalue()


_FILENAME_SAFE = re.compile(r"[^0-9A-Za-z_.-]")


async def sessions_csv(request: web.Request) -> web.StreamResponse:
    security.require(request, "admin")
    tz = request.app[keys.SETTINGS].timezone
    db = request.app[keys.DB]
    f = _filters(request)
    await audit_read(request, "session.export", "session", None, None, filters=f.to_query())
    stamp = _FILENAME_SAFE.sub("", sessionlog.local_day(time.time(), tz))
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="sessions-{stamp}.csv"',
        }
    )
    await response.prepare(request)
    if request.method == "HEAD":
        # The headers only: a body after a HEAD answer corrupts the client's next response.
        await response.write_eof()
        return response
    # A BOM so that Excel opens UTF-8 names correctly.
    header = io.StringIO()
    csv.writer(header).writerow(csv_header())
    await response.write(("\ufeff" + header.getvalue()).encode())
    cursor = None
    while True:
        # One keyset page per read: the database is never held while the client reads slowly.
        rows, cursor = await db.execute_fn(
            lambda d, c=cursor: sessionlog.list_sessions_sync(d, f, c, limit=CSV_CHUNK, tz=tz)
        )
        if rows:
            await response.write(csv_rows(rows, tz, request[keys.LOCALE]).encode())
        if cursor is None:
            break
    await response.write_eof()
    return response
