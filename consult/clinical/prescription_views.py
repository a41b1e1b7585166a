"""Visit notes (autosave API), prescriptions (issue, print, download) and public verification."""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from consult.audit import chain as audit
from consult.booking import base_url
from consult.clinical import notes, prescriptions, rx_pdf, signing
from consult.clinical.reports import visit_by_public_id
from consult.clinical.signing import SIGNING_KEY
from consult.core import keys, qr, security
from consult.core.errors import BadRequest, NotFound, UnsupportedMediaType
from consult.core.formatting import to_local
from consult.core.forms import json_body
from consult.core.i18n import _, pgettext

NUMBER = r"{number:RX-[0-9]{4}-[0-9]{6,}}"


def setup(app: web.Application) -> None:
    # The form's choices (route, frequency, sex) in the page's language, wherever the form is included.
    env = aiohttp_jinja2.get_env(app)
    env.globals["rx_labels"] = prescriptions.labels
    env.globals["rx_line"] = rx_pdf.item_line  # (drug and strength, how to take it), either format
    r = app.router
    r.add_get("/api/visits/{public_id}/notes", notes_get, name="visit_notes")
    r.add_put("/api/visits/{public_id}/notes", notes_put)
    r.add_get("/api/visits/{public_id}/prescriptions", rx_list, name="rx_list")
    r.add_post("/api/visits/{public_id}/prescriptions", rx_issue, name="rx_issue")
    r.add_post("/api/visits/{public_id}/prescriptions/preview", rx_preview, name="rx_preview")
    r.add_get(f"/prescriptions/{NUMBER}.json", rx_download, name="rx_download")
    r.add_get(f"/prescriptions/{NUMBER}.pdf", rx_pdf_view, name="rx_pdf")
    r.add_get(f"/prescriptions/{NUMBER}", rx_view, name="rx_view")
    r.add_get("/verify", verify_page, name="rx_verify")
    r.add_post("/verify", verify_submit)
    r.add_get("/verify/key", verify_key, name="rx_verify_key")
    r.add_get("/pharmacy", pharmacy_page, name="pharmacy")
    r.add_post(f"/pharmacy/{NUMBER}", pharmacy_review, name="pharmacy_review")


async def _visit(request: web.Request) -> dict[str, Any]:
    visit = await visit_by_public_id(request.app[keys.DB], request.match_info["public_id"])
    if visit is None:
        raise NotFound(_("This visit does not exist."))
    visit.pop("call_nonce", None)
    return visit


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(_("Send JSON."), code="not_json")
    try:
        return await json_body(request)
    except ValueError:  # not JSON, or "[[[[…" nested deeper than any form of ours
        raise BadRequest(_("The request was not valid JSON."), code="bad_json") from None


# -- notes ----------------------------------------------------------------------------------------


async def notes_get(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit(request)
    notes.require_author(user, visit)
    db = request.app[keys.DB]
    note = await notes.get(db, visit["id"])
    earlier = await notes.earlier_for_patient(db, visit)
    for e in earlier:
        for rx in e["prescriptions"]:
            rx["url"] = str(request.app.router["rx_view"].url_for(number=rx["number"]))
    await notes.record_read(db, visit, user, security.client_address(request), len(earlier))
    return web.json_response(
        {
            "note": note.public(),
            "editable": visit["status"] in notes.EDITABLE_STATUSES,
            "limits": {"text": notes.MAX_TEXT, "advice": notes.MAX_ADVICE},
            "earlier": earlier,
        }
    )


async def notes_put(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit(request)
    notes.require_author(user, visit)
    body = await _json_body(request)
    try:
        note = await notes.save(
            request.app[keys.DB],
            visit=visit,
            doctor=user,
            body=body,
            remote=security.client_address(request),
        )
    except notes.StaleNote as exc:
        # The editor needs the current text to offer a merge, so this 409 carries it.
        return web.json_response(
            {"error": exc.code, "message": exc.message, "current": exc.current.public()}, status=409
        )
    return web.json_response({"note": note.public()})


# -- prescriptions --------------------------------------------------------------------------------


def _status_label(status: str) -> str:
    return {
        prescriptions.ISSUED: pgettext("prescription status", "Issued"),
        prescriptions.PENDING: pgettext("prescription status", "Waiting for the pharmacist"),
        prescriptions.RETURNED: pgettext("prescription status", "Returned by the pharmacist"),
    }.get(status, status)


def _rx_json(request: web.Request, p: prescriptions.Prescription) -> dict[str, Any]:
    doc = p.document
    router = request.app.router
    items = []
    for item in doc["items"]:
        head, how = rx_pdf.item_line(item)
        items.append({**item, "head": head, "how": how})
    return {
        "number": p.number,
        "issued_at": doc["issued_at"],
        "doctor_name": doc["doctor"]["name"],
        "diagnosis": doc.get("diagnosis", ""),
        "items": items,
        "status": p.status,
        "status_label": _status_label(p.status),
        "review_note": p.review_note,
        "url": str(router["rx_view"].url_for(number=p.number)),
        "download_url": str(router["rx_download"].url_for(number=p.number)),
        "pdf_url": str(router["rx_pdf"].url_for(number=p.number)),
    }


async def rx_list(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit(request)
    if not prescriptions.can_read_visit(user, visit):
        raise NotFound(_("This visit does not exist."))
    db = request.app[keys.DB]
    # The patient sees a prescription once it is issued (after the pharmacist, when review is on).
    items = await prescriptions.list_for_visit(db, visit["id"], issued_only=user.role == "patient")
    return web.json_response(
        {
            "prescriptions": [_rx_json(request, p) for p in items],
            "advice": await notes.advice_for_visit(db, visit["id"]),
            "can_issue": user.role == "doctor"
            and user.id == visit["doctor_id"]
            and visit["status"] in prescriptions.ISSUABLE_STATUSES,
        }
    )


def _invalid(exc: prescriptions.InvalidPrescription) -> web.Response:
    return web.json_response(
        {"error": exc.code, "message": exc.message, "errors": exc.errors}, status=exc.status
    )


async def rx_preview(request: web.Request) -> web.Response:
    """Validate the form and show the sheet exactly as it will be signed, with its content hash."""
    user = security.require(request)
    visit = await _visit(request)
    prescriptions.require_prescriber(user, visit)
    body = await _json_body(request)
    try:
        content = prescriptions.validate(body)
    except prescriptions.InvalidPrescription as exc:
        return _invalid(exc)
    settings = request.app[keys.SETTINGS]
    doc = await prescriptions.preview_document(
        request.app[keys.DB],
        visit=visit,
        doctor=user,
        content=content,
        hospital_name=settings.hospital_name,
        locale=settings.default_locale,
    )
    html = aiohttp_jinja2.render_string(
        "_rx_sheet.html", request, {"doc": doc, "rx": None, "preview": True, **_sheet_context(doc)}
    )
    return web.json_response(
        {
            "html": html,
            "preview_hash": prescriptions.preview_hash(doc),
            "review": settings.pharmacist_review,
        }
    )


async def rx_issue(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit(request)
    prescriptions.require_prescriber(user, visit)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest(_("Send the prescription as a JSON object."), code="bad_json")
    settings = request.app[keys.SETTINGS]
    key = await request.app[SIGNING_KEY].get()
    try:
        p, created = await prescriptions.issue(
            request.app[keys.DB],
            key,
            visit=visit,
            doctor=user,
            body=body,
            hospital_name=settings.hospital_name,
            tz=settings.timezone,
            locale=settings.default_locale,
            review=settings.pharmacist_review,
            remote=security.client_address(request),
        )
    except prescriptions.InvalidPrescription as exc:
        return _invalid(exc)
    return web.json_response({"prescription": _rx_json(request, p)}, status=201 if created else 200)


async def _readable(request: web.Request) -> tuple[prescriptions.Prescription, Any]:
    user = security.require(request)
    p = await prescriptions.get_by_number(request.app[keys.DB], request.match_info["number"])
    # 404 for strangers too: numbers are sequential, their existence is nobody else's business.
    if p is None or not prescriptions.can_read(user, p):
        raise NotFound(_("This prescription does not exist."))
    return p, user


def verify_url(request: web.Request, p: prescriptions.Prescription) -> str:
    query = urlencode({"number": p.number, "code": p.check_code})
    path = str(request.app.router["rx_verify"].url_for())
    return f"{base_url(request.app[keys.SETTINGS], request)}{path}?{query}"


def _sheet_context(doc: dict[str, Any]) -> dict[str, Any]:
    """What the sheet template needs besides the document: the words for its codes."""
    lines = [rx_pdf.item_line(item) for item in doc.get("items", []) if isinstance(item, dict)]
    return {"labels": prescriptions.labels(), "lines": lines}


@aiohttp_jinja2.template("rx_print.html")
async def rx_view(request: web.Request) -> dict[str, Any]:
    p, user = await _readable(request)
    await prescriptions.record_access(
        request.app[keys.DB], p, user, security.client_address(request), "prescription.view"
    )
    url = verify_url(request, p)
    svg = await asyncio.to_thread(qr.svg, url, 4)
    key = await request.app[SIGNING_KEY].get()
    verdict = signing.verify(p.signed_file(), key.public)
    doc = p.document
    return {
        "rx": p,
        "doc": doc,
        "preview": False,
        "verified": verdict.valid,
        "status_label": _status_label(p.status),
        "verify_url": url,
        "qr_data_uri": "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii"),
        **_sheet_context(doc),
    }


async def rx_pdf_view(request: web.Request) -> web.Response:
    p, user = await _readable(request)
    await prescriptions.record_access(
        request.app[keys.DB], p, user, security.client_address(request), "prescription.pdf"
    )
    settings = request.app[keys.SETTINGS]
    issued_local = to_local(p.issued_at, settings.timezone).strftime("%Y-%m-%d %H:%M")
    body = await asyncio.to_thread(
        rx_pdf.render,
        p.document,
        issued_local=issued_local,
        verify_url=verify_url(request, p),
        check_code=p.check_code,
    )
    return web.Response(
        body=body,
        content_type="application/pdf",
        headers={
            "Content-Disposition": f'inline; filename="{p.number}.pdf"',
            "Cache-Control": "private, no-store",
        },
    )


async def rx_download(request: web.Request) -> web.Response:
    p, user = await _readable(request)
    await prescriptions.record_access(
        request.app[keys.DB], p, user, security.client_address(request), "prescription.download"
    )
    return web.Response(
        body=p.signed_bytes(),
        content_type="application/json",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{p.number}.json"',
            "Cache-Control": "private, no-store",
        },
    )


# -- pharmacist review ----------------------------------------------------------------------------


@aiohttp_jinja2.template("pharmacy.html")
async def pharmacy_page(request: web.Request) -> dict[str, Any]:
    user = security.require(request, "pharmacist")
    db = request.app[keys.DB]
    queue = await prescriptions.pending_review(db)
    done = await prescriptions.recently_reviewed(db)
    shown = [p.number for p in queue] + [p.number for p in done]
    await prescriptions.record_queue_view(db, user, security.client_address(request), shown)
    return {
        "queue": [(p, p.document, _sheet_context(p.document)) for p in queue],
        "done": [(p, p.document, _status_label(p.status)) for p in done],
        "review_on": request.app[keys.SETTINGS].pharmacist_review,
        "labels": prescriptions.labels(),
        "error": request.query.get("error", "")[:40],
    }


async def pharmacy_review(request: web.Request) -> web.Response:
    user = security.require(request, "pharmacist")
    form = await security.read_form(request)
    decision = form.get("decision")
    if decision not in ("approve", "return"):
        raise BadRequest(_("Choose approve or return."), code="bad_decision")
    await prescriptions.review(
        request.app[keys.DB],
        number=request.match_info["number"],
        pharmacist=user,
        approve=decision == "approve",
        reason=form.get("reason", ""),
        remote=security.client_address(request),
    )
    raise web.HTTPSeeOther(str(request.app.router["pharmacy"].url_for()))


# -- public verification --------------------------------------------------------------------------


def verdict_message(code: str) -> str:
    return {
        "valid": _("Valid: issued by this hospital and not changed since it was signed."),
        "not_json": _("Not valid: this is not a prescription file."),
        "too_large": _("Not valid: this is not a prescription file."),
        "bad_format": _("Not valid: the file is not a signed prescription."),
        "bad_signature": _("Not valid: the signature is damaged."),
        "other_key": _("Not valid: it was signed with a key that is not this hospital's."),
        "mismatch": _(
            "Not valid: the prescription was changed after it was signed, or this hospital did not sign it."
        ),
        "not_found": _("No prescription with this number and check code was issued here."),
        "empty": _("Paste the contents of the prescription file, or choose the file."),
        "pending": _("Not valid yet: this prescription is waiting for the pharmacist's review."),
        "returned": _("Not valid: the pharmacist returned this prescription to the doctor."),
    }.get(code, _("Not valid."))


async def _verify_context(request: web.Request) -> dict[str, Any]:
    key = await request.app[SIGNING_KEY].get()
    return {"key_id": key.key_id, "verdict": None, "doc": None, "reason": "", "pasted": ""}


@aiohttp_jinja2.template("rx_verify.html")
async def verify_page(request: web.Request) -> dict[str, Any]:
    ctx = await _verify_context(request)
    number, code = request.query.get("number", ""), request.query.get("code", "")
    if number and code:
        db = request.app[keys.DB]
        found = await prescriptions.find_checked(db, number[:40], code[:64])
        if found is None:
            ctx.update(verdict="not_found", message=verdict_message("not_found"))
        elif found.status != prescriptions.ISSUED:
            # Signed but not (yet) approved by the pharmacist: not valid for dispensing.
            ctx.update(verdict=found.status, message=verdict_message(found.status))
        else:
            key = await request.app[SIGNING_KEY].get()
            result = signing.verify(found.signed_file(), key.public)
            ctx.update(
                verdict=result.code,
                message=verdict_message(result.code),
                reason=result.reason,
                doc=result.document if result.valid else None,
                **(_sheet_context(result.document) if result.valid and result.document else {}),
            )
            # Someone holding the paper looked it up: the patient may ask who did. The entry is
            # built by hand because the reader is anonymous and is stored with actor_role NULL;
            # audit.record would store "system" (the server itself), which it is not.
            await db.execute_write_fn(
                lambda d: audit.append(
                    d,
                    audit.AuditEntry(
                        action="prescription.verify",
                        object_type="prescription",
                        object_id=found.number,
                        remote=security.client_address(request),
                        subject_user_id=found.patient_id,
                        detail={"via": "qr", "valid": result.valid},
                    ),
                )
            )
    return ctx


async def verify_submit(request: web.Request) -> web.Response:
    ctx = await _verify_context(request)
    form = await security.read_form(request)
    pasted = form.get("document")
    text = pasted if isinstance(pasted, str) else ""
    if not text.strip():
        ctx.update(verdict="empty", message=verdict_message("empty"))
        return aiohttp_jinja2.render_template("rx_verify.html", request, ctx, status=400)
    key = await request.app[SIGNING_KEY].get()
    result = signing.verify(text, key.public)
    ctx.update(
        verdict=result.code,
        message=verdict_message(result.code),
        reason=result.reason,
        # Only a valid document is shown back, and only what the file itself holds.
        doc=result.document if result.valid else None,
        **(_sheet_context(result.document) if result.valid and result.document else {}),
    )
    return aiohttp_jinja2.render_template("rx_verify.html", request, ctx, status=200)


async def verify_key(request: web.Request) -> web.Response:
    key = await request.app[SIGNING_KEY].get()
    return web.Response(
        body=key.public.pem,
        content_type="application/x-pem-file",
        headers={
            "Content-Disposition": 'attachment; filename="prescription-ed25519.pub.pem"',
            "X-Key-Id": key.key_id,
            "Cache-Control": "public, max-age=3600",
        },
    )
