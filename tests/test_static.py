"""Static files as the browser gets them: versioned URLs cached for a year, gzipped copies from a
cache dir that follows the sources, the icon inline, and the recording code only on the call
pages of a visit that may be recorded (bench/pageweight.py weighs the result)."""

from __future__ import annotations

import dataclasses
import gzip
import re

import aiohttp_jinja2
import pytest
from aiohttp import web

from consult.app import create_app
from consult.core import keys
from consult.core.templates import (
    BUNDLES,
    IMMUTABLE,
    REVALIDATE,
    STATIC_DIR,
    StaticFiles,
    setup_static,
    setup_templates,
)
from tests.booking_helpers import make_clinic, signed_in
from tests.call_helpers import keyed_settings, patient_token, seed_visit
from tests.db_helpers import write

STATIC_URL_RE = re.compile(r'(?:src|href)="(/static/[^"?]+)\?v=([0-9a-f]{16})"')


def static_urls(page: str) -> dict[str, str]:
    """path -> version of every static file a page loads."""
    return dict(STATIC_URL_RE.findall(page))


def loaded_files(page: str) -> set[str]:
    """The names of web/static files a page loads, a bundle's parts included."""
    out: set[str] = set()
    for path in static_urls(page):
        name = path.removeprefix("/static/")
        out.update(BUNDLES.get(name, (name,)))
    return out


async def test_pages_load_versioned_static_files_and_inline_the_icon(client):
    page = await (await client.get("/login")).text()
    urls = static_urls(page)
    assert "/static/app.css" in urls
    # Every static URL carries its version: none is left to a short cache.
    assert page.count('"/static/') == len(re.findall(r'"/static/[^"?]+\?v=', page))
    # The icon is part of the page: no request for it, so it cannot be fetched twice.
    assert "icon.svg" not in page
    assert re.search(r'<link rel="icon" href="data:image/svg\+xml;base64,[A-Za-z0-9+/=]+"', page)


async def test_versioned_static_files_are_immutable_and_gzipped_for_clients_that_accept_it(client):
    page = await (await client.get("/login")).text()
    version = static_urls(page)["/static/app.css"]
    source = (STATIC_DIR / "app.css").read_bytes()
    url = f"/static/app.css?v={version}"

    resp = await client.get(url, headers={"Accept-Encoding": "gzip, deflate"}, auto_decompress=False)
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Vary"] == "Accept-Encoding"
    assert resp.headers["Cache-Control"] == IMMUTABLE
    assert resp.content_type == "text/css"
    body = await resp.read()
    assert len(body) < len(source) / 2 and gzip.decompress(body) == source
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]  # headers as before

    resp = await client.get(url, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == source
    assert resp.headers["Cache-Control"] == IMMUTABLE

    # Without the version, or with an old one, the browser must ask again each time.
    for other in ("/static/app.css", "/static/app.css?v=0000000000000000"):
        resp = await client.get(other, headers={"Accept-Encoding": "gzip"})
        assert resp.status == 200 and resp.headers["Cache-Control"] == REVALIDATE, other
        assert await resp.read() == source
        etag = resp.headers["ETag"]
        again = await client.get(other, headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
        assert again.status == 304


async def test_only_files_of_web_static_are_served(client):
    for path in [
        "/static/nothing.js",
        "/static/.hidden",
        "/static/app.css.gz",  # the cached siblings are not names of their own
        "/static/app.css/x",
        "/static/%2e%2e/app.py",
        "/static/..%2fconsult%2fapp.py",
        "/static/" + "a" * 300 + ".js",
        "/static/a%00.js",
    ]:
        resp = await client.get(path)
        assert resp.status == 404, path
        assert resp.content_type == "text/html"  # the error page, not a traceback


def test_the_cache_follows_the_sources(tmp_path):
    source, cache = tmp_path / "static", tmp_path / "cache"
    source.mkdir()
    (source / "a.js").write_text("console.log('one');\n" * 50)
    (source / "tiny.css").write_text("a{}")
    files = StaticFiles(source, cache)

    first = files.asset("a.js")
    path, version = files.cached_path(first)
    assert version == first.version and files.url("a.js") == f"/static/a.js?v={version}"
    assert path == cache / version / "a.js" and path.read_bytes() == (source / "a.js").read_bytes()
    assert gzip.decompress(path.with_name("a.js.gz").read_bytes()) == path.read_bytes()
    tiny, _ = files.cached_path(files.asset("tiny.css"))
    assert not tiny.with_name("tiny.css.gz").exists()  # gzip would be larger

    (source / "a.js").write_text("console.log('two');\n" * 50)  # edited while the server runs
    second = files.asset("a.js")
    assert second.version != first.version and files.url("a.js").endswith(second.version)
    new_path, _ = files.cached_path(second)
    assert b"two" in gzip.decompress(new_path.with_name("a.js.gz").read_bytes())

    (cache / second.version / ".a.js.123.tmp").write_text("cut short")
    files.prune()  # at start-up
    assert not (cache / first.version).exists()
    assert new_path.exists() and not (cache / second.version / ".a.js.123.tmp").exists()

    with pytest.raises(LookupError):
        files.url("missing.js")
    assert files.data_uri("tiny.css") == "data:text/css;base64,YXt9"


def test_production_keeps_the_versions_it_found_and_serves_the_files_they_name(tmp_path):
    """Without ``watch`` (production: files change with an upgrade, which restarts the server) a
    file's version is found once, with no stat per use; a new name is still looked up."""
    source, cache = tmp_path / "static", tmp_path / "cache"
    source.mkdir()
    (source / "a.js").write_text("console.log('one');\n")
    files = StaticFiles(source, cache, watch=False)
    first = files.url("a.js")
    (source / "a.js").write_text("console.log('two');\n")
    assert files.url("a.js") == first  # kept: this server started with 'one'
    (source / "b.js").write_text("console.log('b');\n")
    assert files.asset("b.js") is not None and files.asset("../a.js") is None
    assert files.asset("missing.js") is None


def test_templates_and_static_files_are_watched_only_in_demo_mode(settings):
    for demo in (False, True):
        app = web.Application()
        app[keys.SETTINGS] = mode = dataclasses.replace(settings, demo=demo)
        setup_templates(app, mode)
        setup_static(app)
        assert aiohttp_jinja2.get_env(app).auto_reload is demo
        assert app[keys.STATIC].watch is demo


async def test_the_call_pages_load_the_recording_code_only_when_the_visit_may_be_recorded(
    aiohttp_server, aiohttp_client, settings, make_user
):
    clinic = make_clinic(settings, make_user)
    patient_id = make_user("patient", login="13900000001", name="Pat Ient")
    doctor = clinic.doctor_ids[0]
    server = await aiohttp_server(create_app(settings))
    anon = await aiohttp_client(server)
    doc = await signed_in(aiohttp_client, server, "doc0")
    keyed = keyed_settings(settings.data_dir)
    visit = seed_visit(settings, doctor_id=doctor, patient_id=patient_id)
    call = f"/call/{patient_token(keyed, visit)}"
    room = f"/doctor/visits/{visit.public_id}/room"

    def set_policy(policy: str) -> None:
        write(
            settings,
            lambda d: d.execute(
                "UPDATE doctors SET recording_policy = ? WHERE user_id = ?", [policy, doctor]
            ),
        )

    async def scripts(client, path: str) -> set[str]:
        resp = await client.get(path)
        assert resp.status == 200, path
        page = await resp.text()
        return {name for name in loaded_files(page) if name.endswith(".js")}

    # Recording off (the default): the call works without call-recording.js (call.js knows).
    for client, path in ((anon, call), (doc, room)):
        loaded = await scripts(client, path)
        assert "call.js" in loaded and "call-peer.js" in loaded, path
        assert "call-recording.js" not in loaded, path
    for policy in ("on_request", "always"):
        set_policy(policy)
        for client, path in ((anon, call), (doc, room)):
            loaded = await scripts(client, path)
            assert {"call.js", "call-recording.js"} <= loaded, (policy, path)


async def test_the_patients_call_page_loads_one_stylesheet_and_one_script_joined_by_the_server(
    aiohttp_client, settings, make_user
):
    """A phone opening the link cold pays a TLS handshake per extra HTTP/1.1 connection: the
    call page loads app.css, legible.css and call.css as one file, and its eight scripts as one,
    each versioned, cached for a year and gzipped like any static file (bench/join.py)."""
    clinic = make_clinic(settings, make_user)
    patient_id = make_user("patient", login="13900000001", name="Pat Ient")
    client = await aiohttp_client(create_app(settings))
    keyed = keyed_settings(settings.data_dir)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=patient_id)
    page = await (await client.get(f"/call/{patient_token(keyed, visit)}")).text()

    urls = static_urls(page)
    assert sorted(urls) == ["/static/bundle/call-patient.js", "/static/bundle/call.css"]
    # The script is fetched from the head, beside the stylesheet, and runs deferred.
    js = f"/static/bundle/call-patient.js?v={urls['/static/bundle/call-patient.js']}"
    assert f'<link rel="preload" href="{js}" as="script">' in page
    assert f'<script src="{js}" defer></script>' in page
    assert page.index('rel="stylesheet"') < page.index('rel="preload"') < page.index("</head>")
    assert loaded_files(page) >= {"app.css", "legible.css", "call.css", "call-boot.js", "call.js"}

    for path, version in urls.items():
        name = path.removeprefix("/static/")
        parts = [(STATIC_DIR / part).read_bytes() for part in BUNDLES[name]]
        resp = await client.get(
            f"{path}?v={version}", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
        )
        assert resp.status == 200, path
        assert resp.content_type == ("text/css" if name.endswith(".css") else "application/javascript"), path
        assert resp.headers["Cache-Control"] == IMMUTABLE and resp.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(await resp.read())
        assert len(await resp.read()) < len(body) / 2
        # Every part, whole and in order (the cascade and the scripts' order are the pages').
        at = 0
        for part, data in zip(BUNDLES[name], parts, strict=True):
            found = body.find(data, at)
            assert found >= at, f"{part} missing or out of order in {name}"
            at = found + len(data)
        # Without the version: asked again each time, like any unversioned static URL.
        resp = await client.get(path)
        assert resp.status == 200 and resp.headers["Cache-Control"] == REVALIDATE
        assert await resp.read() == body


def test_a_bundle_follows_its_parts(tmp_path):
    source, cache = tmp_path / "static", tmp_path / "cache"
    source.mkdir()
    (source / "a.js").write_text("// no newline at the end")
    (source / "b.js").write_text("(function () { window.b = 1; })();\n")
    (source / "c.css").write_text("p { color: red }\n" * 40)
    bundles = {
        "bundle/ab.js": ("a.js", "b.js"),
        "bundle/c.css": ("c.css",),
        "bundle/gone.js": ("a.js", "x.js"),
    }
    files = StaticFiles(source, cache, bundles)

    first = files.asset("bundle/ab.js")
    body = files.read("bundle/ab.js")
    # A part's last line cannot swallow the next part (a comment, a statement without `;`).
    assert body == (
        b"/* a.js */\n// no newline at the end\n;\n/* b.js */\n(function () { window.b = 1; })();\n\n;\n"
    )
    assert files.asset("bundle/gone.js") is None  # a part is missing: no such file
    assert files.asset("bundle/nothing.js") is None

    files.warm()  # at start-up: joined and gzipped before any page asks
    path = cache / first.version / "bundle" / "ab.js"
    assert path.read_bytes() == body and files.cached_path(first) == (path, first.version)
    assert gzip.decompress((cache / files.asset("bundle/c.css").version / "bundle" / "c.css.gz").read_bytes())

    (source / "b.js").write_text("(function () { window.b = 2; })();\n")  # a part edited
    second = files.asset("bundle/ab.js")
    assert second.version != first.version
    assert files.url("bundle/ab.js") == f"/static/bundle/ab.js?v={second.version}"
    files.prune()
    assert not (cache / first.version).exists()  # the old bundle went with its old part
    assert b"window.b = 2" in files.cached_path(second)[0].read_bytes()
