"""Jinja2 pages: the environment, the context every page (error pages included) gets, and the
static files the pages load (versioned, cached for a year, sent gzipped)."""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import mimetypes
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup

import web as web_assets
from consult.core import formatting, i18n, keys, security
from consult.core.config import Settings

WEB_DIR = Path(web_assets.__file__).parent
# The reader's large-text switch (set by accounts/views.set_text_size): "large" or absent. Read
# here so that every page is written large from the start, with no script and no flash.
TEXT_SIZE_COOKIE = "consult_text"


def template_context(request: web.Request) -> dict:
    user = request.get(keys.USER)
    return {
        "request": request,
        "user": user,
        "csrf_token": security.csrf_token(request),
        "locale": request.get(keys.LOCALE, "en"),
        "locale_names": i18n.LOCALE_NAMES,
        "large_text": request.cookies.get(TEXT_SIZE_COOKIE) == "large",
        "settings": request.app[keys.SETTINGS],
    }


@functools.lru_cache(maxsize=4096)  # template strings are few; a bound in case one is not
def _translated_markup(locale: str, message: str) -> Markup:
    return Markup(i18n.catalogue_gettext(locale, message))  # noqa: S704 - the catalogue is ours


@functools.lru_cache(maxsize=4096)
def _translated_text(locale: str, message: str) -> Markup:
    return _translated_markup(locale, message) % {}


def template_gettext(message: str, /, **variables: Any) -> Markup:
    """What Jinja's newstyle gettext gives in an autoescaped template, `_("...")` on every page:
    the translation as Markup, always %-formatted (with the variables, escaped), made once per
    locale and message rather than through three context calls each time."""
    locale = i18n.get_locale()
    if variables:
        return _translated_markup(locale, message) % variables
    return _translated_text(locale, message)


async def _template_processor(request: web.Request) -> dict:
    return template_context(request)


def setup_templates(app: web.Application, settings: Settings) -> None:
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(WEB_DIR / "templates")),
        # A template edited while the server runs is read again (a stat of its file per render)
        # only in demo mode, where people try changes; a hospital's server gets new templates
        # with an upgrade, which restarts it.
        auto_reload=settings.demo,
        autoescape=jinja2.select_autoescape(default=True),
        extensions=["jinja2.ext.i18n"],
        # template_context gives `request` itself (aiohttp_jinja2.request_processor would again).
        context_processors=[_template_processor],
    )
    # pgettext/npgettext and {% trans "context" %}: one English word, two meanings (Jinja 3.1+).
    env.install_gettext_callables(  # type: ignore[attr-defined]
        i18n.gettext, i18n.ngettext, newstyle=True, pgettext=i18n.pgettext, npgettext=i18n.npgettext
    )
    # `_()` and `{% trans %}` without Jinja's three-deep call per message: the same result (every
    # template is autoescaped, so newstyle gettext always gives Markup(translation) % variables).
    env.globals["_"] = env.globals["gettext"] = template_gettext
    env.filters.update(formatting.filters(settings))
    env.globals["static"] = _static_url  # instead of aiohttp_jinja2's: versioned URLs
    env.globals["url"] = _url
    env.globals["static_inline"] = _static_inline


def compile_templates(app: web.Application) -> int:
    """Compile every page's template now; returns how many.

    Jinja compiles a template the first time it is rendered, 5-25 ms each (65 in 0.55 s): after
    a restart the first patient or admin to open each page waited for it, and everyone else the
    event loop served meanwhile. ``consult serve`` calls this before it listens; outside demo mode
    (no auto-reload) the compiled templates are then kept for the server's life. A template that
    does not compile stops the start (with Jinja's error) instead of failing its page later.
    """
    env = aiohttp_jinja2.get_env(app)
    names = env.list_templates(extensions=["html"])
    for name in names:
        env.get_template(name)
    return len(names)


# -- static files -------------------------------------------------------------------------------

STATIC_DIR = WEB_DIR / "static"
STATIC_PREFIX = "/static/"
# A versioned URL (`?v=` the content's hash) never changes meaning: cache it for a year.
IMMUTABLE = "public, max-age=31536000, immutable"
# Any other static URL: the browser may keep it but asks again (ETag / Last-Modified) each time.
REVALIDATE = "no-cache"
# Text worth compressing; images and fonts are compressed already.
COMPRESSIBLE = frozenset({".js", ".css", ".svg", ".json", ".txt", ".html", ".map"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")

# Bundles: one URL for several files of web/static, joined in this order (no build step: the
# server joins them itself, and they are versioned, cached and gzipped like any other file).
# The patient's call page is opened from a link on a phone, cold: over HTTP/1.1 each request
# beyond the connection the page came on costs a TLS handshake or waits for a free connection,
# so the page loads one stylesheet and one script instead of 3 and 8 (bench/join.py).
# A bundle's parts keep their own URLs for the pages that load them one by one.
_CALL_PATIENT_JS = (
    "signaling-client.js",
    "call-media.js",
    "call-boot.js",  # opens the socket before the parts below have even run
    "call-peer.js",
    "call-chat.js",
    "call.js",
    "late-notice.js",
)
BUNDLES: dict[str, tuple[str, ...]] = {
    "bundle/call.css": ("app.css", "legible.css", "call.css"),
    "bundle/call-patient.js": _CALL_PATIENT_JS,
    # A visit that may be recorded: its page also asks for consent (call-recording.js, before
    # call.js, which looks for it).
    "bundle/call-patient-recording.js": (*_CALL_PATIENT_JS[:4], "call-recording.js", *_CALL_PATIENT_JS[4:]),
}


@dataclass(frozen=True)
class StaticAsset:
    name: str  # relative to web/static, with "/"
    stat_key: tuple  # the source's (mtime_ns, size, inode) when hashed; a bundle's: each part's
    version: str  # the first 16 hex digits of the content's sha256


class StaticFiles:
    """web/static as the browser gets it: versioned URLs, long caching, precompressed copies.

    The sources are never touched. Each file served is first copied into the cache directory
    (`<data-dir>/cache/static/<version>/<name>`, written once per content version), with a
    `.gz` sibling when compressing saves bytes; aiohttp's FileResponse sends the sibling to
    a client that accepts gzip (with `Content-Encoding` and `Vary: Accept-Encoding`).

    A file's version is the hash of its content. With ``watch`` (demo mode, and the default) it
    is recomputed whenever the source's mtime, size or inode changes (one stat per use), so an
    edited file gets a new URL and a new cached copy at once, even while the server runs;
    nothing has to be built or cleared by hand. Without it (production: files change only with
    an upgrade, which restarts the server) a file's version is found once and kept.
    """

    def __init__(
        self,
        source: Path,
        cache: Path,
        bundles: dict[str, tuple[str, ...]] | None = None,
        *,
        watch: bool = True,
    ) -> None:
        self.source = source
        self.watch = watch
        self.cache = cache
        self.bundles = BUNDLES if bundles is None else bundles
        self._assets: dict[str, StaticAsset] = {}
        self._source = str(source)  # joined with a name by os.path, cheaper than pathlib's /
        self._inline: dict[str, tuple[str, str]] = {}

    def _stat_key(self, name: str) -> tuple | None:
        """The source's (mtime_ns, size, inode); a bundle's: its parts'. None: no such file."""
        parts = self.bundles.get(name)
        if parts is not None:
            keys_ = [self._stat_key(part) for part in parts]
            return None if None in keys_ else tuple(keys_)
        try:
            st = os.stat(os.path.join(self._source, name))
        except OSError:  # missing, or a name the OS refuses
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self, name: str) -> bytes:
        """The file's content; a bundle's is its parts, in order, each after a comment naming it."""
        parts = self.bundles.get(name)
        if parts is None:
            return (self.source / name).read_bytes()
        out = []
        for part in parts:
            data = (self.source / part).read_bytes()
            # A newline (and, between scripts, a semicolon) so that one part's last line cannot
            # run into the next part's first.
            out += [f"/* {part} */\n".encode(), data, b"\n"]
            if part.endswith(".js"):
                out.append(b";\n")
        return b"".join(out)

    def asset(self, name: str) -> StaticAsset | None:
        """The current version of web/static/`name` (or of the bundle `name`), or None when
        there is no such file."""
        known = self._assets.get(name)
        if known is None:  # a name found before was checked then
            if len(name) > 255 or not _NAME_RE.match(name):  # no "..", no hidden files
                return None
        elif not self.watch:
            return known
        key = self._stat_key(name)
        if key is None:
            return None
        known = self._assets.get(name)
        if known is not None and known.stat_key == key:
            return known
        try:
            data = self.read(name)
        except OSError:
            return None
        asset = StaticAsset(name, key, _version(data))
        self._assets[name] = asset  # only names of files that exist: as many as web/static holds
        return asset

    def url(self, name: str) -> str:
        """`/static/<name>?v=<version>`; a name that is not a static file is a bug: it raises."""
        asset = self.asset(name)
        if asset is None:
            raise LookupError(f"no static file {name!r} in {self.source}")
        return f"{STATIC_PREFIX}{name}?v={asset.version}"

    def data_uri(self, name: str) -> str:
        """The file as a base64 `data:` URI (for the icon: no request, so never fetched twice)."""
        asset = self.asset(name)
        if asset is None:
            raise LookupError(f"no static file {name!r} in {self.source}")
        cached = self._inline.get(name)
        if cached is None or cached[0] != asset.version:
            data = self.read(name)
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            cached = (asset.version, f"data:{kind};base64,{base64.b64encode(data).decode()}")
            self._inline[name] = cached
        return cached[1]

    def cached_path(self, asset: StaticAsset) -> tuple[Path, str]:
        """The asset's copy in the cache directory (with its `.gz`, written if not there yet)
        and the version it holds: a newer one if the source changed since it was hashed."""
        target = self.cache / asset.version / asset.name
        if target.is_file():
            return target, asset.version
        data = self.read(asset.name)
        version = _version(data)
        target = self.cache / version / asset.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix in COMPRESSIBLE:
            packed = gzip.compress(data, compresslevel=9, mtime=0)
            if len(packed) < len(data):
                _write_atomic(target.with_name(target.name + ".gz"), packed)
        _write_atomic(target, data)  # last: its presence means the siblings are there
        return target, version

    def prune(self) -> None:
        """Remove cached versions no current source has (at start-up: edits and upgrades)."""
        if not self.cache.is_dir():
            return
        current = set()
        for path in self.source.rglob("*"):
            if path.is_file():
                asset = self.asset(path.relative_to(self.source).as_posix())
                if asset is not None:
                    current.add(asset.version)
        for name in self.bundles:
            asset = self.asset(name)
            if asset is not None:
                current.add(asset.version)
        for entry in self.cache.iterdir():
            if entry.name not in current:
                shutil.rmtree(entry, ignore_errors=True)
            else:  # a write cut short by a crash
                for tmp in entry.rglob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    def warm(self) -> None:
        """Join and compress the bundles now (at start-up), not on the first page's request."""
        for name in self.bundles:
            asset = self.asset(name)
            if asset is not None:
                self.cached_path(asset)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        asset = self.asset(request.match_info["filename"])
        if asset is None:
            raise web.HTTPNotFound()
        path, version = await asyncio.get_running_loop().run_in_executor(None, self.cached_path, asset)
        versioned = request.query.get("v") == version
        return web.FileResponse(path, headers={"Cache-Control": IMMUTABLE if versioned else REVALIDATE})


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@jinja2.pass_context
def _url(context: Any, __route_name: str, query_: dict[str, str] | None = None, **parts: Any) -> Any:
    """aiohttp_jinja2's ``url()``; a route with no parts in its path (every page's menu and forms
    name about ten) is its path as it stands, with no URL object built and printed each time."""
    if not parts and not query_:
        resource = context["app"].router[__route_name]
        if isinstance(resource, web.PlainResource):
            return resource.canonical
    return aiohttp_jinja2.helpers.url_for(context, __route_name, query_, **parts)


@jinja2.pass_context
def _static_url(context: Any, name: str) -> str:
    return context["app"][keys.STATIC].url(name)


@jinja2.pass_context
def _static_inline(context: Any, name: str) -> str:
    return context["app"][keys.STATIC].data_uri(name)


def setup_static(app: web.Application) -> None:
    """`/static/{filename}` from web/static (see StaticFiles), and `static()` in templates."""
    settings = app[keys.SETTINGS]
    files = StaticFiles(STATIC_DIR, settings.data_dir / "cache" / "static", watch=settings.demo)
    app[keys.STATIC] = files
    app.router.add_get(STATIC_PREFIX + "{filename:.+}", files.handle, name="static")

    async def prune(app: web.Application) -> None:
        def both() -> None:
            files.prune()
            files.warm()

        await asyncio.get_running_loop().run_in_executor(None, both)

    app.on_startup.append(prune)
