"""Receiving untrusted files: streamed to private temp files, typed by content, cleaned, stored.

Nothing the client says about a file is trusted: not its name, not its declared type. The type
comes from the bytes (magic numbers, then a real parse); photos are decoded and re-encoded so no
EXIF (GPS, camera serial, time) survives; files live under server-chosen names with mode 0600
inside one confined root. Every function that creates a file removes it again when anything
after it fails, so an aborted or refused upload leaves nothing behind.

A crash can still leave files behind: temp files of uploads cut short, and a stored file whose
row was never written. ``InFlight`` names the files requests are working on right now, so that
the periodic sweep (``consult.clinical.reports.files_ctx``) removes or quarantines only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web

from consult.core.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from consult.core.files import fsync_dir, fsync_file
from consult.core.i18n import _

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
FLUSH_AT = 1024 * 1024  # write to disk in ~1 MiB batches, off the event loop
MAX_PIXELS = 60_000_000  # a phone photo is ~12-50 MP; more is a decompression bomb
MAX_DISPLAY_NAME = 120
STORED_NAME_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}$")

PDF = "application/pdf"
JPEG = "image/jpeg"
PNG = "image/png"
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif"}


class ChunkSource(Protocol):
    async def read_chunk(self, size: int = ...) -> bytes: ...


@dataclass
class Received:
    path: Path
    size: int


@dataclass
class Stored:
    stored_name: str  # "ab/<64 hex>", relative to the uploads root
    path: Path
    content_type: str
    size: int
    sha256: str


class InFlight:
    """The names of upload files a request is working on right now (in memory, per process):
    the token of an upload's temp files and the stored name it is given before its row exists,
    or that a deletion is removing. The sweep leaves these alone, whatever their age."""

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._lock = threading.Lock()  # the sweep asks from a worker thread

    @contextlib.contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        with self._lock:
            self._names.update(names)
        try:
            yield
        finally:
            with self._lock:
                self._names.difference_update(names)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._names


IN_FLIGHT = web.AppKey("uploads_in_flight", InFlight)


def new_token() -> str:
    """An upload's token: its temp files are ``<token>.part`` and ``<token>.clean``."""
    return secrets.token_hex(16)


def new_stored_name() -> str:
    name = secrets.token_hex(32)
    return f"{name[:2]}/{name}"


def uploads_root(data_dir: Path) -> Path:
    return data_dir / "uploads"


def tmp_dir(data_dir: Path) -> Path:
    return uploads_root(data_dir) / "tmp"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _create_exclusive(directory: Path, name: str) -> tuple[int, Path]:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    return fd, path


def remove_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sanitize_display_name(raw: str | None, fallback: str = "report") -> str:
    """Basename only; no control characters or path separators; at most 120 characters."""
    name = unicodedata.normalize("NFC", raw or "")
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = name.strip().strip(".").strip()
    if not name:
        name = fallback
    if len(name) > MAX_DISPLAY_NAME:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 8:
            name = stem[: MAX_DISPLAY_NAME - len(ext) - 1] + "." + ext
        else:
            name = name[:MAX_DISPLAY_NAME]
    return name


def display_name_for(raw: str | None, content_type: str) -> str:
    """The client's name, sanitised, with an extension that matches what we actually stored."""
    name = sanitize_display_name(raw)
    wanted = {PDF: (".pdf",), JPEG: (".jpg", ".jpeg"), PNG: (".png",)}[content_type]
    if name.lower().endswith(wanted):
        return name
    stem, dot, ext = name.rpartition(".")
    if dot and stem and ("." + ext.lower()) in (".pdf", ".jpg", ".jpeg", ".png", ".heic", ".heif"):
        name = stem  # a photo's .HEIC became a .jpg; a misnamed .pdf shows what it really is
    return sanitize_display_name(name[: MAX_DISPLAY_NAME - len(wanted[0])] + wanted[0])


async def receive(
    source: ChunkSource,
    data_dir: Path,
    *,
    max_bytes: int,
    budget_bytes: int,
    too_large: str,
    over_budget: str,
    token: str | None = None,
) -> Received:
    """Stream one part into a private temp file, refusing it as soon as it passes a limit.

    ``max_bytes`` is the per-file limit and ``budget_bytes`` what is left of the visit's total;
    the messages are the human explanations for each. On any failure (including the client
    going away and the task being cancelled) the temp file is removed before re-raising. The
    file is ``<token>.part``; hold the token in ``InFlight`` while the upload runs.
    """
    directory = await asyncio.to_thread(_private_dir, tmp_dir(data_dir))
    fd, path = await asyncio.to_thread(_create_exclusive, directory, (token or new_token()) + ".part")
    size = 0
    buffer = bytearray()
    ok = False
    try:
        with os.fdopen(fd, "wb") as fh:
            while True:
                chunk = await source.read_chunk(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(too_large, code="file_too_large")
                if size > budget_bytes:
                    raise PayloadTooLarge(over_budget, code="visit_quota")
                buffer += chunk
                if len(buffer) >= FLUSH_AT:
                    data, buffer = bytes(buffer), bytearray()
                    await asyncio.to_thread(fh.write, data)
            if buffer:
                await asyncio.to_thread(fh.write, bytes(buffer))
        if size == 0:
            raise BadRequest(_("The file is empty. Choose the file again."), code="empty_file")
        ok = True
        return Received(path, size)
    finally:
        if not ok:
            # Synchronous on purpose: a cancelled task must not leave the file behind.
            remove_quietly(path)


# -- content sniffing ----------------------------------------------------------------------


def sniff(head: bytes) -> str | None:
    """What the first bytes say the file is (to be confirmed by a parse)."""
    if head.startswith(b"%PDF-"):
        return PDF
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "image/heic"
    return None


def _unsupported() -> UnsupportedMediaType:
    return UnsupportedMediaType(
        _("This file is not a PDF, JPEG, PNG or HEIC photo. Upload a PDF or a photo of the report."),
        code="unsupported_type",
    )


def _damaged() -> UnsupportedMediaType:
    return UnsupportedMediaType(
        _("This file looks damaged and cannot be opened. Please export or photograph it again."),
        code="damaged_file",
    )


def _check_pdf(path: Path, size: int) -> None:
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 2048))
        tail = fh.read()
    # A PDF ends with "startxref <offset> %%EOF" (incremental updates append more of them).
    if b"%%EOF" not in tail or b"startxref" not in tail:
        raise _damaged()


# -- active content in PDFs ----------------------------------------------------------------
#
# A report is a document to read. Names that make a PDF *do* something when opened (run a
# script, launch a program, carry other files, play Flash, be an XFA form) are refused. Names
# can be written with #xx escapes (/J#61vaScript), so every name is decoded before it is
# compared. Dictionaries can hide inside compressed object streams (/ObjStm): those are inflated
# (FlateDecode only, within a size budget) and searched too; an object stream we cannot inflate
# (another filter, a predictor, encryption, a bomb) is refused rather than waved through, since
# what it hides cannot be known. Other streams (page contents, images, fonts) hold no
# dictionaries, so they are not inflated: that keeps the check fast and leaves pixel data alone.
#
# Stream bodies are binary: a two-letter name (/JS, /AA) turns up in random bytes about once in
# 16 million positions, so those two are looked for outside stream bodies only; every longer
# name is looked for everywhere. A JavaScript action also needs /S /JavaScript, so hiding its
# /JS key does not hide it.
PDF_ACTIVE_NAMES = frozenset(
    {"JavaScript", "JS", "OpenAction", "AA", "Launch", "EmbeddedFile", "EmbeddedFiles", "RichMedia", "XFA"}
)
_SHORT_NAMES = frozenset(n for n in PDF_ACTIVE_NAMES if len(n) <= 2)
PDF_INFLATE_BUDGET = 64 * 1024 * 1024  # bytes of object streams inflated per file
_PDF_NAME = re.compile(rb"/([^\x00\t\n\x0c\r ()<>\[\]{}/%]*)")
_PDF_STREAM = re.compile(rb">>\s*stream(?:\r\n|\n|\r)")
_PDF_ENDSTREAM = re.compile(rb"(?:\r\n|\n|\r)?endstream")
_PDF_HEX = re.compile(rb"#([0-9A-Fa-f]{2})")
# An OpenAction that is an explicit destination array ("open at page 1, fit width"; Word and
# Acrobat write it) does nothing active; anything else (an action dictionary, or a reference we
# would have to resolve) is refused.
_PDF_OPEN_AT_PAGE = re.compile(rb"\s*\[")
_PDF_FILTERS = frozenset(
    "FlateDecode Fl ASCIIHexDecode AHx ASCII85Decode A85 LZWDecode LZW RunLengthDecode RL Crypt"
    " JBIG2Decode DCTDecode DCT JPXDecode CCITTFaxDecode CCF".split()
)


def _pdf_names(data: bytes) -> list[tuple[str, int]]:
    """Every name token in ``data``, #xx escapes decoded, with the offset just after it."""
    out = []
    for m in _PDF_NAME.finditer(data):
        raw = m.group(1)
        if b"#" in raw:
            raw = _PDF_HEX.sub(lambda h: bytes([int(h.group(1), 16)]), raw)
        out.append((raw.decode("latin-1"), m.end()))
    return out


def _active_in(data: bytes, names: frozenset[str]) -> str | None:
    for name, end in _pdf_names(data):
        if name not in names:
            continue
        if name == "OpenAction" and _PDF_OPEN_AT_PAGE.match(data, end):
            continue
        return name
    return None


def _pdf_streams(data: bytes) -> list[tuple[int, int, bytes]]:
    """(body start, body end, the dictionary text before it) of every stream."""
    out = []
    for m in _PDF_STREAM.finditer(data):
        start = m.end()
        end_m = _PDF_ENDSTREAM.search(data, start)
        end = end_m.start() if end_m else len(data)
        head_from = data.rfind(b"obj", max(0, m.start() - 4096), m.start())
        out.append((start, end, data[head_from if head_from >= 0 else max(0, m.start() - 4096) : m.end()]))
    return out


def _inflate_object_stream(body: bytes, head: bytes, budget: int) -> bytes:
    names = {n for n, _end in _pdf_names(head)}
    filters = names & _PDF_FILTERS
    if not filters:
        return body
    if filters - {"FlateDecode", "Fl"} or "Predictor" in names:
        raise _pdf_uninspectable()
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(body, budget + 1)
    except zlib.error:
        raise _pdf_uninspectable() from None
    if len(text) > budget or inflater.unconsumed_tail:
        raise _pdf_uninspectable()
    return text


def _pdf_active() -> UnsupportedMediaType:
    return UnsupportedMediaType(
        _(
            "This PDF contains active content (scripts, automatic actions or attached files), which"
            " is not accepted. Print it to a new PDF, or upload a photo of the report."
        ),
        code="pdf_active_content",
    )


def _pdf_uninspectable() -> UnsupportedMediaType:
    return UnsupportedMediaType(
        _(
            "This PDF could not be checked for active content (it is encrypted or packed in an"
            " unusual way). Print it to a new PDF, or upload a photo of the report."
        ),
        code="pdf_uninspectable",
    )


def check_pdf_active_content(data: bytes) -> None:
    """Refuse a PDF that carries scripts, actions, attachments, RichMedia or XFA (see above)."""
    found = _active_in(data, PDF_ACTIVE_NAMES - _SHORT_NAMES)
    streams = _pdf_streams(data)
    if found is None:
        outside = bytearray(data)
        for start, end, _head in streams:
            outside[start:end] = b" " * (end - start)
        found = _active_in(bytes(outside), _SHORT_NAMES)
    budget = PDF_INFLATE_BUDGET
    for start, end, head in streams:
        if found is not None:
            break
        if "ObjStm" not in {n for n, _end in _pdf_names(head)}:
            continue
        text = _inflate_object_stream(data[start:end], head, budget)
        budget -= len(text)
        found = _active_in(text, PDF_ACTIVE_NAMES)
    if found is not None:
        log.info("refused a PDF upload: active content (/%s)", found)
        raise _pdf_active()


_heif_registered = False


def _register_heif() -> bool:
    global _heif_registered  # one-time registration of a decoder plugin, not application state
    if _heif_registered:
        return True
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    _heif_registered = True
    return True


def _clean_image(src: Path, kind: str, directory: Path) -> tuple[Path, str]:
    """Decode, verify, apply EXIF orientation, re-encode without metadata into a new temp file."""
    from PIL import Image, ImageOps

    if kind == "image/heic" and not _register_heif():
        raise _unsupported()
    try:
        with Image.open(src) as probe:
            if probe.width * probe.height > MAX_PIXELS:
                raise UnsupportedMediaType(
                    _("This image is too large (too many pixels). Take the photo at a lower resolution."),
                    code="too_many_pixels",
                )
            probe.verify()  # structure and checksums; the image must be reopened afterwards
        with Image.open(src) as im:
            im.load()
            fmt = im.format
            oriented = ImageOps.exif_transpose(im)
    except UnsupportedMediaType:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError):
        raise _damaged() from None
    expected = {JPEG: "JPEG", PNG: "PNG", "image/heic": ("HEIF", "AVIF")}[kind]
    if fmt not in (expected if isinstance(expected, tuple) else (expected,)):
        raise _damaged()
    icc = im.info.get("icc_profile")
    transparency = oriented.info.get("transparency")
    oriented.info = {}  # drop EXIF, XMP, text chunks, comments: only the pixels go on
    if transparency is not None and kind == PNG:
        oriented.info["transparency"] = transparency
    out_type = PNG if kind == PNG else JPEG
    fd, out = _create_exclusive(directory, src.stem + ".clean")  # the same upload token
    try:
        with os.fdopen(fd, "wb") as fh:
            if out_type == PNG:
                oriented.save(fh, format="PNG", optimize=False, icc_profile=icc)
            else:
                if oriented.mode not in ("RGB", "L", "CMYK"):
                    oriented = oriented.convert("RGB")
                oriented.save(fh, format="JPEG", quality=90, icc_profile=icc)
    except BaseException:
        remove_quietly(out)
        raise
    return out, out_type


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def store_sync(received: Received, data_dir: Path, stored_name: str | None = None) -> Stored:
    """Type the temp file by content, clean it, move it into place. Blocking: run in a thread.

    The temp file is consumed (moved or removed) whatever happens. ``stored_name`` (from
    ``new_stored_name``) lets the caller hold the name in ``InFlight`` before the file exists.
    """
    cleaned: Path | None = None
    try:
        with open(received.path, "rb") as fh:
            head = fh.read(64)
        kind = sniff(head)
        if kind is None:
            raise _unsupported()
        if kind == PDF:
            _check_pdf(received.path, received.size)
            check_pdf_active_content(received.path.read_bytes())
            final_src, content_type = received.path, PDF
        else:
            cleaned, content_type = _clean_image(received.path, kind, received.path.parent)
            final_src = cleaned
        sha, size = _sha256(final_src)
        stored_name = stored_name or new_stored_name()
        if not STORED_NAME_RE.match(stored_name):
            raise ValueError("invalid stored name")
        prefix, name = stored_name.split("/")
        target_dir = _private_dir(uploads_root(data_dir) / prefix)
        target = target_dir / name
        fsync_file(final_src)  # the bytes are on disk (or the NFS server) before the name
        # link() fails if the name exists, unlike rename(): never overwrite another report,
        # whichever node wrote it. The temp file is in the same file system (uploads/tmp).
        os.link(final_src, target)
        os.chmod(target, 0o600)
        fsync_dir(target_dir)
        return Stored(stored_name, target, content_type, size, sha)
    finally:
        remove_quietly(received.path)
        remove_quietly(cleaned)


def sweep_tmp(data_dir: Path, older_than: float = 3600.0, in_flight: InFlight | None = None) -> int:
    """Remove temp files no upload is using: not held in ``in_flight`` and not written to for
    ``older_than`` seconds (the grace also covers an upload of another process). Blocking."""
    directory = tmp_dir(data_dir)
    if not directory.exists():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    for path in directory.iterdir():
        if in_flight is not None and path.name.partition(".")[0] in in_flight:
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


def stored_files(data_dir: Path) -> dict[str, float]:
    """Every stored report file on disk: stored name -> last modification time. Blocking."""
    root = uploads_root(data_dir)
    found: dict[str, float] = {}
    if not root.is_dir():
        return found
    for sub in root.iterdir():
        if len(sub.name) != 2 or not sub.is_dir() or sub.is_symlink():
            continue
        for path in sub.iterdir():
            name = f"{sub.name}/{path.name}"
            if STORED_NAME_RE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    found[name] = path.lstat().st_mtime
    return found


def quarantine_dir(data_dir: Path) -> Path:
    return data_dir / "quarantine" / "uploads"


def quarantine(data_dir: Path, stored_name: str) -> Path | None:
    """Move a stored file out of the uploads root into the quarantine folder (never deleted: a
    person decides). None if it is gone already. Blocking."""
    if not STORED_NAME_RE.match(stored_name):
        raise ValueError("invalid stored name")
    source = uploads_root(data_dir) / stored_name  # the entry itself, never what it points to
    directory = _private_dir(quarantine_dir(data_dir))
    target = directory / stored_name.replace("/", "-")
    if target.exists():
        target = directory / f"{target.name}-{secrets.token_hex(4)}"
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return None
    return target


def stored_path(data_dir: Path, stored_name: str) -> Path:
    """The file for a row's stored name, confined to the uploads root."""
    if not STORED_NAME_RE.match(stored_name):
        raise ValueError("invalid stored name")
    root = uploads_root(data_dir).resolve()
    path = (root / stored_name).resolve()
    if root not in path.parents:
        raise ValueError("stored name escapes the uploads root")
    return path
