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
from consult.clinical import notes, prescriptions, signing
from consult.clinical.reports import visit_by_public_id
from consult.clinical.signing import SIGNING_KEY
from consult.core import keys, qr, security
from consult.core.errors import BadRequest, NotFound, UnsupportedMediaType
from consult.core.i18n import _

NUMBER = r"{number:RX-[0-9]{4}-[0-9]{6,}}"


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/visits/{public_id}/notes", notes_get, name="visit_notes")
    r.add_put("/api/visits/{public_id}/notes", notes_put)
    r.add_get("/api/visits/{public_id}/prescriptions", rx_list, name="rx_list")
    r.add_post("/api/visits/{public_id}/prescriptions", rx_issue, name="rx_issue")
    r.add_get(f"/prescriptions/{NUMBER}.json", rx_download, name="rx_download")
    r.add_get(f"/prescriptions/{NUMBER}", rx_view, name="rx_view")
    r.add_get("/verify", verify_page, name="rx_verify")
    r.add_post("/verify", verify_submit)
    r.add_get("/verify/key", verify_key, name="rx_verify_key")


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
        return await request.json()
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested past Python's stack
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


def _rx_json(request: web.Request, p: prescriptions.Prescription) -> dict[str, Any]:
    doc = p.document
    router = request.app.router
    return {
        "number": p.number,
        "issued_at": doc["issued_at"],
        "doctor_name": doc["doctor"]["name"],
        "items": doc["items"],
        "url": str(router["rx_view"].url_for(number=p.number)),
        "download_url": str(router["rx_download"].url_for(number=p.number)),
    }


async def rx_list(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit(request)
    if not prescriptions.can_read_visit(user, visit):
        raise NotFound(_("This visit does not exist."))
    db = request.app[keys.DB]
    items = await prescriptions.list_for_visit(db, visit["id"])
    return web.json_response(
        {
            "prescriptions": [_rx_json(request, p) for p in items],
            "advice": await notes.advice_for_visit(db, visit["id"]),
            "can_issue": user.role == "doctor"
            and user.id == visit["doctor_id"]
            and visit["status"] in prescriptions.ISSUABLE_STATUSES,
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
            raw_items=body.get("items"),
            hospital_name=settings.hospital_name,
            tz=settings.timezone,
            client_ref=body.get("client_ref"),
            remote=security.client_address(request),
        )
    except prescriptions.InvalidPrescription as exc:
        return web.json_response(
            {"error": exc.code, "message": exc.message, "errors": exc.errors}, status=exc.status
        )
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


@aiohttp_jinja2.template("rx_print.html")
async def rx_view(request: web.Request) -> dict[str, Any]:
    p, user = await _readable(request)
    await prescriptions.record_access(
        request.app[keys.DB], p, user, security.client_address(request), "prescription.view"
    )
    url = verify_url(request, p)
    svg = await asyncio.to_thread(qr.svg, url, 4)
    return {
        "rx": p,
        "doc": p.document,
        "verify_url": url,
        "qr_data_uri": "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii"),
    }


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
        else:
            key = await request.app[SIGNING_KEY].get()
            result = signing.verify(found.signed_file(), key.public)
            ctx.update(
                verdict=result.code,
                message=verdict_message(result.code),
                reason=result.reason,
                doc=result.document if result.valid else None,
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
