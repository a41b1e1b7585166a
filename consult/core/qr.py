"""QR codes drawn on the server (no third-party service ever sees a call link)."""

from __future__ import annotations

import io

import segno


def svg(text: str, scale: int = 5) -> bytes:
    code = segno.make(text, error="m", micro=False)
    buf = io.BytesIO()
    code.save(buf, kind="svg", scale=scale, border=2, xmldecl=False, svgns=True, title="QR")
    return buf.getvalue()
