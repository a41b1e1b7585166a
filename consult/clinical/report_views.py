"""Test reports over HTTP: streamed uploads, the panel's JSON list, confined serving, removal."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote, unquote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from consult.audit.reads import audit_read
from consult.clinical import pages, reports, uploads
from consult.core import keys, live, metrics, security
from consult.core.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from consult.core.i18n import _

log = logging.getLogger(__name__)
MB = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the one file


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/visits/{public_id}/reports", list_reports, name="report_list")
    r.add_post("/api/visits/{public_id}/reports", upload_report, name="report_upload")
    r.add_delete("/api/reports/{report_id:[0-9]{1,18}}", delete_report, name="report_delete")
    r.add_get("/reports/{report_id:[0-9]{1,18}}", view_report, name="report_view")
    r.add_get("/reports/{report_id:[0-9]{1,18}}/download", download_report, name="report_download")
    r.add_get("/api/reports/{report_id:[0-9]{1,18}}/pages", report_pages, name="report_pages")
    r.add_get("/reports/{report_id:[0-9]{1,18}}/pages/{page:[0-9]{1,3}}", report_page, name="report_page")
    r.add_get("/reports/{report_id:[0-9]{1,18}}/thumb", report_thumb, name="report_thumb")
    app[pages.RENDERER] = pages.Renderer()


def _limits(request: web.Request) -> tuple[int, int]:
    settings = request.app[keys.SETTINGS]
    return int(settings.upload_max_mb * MB), int(settings.visit_upload_max_mb * MB)


async def _visit(request: web.Request) -> dict:
    visit = await reports.visit_by_public_id(request.app[keys.DB], request.match_info["public_id"])
    if visit is None:
        raise NotFound(_("This visit does not exist."))
    return visit


def _report_json(request: web.Request, report: reports.Report, editable: bool) -> dict:
    rid = str(report.id)
    out = report.public()
    out["url"] = str(request.app.router["report_view"].url_for(report_id=rid))
    out["download_url"] = str(request.app.router["report_download"].url_for(report_id=rid))
    out["pages_url"] = str(request.app.router["report_pages"].url_for(report_id=rid))
    out["thumb_url"] = str(request.app.router["report_thumb"].url_for(report_id=rid))
    out["delete_url"] = str(request.app.router["report_delete"].url_for(report_id=rid)) if editable else None
    return out


async def list_reports(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit(request)
    db = request.app[keys.DB]
    if not await reports.may_read(db, user, visit):
        raise NotFound(_("This visit does not exist."))
    editable = reports.can_edit(user, visit, time.time())
    items = await reports.list_for_visit(db, visit["id"])
    max_file, max_visit = _limits(request)
    await audit_read(request, "report.list", "visit", visit["id"], visit["patient_id"])
    return web.json_response(
        {
            "reports": [_report_json(request, r, editable) for r in items],
            "can_edit": editable,
            "limits": {
                "file_bytes": max_file,
                "visit_bytes": max_visit,
                "used_bytes": sum(r.size for r in items),
                "max_files": reports.MAX_REPORTS_PER_VISIT,
            },
        }
    )


async def upload_report(request: web.Request) -> web.Response:
    user = security.require(request)
    visit = await _visit(request)
    reports.require_editable(user, visit, time.time())
    max_file, max_visit = _limits(request)
    if request.content_type != "multipart/form-data":
        raise BadRequest(_("Send the file as a form upload."), code="not_multipart")
    if request.content_length is not None and request.content_length > max_file + MULTIPART_OVERHEAD:
        # Refuse before reading a byte when the client announces a body that cannot fit.
        raise PayloadTooLarge(
            _("This file is larger than %(mb)s MB. Choose a smaller file or a lower-resolution photo.")
            % {"mb": reports._mb(max_file)},
            code="file_too_large",
        )
    reader = await request.multipart()
    while True:
        try:
            part = await reader.next()
        except (ValueError, HttpProcessingError):
            raise BadRequest(
                _("The upload was malformed. Choose the file again."), code="bad_multipart"
            ) from None
        if part is None:
            raise BadRequest(_("No file was received. Choose a file and try again."), code="no_file")
        if isinstance(part, BodyPartReader) and part.name == "file":
            break
        if isinstance(part, BodyPartReader):
            await part.release()  # small form fields before the file are skipped, not buffered
        else:
            raise UnsupportedMediaType(_("Send one file per request."), code="nested_multipart")
    report = await reports.add_report(
        request.app[keys.DB],
        request.app[keys.SETTINGS].files_dir,
        visit=visit,
        user=user,
        source=part,
        filename=_client_filename(part.filename),
        max_bytes=max_file,
        visit_max_bytes=max_visit,
        remote=security.client_address(request),
        in_flight=request.app[uploads.IN_FLIGHT],
    )
    metrics.count(request.app, "uploads")
    live.publish(request.app, live.board_topic(visit["doctor_id"]))  # the board's report count
    return web.json_response({"report": _report_json(request, report, True)}, status=201)


def _client_filename(raw: str | None) -> str | None:
    # Browsers send UTF-8 names raw; some clients (aiohttp among them) percent-encode them.
    if raw and "%" in raw:
        try:
            return unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return raw
    return raw


async def _load(request: web.Request) -> tuple[reports.Report, dict]:
    user = security.require(request)
    found = await reports.get_with_visit(request.app[keys.DB], int(request.match_info["report_id"]))
    # 404 rather than 403: a stranger learns nothing about which report ids exist.
    if found is None or not await reports.may_read(request.app[keys.DB], user, found[1]):
        raise NotFound(_("This report does not exist."))
    return found


async def delete_report(request: web.Request) -> web.Response:
    user = security.require(request)
    report, visit = await _load(request)
    reports.require_editable(user, visit, time.time())
    await reports.delete_report(
        request.app[keys.DB],
        request.app[keys.SETTINGS].files_dir,
        report,
        visit,
        user,
        security.client_address(request),
        in_flight=request.app[uploads.IN_FLIGHT],
    )
    live.publish(request.app, live.board_topic(visit["doctor_id"]))
    return web.json_response({"deleted": report.id})


def content_disposition(kind: str, filename: str) -> str:
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in filename)
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def _serve(request: web.Request, download: bool) -> web.StreamResponse:
    user = security.require(request)
    report, visit = await _load(request)
    data_dir = request.app[keys.SETTINGS].files_dir
    try:
        path = uploads.stored_path(data_dir, report.stored_name)
    except ValueError:
        raise NotFound(_("This report does not exist.")) from None
    if not path.is_file():
        raise NotFound(_("This report's file is missing. Ask the patient to upload it again."))
    range_header = request.headers.get("Range", "")
    if not range_header or range_header.replace(" ", "").startswith("bytes=0-"):
        # One entry per opening: a PDF viewer's follow-up range requests are the same reading.
        await reports.record_view(
            request.app[keys.DB], report, visit, user, security.client_address(request), download
        )
    inline = _inline(request, user, download, report.content_type)
    headers = {
        "Content-Type": report.content_type,
        "Content-Disposition": content_disposition("inline" if inline else "attachment", report.display_name),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, no-store",
        # An opaque origin: a hostile PDF or image document cannot script this site.
        "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
        if report.content_type != "application/pdf"
        else "sandbox",
        "X-Frame-Options": "SAMEORIGIN",
    }
    return web.FileResponse(path, headers=headers)


INERT_TYPES = frozenset({"image/jpeg", "image/png"})  # what uploads store images as: no active content


def _inline(request: web.Request, user, download: bool, content_type: str) -> bool:
    """Staff open a patient's PDF inline only in the consult room's viewer (an iframe, which
    Sec-Fetch-Dest names and no page can forge); a PDF link opened in a tab downloads it, so a
    PDF is never rendered by the browser at the top of a doctor's window. A photo (JPEG or PNG,
    checked by content at upload, served with nosniff and a sandbox CSP) is inert and opens
    inline. A patient's own files open as before."""
    if download:
        return False
    if user.role == "patient" or content_type in INERT_TYPES:
        return True
    return request.headers.get("Sec-Fetch-Dest") == "iframe"


async def view_report(request: web.Request) -> web.StreamResponse:
    return await _serve(request, download=False)


async def download_report(request: web.Request) -> web.StreamResponse:
    return await _serve(request, download=True)


# -- the consult room's viewer: every report as pages of pixels ------------------------------


async def _page_set(request: web.Request, report: reports.Report) -> pages.PageSet:
    settings = request.app[keys.SETTINGS]
    try:
        return await pages.pdf_pages(request.app[pages.RENDERER], settings.files_dir, report.stored_name)
    except ValueError:
        raise NotFound(_("This report does not exist.")) from None


async def report_pages(request: web.Request) -> web.Response:
    """What the viewer shows of one report: a photo is one page (the file itself), a PDF its
    pages rendered on the server. Refusals (a PDF that cannot be shown) come back translated."""
    report, _visit_row = await _load(request)
    rid = str(report.id)
    router = request.app.router
    if report.content_type == uploads.PDF:
        found = await _page_set(request, report)
        items = [
            {
                "url": str(router["report_page"].url_for(report_id=rid, page=str(n))),
                "width": w,
                "height": h,
            }
            for n, (w, h) in enumerate(found.sizes, start=1)
        ]
        kind = "pdf"
    else:
        items = [{"url": str(router["report_view"].url_for(report_id=rid)), "width": None, "height": None}]
        kind = "image"
    return web.json_response(
        {
            # No file name: what the viewer asks for here is pixels; the list (audited) names it.
            "id": report.id,
            "kind": kind,
            "pages": items,
            "download_url": str(router["report_download"].url_for(report_id=rid)),
        },
        headers={"Cache-Control": "private, no-store"},
    )


async def report_page(request: web.Request) -> web.StreamResponse:
    """One rendered page of a PDF report, to whoever may read the report, audited like the report."""
    user = security.require(request)
    report, visit = await _load(request)
    if report.content_type != uploads.PDF:
        raise NotFound(_("This page does not exist."))
    found = await _page_set(request, report)
    data_dir = request.app[keys.SETTINGS].files_dir
    path = pages.page_path(data_dir, report.stored_name, int(request.match_info["page"]), found.count)
    if not path.is_file():
        raise NotFound(_("This page does not exist."))
    await reports.record_view(
        request.app[keys.DB],
        report,
        visit,
        user,
        security.client_address(request),
        False,
        page=int(request.match_info["page"]),
    )
    return _png(path)


PNG_HEADERS = {
    "Content-Type": "image/png",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "private, no-store",
    "Content-Security-Policy": "sandbox; default-src 'none'",
}


def _png(path) -> web.FileResponse:
    return web.FileResponse(path, headers=PNG_HEADERS)


async def report_thumb(request: web.Request) -> web.StreamResponse:
    """A small picture of a report for the viewer's strip, audited as a reading of the report."""
    user = security.require(request)
    report, visit = await _load(request)
    data_dir = request.app[keys.SETTINGS].files_dir
    try:
        path = await pages.thumbnail(
            request.app[pages.RENDERER], data_dir, report.stored_name, report.content_type
        )
    except ValueError:
        raise NotFound(_("This report does not exist.")) from None
    await reports.record_view(
        request.app[keys.DB], report, visit, user, security.client_address(request), False, thumbnail=True
    )
    return _png(path)
