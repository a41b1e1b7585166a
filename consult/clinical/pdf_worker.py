"""Render one PDF's pages to PNG files: run as its own process, never imported by the server.

    python -I pdf_worker.py SOURCE OUT_DIR MAX_PAGES MAX_PIXELS MAX_SIDE MEMORY_BYTES CPU_SECONDS MAX_BYTES

A patient's PDF is hostile input to a C library (PDFium), so it is opened only here, in a child
process that limits its own address space and CPU time before reading a byte of it, and that
imports nothing of the application. The parent (``consult.clinical.pages``) adds a wall-clock
timeout and treats any death of this process as "could not be read".

Prints one JSON line: ``{"ok": true, "pages": N, "sizes": [[w, h], ...]}`` or
``{"ok": false, "error": "too_many_pages" | "unreadable" | "page_size" | "too_large", "pages": N}``
(``too_large``: the PNGs together would pass MAX_BYTES).
"""

from __future__ import annotations

import json
import os
import resource
import sys


def _limit(memory_bytes: int, cpu_seconds: int, max_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))  # no one file passes the budget
    os.nice(5)


def _scale(width_pt: float, height_pt: float, max_pixels: int, max_side: int) -> float:
    """2x (144 dpi: small print stays readable when zoomed), less when that would pass the bounds."""
    scale = 2.0
    scale = min(scale, max_side / max(width_pt, height_pt))
    scale = min(scale, 0.995 * (max_pixels / (width_pt * height_pt)) ** 0.5)  # 0.995: rounding up
    return scale


def main(argv: list[str]) -> int:
    source, out_dir = argv[1], argv[2]
    max_pages, max_pixels, max_side, memory, cpu, max_bytes = (int(a) for a in argv[3:9])
    _limit(memory, cpu, max_bytes)

    import pypdfium2 as pdfium  # after the limits: its own allocations count too

    def answer(**fields: object) -> int:
        sys.stdout.write(json.dumps(fields) + "\n")
        return 0

    try:
        doc = pdfium.PdfDocument(source)
    except Exception:  # PdfiumError, or anything a broken file makes it raise
        return answer(ok=False, error="unreadable", pages=0)
    count = len(doc)
    if count < 1:
        return answer(ok=False, error="unreadable", pages=0)
    if count > max_pages:
        return answer(ok=False, error="too_many_pages", pages=count)
    sizes = []
    written = 0
    for index in range(count):
        try:
            page = doc[index]
            width, height = page.get_size()
        except Exception:
            return answer(ok=False, error="unreadable", pages=count)
        if not (1 <= width <= 20_000 and 1 <= height <= 20_000):
            return answer(ok=False, error="page_size", pages=count)
        scale = _scale(width, height, max_pixels, max_side)
        if round(width * scale) < 1 or round(height * scale) < 1:
            return answer(ok=False, error="page_size", pages=count)
        try:
            image = page.render(scale=scale, may_draw_forms=False).to_pil()
        except Exception:
            return answer(ok=False, error="unreadable", pages=count)
        path = os.path.join(out_dir, f"{index + 1}.png")
        image.save(path, "PNG", optimize=False)
        written += os.path.getsize(path)
        if written > max_bytes:
            return answer(ok=False, error="too_large", pages=count)
        sizes.append(list(image.size))
        page.close()
    doc.close()
    return answer(ok=True, pages=count, sizes=sizes)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
