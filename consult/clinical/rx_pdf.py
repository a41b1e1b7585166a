"""The prescription as a PDF (A5, one page): the sheet's fields and the verification QR code.

Drawn with reportlab and its built-in Adobe CID font STSong-Light, which every PDF reader ships
for Chinese: nothing is downloaded or embedded at run time and no system font is needed. The QR
code is drawn as vector squares from segno's matrix, so it stays sharp on any printer.
Blocking (a few ms of CPU): call ``render`` off the event loop (``asyncio.to_thread`` keeps the
request's language for the labels).
"""

from __future__ import annotations

import io
from typing import Any

import segno
from reportlab.lib.pagesizes import A5
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfgen import canvas

from consult.clinical import prescriptions as rx
from consult.core.i18n import _, pgettext

FONT = "STSong-Light"
_registered = False


def _font() -> str:
    global _registered
    if not _registered:
        pdfmetrics.registerFont(UnicodeCIDFont(FONT))
        _registered = True
    return FONT


def _wrap(text: str, width: float, size: float) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` (character by character: CJK has no spaces)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for ch in paragraph:
            if pdfmetrics.stringWidth(line + ch, FONT, size) > width and line:
                lines.append(line)
                line = ch
            else:
                line += ch
        lines.append(line)
    return lines


def item_line(item: dict[str, Any]) -> tuple[str, str]:
    """(drug and strength, how to take it) in the current language, for format 1 and 2 lines."""
    head = " ".join(x for x in (item.get("drug", ""), item.get("strength", "")) if x)
    if "route" in item:
        how = _(
            "%(dose)s %(unit)s each time, %(route)s, %(frequency)s, for %(days)s days; total %(qty)s %(qunit)s"  # noqa: E501
        ) % {
            "dose": item.get("dose", ""),
            "unit": item.get("dose_unit", ""),
            "route": rx.route_label(item.get("route", "")),
            "frequency": rx.frequency_label(item.get("frequency", "")),
            "days": item.get("days", ""),
            "qty": item.get("quantity", ""),
            "qunit": item.get("quantity_unit", ""),
        }
    else:
        how = " · ".join(
            str(item.get(k, "")) for k in ("dose", "frequency", "duration", "quantity") if item.get(k)
        )
    return head, how


def render(doc: dict[str, Any], *, issued_local: str, verify_url: str, check_code: str) -> bytes:
    font = _font()
    buf = io.BytesIO()
    width, height = A5
    margin = 12 * mm
    c = canvas.Canvas(buf, pagesize=A5, pageCompression=1)
    c.setTitle(f"{_('Prescription')} {doc.get('number', '')}")
    c.setAuthor(str(doc.get("hospital", {}).get("name", "")))
    text_width = width - 2 * margin
    y = height - margin

    c.setFont(font, 13)
    c.drawCentredString(width / 2, y - 4 * mm, str(doc.get("hospital", {}).get("name", "")))
    c.setFont(font, 16)
    c.drawCentredString(width / 2, y - 12 * mm, _("Outpatient prescription"))
    y -= 18 * mm
    c.setFont(font, 9)
    c.drawString(margin, y, f"{_('No.')} {doc.get('number', '')}")
    c.drawRightString(width - margin, y, f"{_('Date')} {issued_local}")
    y -= 3 * mm
    c.line(margin, y, width - margin, y)
    y -= 6 * mm

    patient = doc.get("patient", {}) or {}
    c.setFont(font, 10)
    facts = [
        (_("Name"), str(patient.get("name", ""))),
        (pgettext("person", "Sex"), rx.sex_label(str(patient.get("sex", ""))) if patient.get("sex") else ""),
        (_("Age"), _("%(n)s years") % {"n": patient["age"]} if "age" in patient else ""),
        (_("Department"), str((doc.get("department") or {}).get("name", ""))),
    ]
    x = margin
    for label, value in facts:
        piece = f"{label}: {value}"
        c.drawString(x, y, piece)
        x += max(pdfmetrics.stringWidth(piece, font, 10) + 6 * mm, text_width / 4)
    y -= 6 * mm
    for label, value in (
        (_("Clinical diagnosis"), doc.get("diagnosis")),
        (_("Allergies"), doc.get("allergies")),
    ):
        if value is None:
            continue
        for line in _wrap(f"{label}: {value}", text_width, 10):
            c.drawString(margin, y, line)
            y -= 5 * mm
    y -= 1 * mm
    c.line(margin, y, width - margin, y)
    y -= 8 * mm
    c.setFont(font, 16)
    c.drawString(margin, y, "Rp.")
    y -= 7 * mm

    for index, item in enumerate(doc.get("items", []) or [], start=1):
        head, how = item_line(item)
        c.setFont(font, 11)
        for line in _wrap(f"{index}. {head}", text_width, 11):
            c.drawString(margin, y, line)
            y -= 5 * mm
        c.setFont(font, 9)
        for line in _wrap(how, text_width - 5 * mm, 9):
            c.drawString(margin + 5 * mm, y, line)
            y -= 4.5 * mm
        if item.get("instructions"):
            for line in _wrap(str(item["instructions"]), text_width - 5 * mm, 9):
                c.drawString(margin + 5 * mm, y, line)
                y -= 4.5 * mm
        y -= 2 * mm

    # Footer: doctor, then the QR code and the check code, bottom of the page.
    qr_size = 30 * mm
    bottom = margin
    c.setFont(font, 10)
    doctor = str((doc.get("doctor") or {}).get("name", ""))
    c.line(margin, bottom + qr_size + 6 * mm, width - margin, bottom + qr_size + 6 * mm)
    c.drawString(margin, bottom + qr_size + 1 * mm, f"{_('Doctor')}: {doctor}")
    code = segno.make(verify_url, error="m", micro=False)
    matrix = code.matrix
    modules = len(matrix)
    cell = qr_size / (modules + 8)  # a quiet zone of four modules on each side
    x0 = width - margin - qr_size + 4 * cell
    y0 = bottom + qr_size - 4 * cell
    c.setFillColorRGB(0, 0, 0)
    for r, row in enumerate(matrix):
        for col, on in enumerate(row):
            if on:
                c.rect(x0 + col * cell, y0 - (r + 1) * cell, cell, cell, stroke=0, fill=1)
    c.setFont(font, 8)
    note_width = text_width - qr_size - 4 * mm
    ny = bottom + qr_size - 6 * mm
    for line in _wrap(_("Scan the code to check this prescription with the hospital."), note_width, 8):
        c.drawString(margin, ny, line)
        ny -= 4 * mm
    c.drawString(margin, ny, f"{_('Check code')}: {check_code}")
    ny -= 4 * mm
    for line in _wrap(verify_url, note_width, 7):
        c.setFont(font, 7)
        c.drawString(margin, ny, line)
        ny -= 3.5 * mm
    c.showPage()
    c.save()
    return buf.getvalue()
