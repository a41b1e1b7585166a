"""A report as pages of pixels for the consult room's viewer.

A photo is one page (the stored file itself: already re-encoded, EXIF orientation applied at
upload). A PDF is rendered on the server, page by page, to PNG files, so the viewer shows both the
same way and the PDF's own content never reaches a browser. Rendering runs in a child process
(``pdf_worker.py``) under a memory, CPU and wall-clock limit, with bounded pages and pixels; the
pages are cached under ``<data_dir>/cache/report-pages/<the stored file's name>/`` and removed with
the report (and by the files sweep when their report is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from consult.clinical import uploads
from consult.core.errors import NotFound, UnsupportedMediaType
from consult.core.files import temp_name
from consult.core.i18n import _

log = logging.getLogger(__name__)

MAX_PAGES = 40
MAX_PAGE_PIXELS = 6_000_000  # an A4 page at 144 dpi is ~2 MP; a poster page is scaled down to this
MAX_PAGE_SIDE = 4000
WORKER_MEMORY = 1024 * 1024 * 1024
WORKER_CPU_S = 30
WORKER_WALL_S = 45.0
RENDER_MAX_BYTES = 200 * 1024 * 1024  # one PDF's pages together
CACHE_MAX_BYTES = 2 * 1024 * 1024 * 1024  # all rendered pages: least recently shown go first
WORKER = Path(__file__).with_name("pdf_worker.py")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PageSet:
    count: int
    sizes: list[tuple[int, int]]


@dataclass
class Renderer:
    """One render at a time in the whole process (the server's CPUs belong to the calls first);
    a request for pages already cached does not wait for it, and a second request for the same
    report finds the first one's pages once the lock is its turn."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


RENDERER = web.AppKey("report_page_renderer", Renderer)


THUMB_SIDE = 240


def cache_root(data_dir: Path) -> Path:
    return data_dir / "cache" / "report-pages"


def thumbs_root(data_dir: Path) -> Path:
    return data_dir / "cache" / "report-thumbs"


def thumb_path(data_dir: Path, stored_name: str) -> Path:
    if not uploads.STORED_NAME_RE.match(stored_name):
        raise ValueError("bad stored name")
    return thumbs_root(data_dir) / (stored_name.split("/", 1)[1] + ".png")


def cache_dir(data_dir: Path, stored_name: str) -> Path:
    if not uploads.STORED_NAME_RE.match(stored_name):
        raise ValueError("bad stored name")
    return cache_root(data_dir) / stored_name.split("/", 1)[1]


def page_path(data_dir: Path, stored_name: str, number: int, count: int) -> Path:
    if not 1 <= number <= count:
        raise NotFound(_("This page does not exist."))
    return cache_dir(data_dir, stored_name) / f"{number}.png"


def remove_cached(data_dir: Path, stored_name: str) -> None:
    with contextlib.suppress(ValueError):
        shutil.rmtree(cache_dir(data_dir, stored_name), ignore_errors=True)
    with contextlib.suppress(ValueError):
        uploads.remove_quietly(thumb_path(data_dir, stored_name))


def sweep_cache(data_dir: Path, live_stored_names: set[str], older_than: float) -> int:
    """Remove cached pages whose report is gone (a deletion that crashed before its cleanup, or
    that raced a render) and renders a crash cut short; only entries last changed before
    ``older_than``, so a render finishing now is left alone."""
    live = {name.split("/", 1)[1] for name in live_stored_names if "/" in name}
    removed = 0
    for root in (cache_root(data_dir), thumbs_root(data_dir)):
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            try:
                stale = entry.name.split(".")[0] not in live and entry.stat().st_mtime < older_than
            except OSError:
                continue
            if stale:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    uploads.remove_quietly(entry)
                removed += 1
    return removed


def _read_meta(directory: Path) -> PageSet | None:
    """The cached pages, or None; raises the cached refusal of a PDF the renderer refused."""
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if "refused" in meta:
            raise _refusal(str(meta["refused"]), int(meta.get("pages") or 0))
        found = PageSet(int(meta["pages"]), [tuple(s) for s in meta["sizes"]])
        os.utime(meta_path)  # recently shown: the last to go when the cache is pruned
        return found
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_cache(data_dir: Path, max_bytes: int, keep: str | None = None) -> int:
    """Keep the rendered pages under ``max_bytes`` in all: remove the least recently shown
    reports' pages (they are rendered again when next opened). Returns how many were removed."""
    root = cache_root(data_dir)
    if not root.is_dir():
        return 0
    entries = []
    total = 0
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        try:
            size = sum(f.stat().st_size for f in entry.iterdir())
            used = (entry / "meta.json").stat().st_mtime
        except OSError:
            continue
        entries.append((used, entry, size))
        total += size
    removed = 0
    for _used, entry, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if entry.name == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed += 1
    return removed


def _refusal(error: str, pages: int) -> UnsupportedMediaType:
    if error == "too_many_pages":
        return UnsupportedMediaType(
            _(
                "This PDF has %(n)s pages; the viewer shows PDFs of up to %(max)s pages."
                " Download it to read it."
            )
            % {"n": pages, "max": MAX_PAGES},
            code="pdf_too_many_pages",
        )
    if error == "too_large":
        return UnsupportedMediaType(
            _("The pages of this PDF are too large to show here. Download it to read it."),
            code="pdf_too_large",
        )
    if error == "page_size":
        return UnsupportedMediaType(
            _("A page of this PDF has an impossible size. Download it to read it."), code="pdf_page_size"
        )
    return UnsupportedMediaType(
        _("This PDF could not be read. Ask the patient to upload it again, or download it."),
        code="pdf_unreadable",
    )


async def _run_worker(source: Path, out_dir: Path) -> dict:
    limits = (MAX_PAGES, MAX_PAGE_PIXELS, MAX_PAGE_SIDE, WORKER_MEMORY, WORKER_CPU_S, RENDER_MAX_BYTES)
    args = [str(a) for a in limits]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        str(WORKER),
        str(source),
        str(out_dir),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), WORKER_WALL_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("PDF renderer timed out after %s s on %s", WORKER_WALL_S, source.name)
        return {"ok": False, "error": "unreadable", "pages": 0}
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        tail = err[-500:].decode(errors="replace")
        log.warning("PDF renderer exited %s on %s: %s", proc.returncode, source.name, tail)
        return {"ok": False, "error": "unreadable", "pages": 0}
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": "unreadable", "pages": 0}
    # A refusal the worker answered is kept (asking again gives the same); a crash or a timeout,
    # which a busy machine can cause, is not.
    return {**answer, "answered": True} if isinstance(answer, dict) else {"ok": False, "error": "unreadable"}


async def pdf_pages(renderer: Renderer, data_dir: Path, stored_name: str) -> PageSet:
    """The PDF's pages, rendered now or earlier; a clear ``UnsupportedMediaType`` when it cannot be."""
    target = cache_dir(data_dir, stored_name)
    cached = await asyncio.to_thread(_read_meta, target)
    if cached is not None:
        return cached
    async with renderer.lock:
        cached = await asyncio.to_thread(_read_meta, target)
        if cached is not None:
            return cached
        source = uploads.stored_path(data_dir, stored_name)
        if not await asyncio.to_thread(source.is_file):
            raise NotFound(_("This report's file is missing. Ask the patient to upload it again."))
        root = cache_root(data_dir)
        await asyncio.to_thread(lambda: root.mkdir(mode=0o700, parents=True, exist_ok=True))
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".render-", dir=root))
        try:
            result = await _run_worker(source, work)

            def publish(meta: dict) -> None:
                for p in work.iterdir():
                    if "refused" in meta:
                        p.unlink()  # what a refused render wrote before it stopped
                (work / "meta.json").write_text(json.dumps(meta))
                for p in work.iterdir():
                    os.chmod(p, 0o600)
                shutil.rmtree(target, ignore_errors=True)
                try:
                    work.rename(target)  # whole or not at all: meta.json is there only with every page
                except OSError:
                    # Another node (over a shared directory) published the same pages meanwhile.
                    if not (target / "meta.json").is_file():
                        raise

            if not result.get("ok"):
                error, count = str(result.get("error")), int(result.get("pages") or 0)
                if result.get("answered"):  # the worker's own verdict on the file: it will not change
                    await asyncio.to_thread(publish, {"refused": error, "pages": count})
                raise _refusal(error, count)
            pages = PageSet(int(result["pages"]), [tuple(s) for s in result["sizes"]])
            await asyncio.to_thread(publish, {"pages": pages.count, "sizes": pages.sizes})
            await asyncio.to_thread(prune_cache, data_dir, CACHE_MAX_BYTES, target.name)
            return pages
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)


def _make_thumb(source: Path, target: Path) -> None:
    from PIL import Image

    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = temp_name(target)  # never another node's (a pid is not unique across nodes)
    try:
        with Image.open(source) as im:
            im.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG: decode at a fraction of the size
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            im.convert("RGB").save(work, "PNG")
        os.chmod(work, 0o600)
        os.replace(work, target)
    finally:
        uploads.remove_quietly(work)


async def thumbnail(renderer: Renderer, data_dir: Path, stored_name: str, content_type: str) -> Path:
    """A small picture of the report (a PDF's first page) for the viewer's strip, cached."""
    target = thumb_path(data_dir, stored_name)
    if await asyncio.to_thread(target.is_file):
        return target
    if content_type == uploads.PDF:
        await pdf_pages(renderer, data_dir, stored_name)
        source = cache_dir(data_dir, stored_name) / "1.png"
    else:
        source = uploads.stored_path(data_dir, stored_name)
    if not await asyncio.to_thread(source.is_file):
        raise NotFound(_("This report's file is missing. Ask the patient to upload it again."))
    await asyncio.to_thread(_make_thumb, source, target)
    return target
