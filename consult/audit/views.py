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
from consult.core.i18n import _


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/audit", audit_search, name="audit_admin")
    r.add_get("/admin/audit/verify", audit_verify, name="audit_verify")
    r.add_get("/patient/access-log", access_log, name="patient_access_log")


def action_names() -> dict[str, str]:
    """What each audited action is called, in the reader's language (the code stays visible to
    admins: it is what the search filters on)."""
    return {
        "access_log.view": _("Viewed their access log"),
        "account.activate": _("Account activated"),
        "account.create": _("Account created"),
        "account.deactivate": _("Account deactivated"),
        "account.reset_password": _("Password reset"),
        "audit.search": _("Searched the audit trail"),
        "catalogue.department_save": _("Department saved"),
        "catalogue.doctor_save": _("Doctor profile saved"),
        "department.recording_policy": _("Department recording policy changed"),
        "doctor.recording_policy": _("Doctor recording policy changed"),
        "note.update": _("Visit notes updated"),
        "note.view": _("Visit notes viewed"),
        "payment.list": _("Payments listed"),
        "payment.mark_paid": _("Payment marked as paid"),
        "payment.refund": _("Payment refunded"),
        "payment.view": _("Payment viewed"),
        "prescription.download": _("Prescription downloaded"),
        "prescription.issue": _("Prescription issued"),
        "prescription.verify": _("Prescription verified"),
        "prescription.view": _("Prescription viewed"),
        "prescription.pdf": _("Prescription PDF opened"),
        "prescription.review_queue": _("Prescription review queue viewed"),
        "prescription.approve": _("Prescription approved by the pharmacist"),
        "prescription.return": _("Prescription returned by the pharmacist"),
        "recording.delete": _("Recording deleted"),
        "recording.play": _("Recording played"),
        "report.delete": _("Test report deleted"),
        "report.list": _("Test reports listed"),
        "report.upload": _("Test report uploaded"),
        "report.view": _("Test report viewed"),
        "schedule.exception_add": _("Leave or extra session added"),
        "schedule.exception_delete": _("Leave or extra session removed"),
        "schedule.template_add": _("Weekly session added"),
        "schedule.template_delete": _("Weekly session removed"),
        "session.export": _("Session log exported"),
        "session.list": _("Session log listed"),
        "session.view": _("Session viewed"),
        "visit.cancel": _("Visit cancelled"),
        "visit.confirm": _("Visit confirmed"),
        "visit.hold": _("Visit time held"),
        "visit.list": _("Visits listed"),
        "visit.recording_consent": _("Recording consent answered"),
        "visit.reschedule": _("Visit rescheduled"),
        "visit.view": _("Visit viewed"),
    }


def role_names() -> dict[str, str]:
    return {
        "patient": _("Patient"),
        "doctor": _("Doctor"),
        "admin": _("Administrator"),
        "pharmacist": _("Pharmacist"),
        "system": _("System"),
        "cli": _("Command line"),
    }


def _names() -> dict[str, object]:
    return {"action_names": action_names(), "role_names": role_names()}


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
            **_names(),
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
        {"rows": rows, "next_url": _next_url(request, "patient_access_log", {}, next_before), **_names()},
    )
