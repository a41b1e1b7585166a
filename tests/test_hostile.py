"""Hostile input: every route and role, bad path values, bodies, query strings, headers, cookies, XSS.

Whatever a stranger or a signed-in user sends, the answer is a 4xx (or a normal page), never a
500, never a traceback or a Python exception name, never another user's data, never a redirect
off the site, and never a header or page carrying the input unescaped.
"""

from __future__ import annotations

import collections
import io
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from PIL import Image
from yarl import URL

from consult.app import create_app
from consult.core.db import Database
from consult.core.engine import open_database
from tests.account_helpers import register
from tests.booking_helpers import make_clinic
from tests.conftest import csrf_of, login

PATIENT, OTHER_PATIENT = "13900000001", "13900000002"
DOCTOR, OTHER_DOCTOR, ADMIN = "doc0", "doc1", "boss"
XSS_NAME = "<script>alert(1)</script>"
XSS_FILE = "<img src=x onerror=alert(1)>.pdf"
ROLES = ("anonymous", "patient", "doctor", "admin")

# Path values: each is percent-encoded into one path segment.
HOSTILE_VALUES = [
    "0",
    "-1",
    "99999999999999999999",
    "9223372036854775808",
    "00000000000000000000000000001",
    "\x00",
    "%00",
    "../../etc/passwd",
    "A" * 5000,
    "患者-ü-😀-\u202e-\ufeff",
    "²³",
    "'\"><script>alert(1)</script>",
    "RX-0000-99999999999999999999",
    "host.AAAA.BBBB",
    " ",
]
# Query values: every name a view reads, each set to the same hostile value.
QUERY_NAMES = (
    "next page cursor before from to department doctor outcome end_reason q actor subject action"
    " object_type object_id flagged m done number code"
).split()
QUERY_VALUES = [
    "²",
    "-1",
    "99999999999999999999",
    "9999-12-31",
    "0001-01-01",
    "\x00",
    "A" * 300,
    "'\"><script>alert(1)</script>",
    "//evil.example",
    "1.1",
    "-99999999999.1",
    "1e400",
]

EXCEPTION_NAMES = (
    "Traceback",
    "KeyError",
    "ValueError",
    "TypeError",
    "AttributeError",
    "IndexError",
    "OverflowError",
    "NameError",
    "RuntimeError",
    "AssertionError",
    "ZeroDivisionError",
    "UnicodeDecodeError",
    "UnicodeEncodeError",
    "JSONDecodeError",
    "RecursionError",
    "FileNotFoundError",
    "PermissionError",
    "IsADirectoryError",
    "OperationalError",
    "IntegrityError",
    "ProgrammingError",
    "InterfaceError",
    "DatabaseError",
    "UndefinedError",
    "TemplateNotFound",
    "sqlite3.",
    "jinja2.",
    'File "/',
)
LEAK_RE = re.compile("|".join(re.escape(n) for n in EXCEPTION_NAMES))


@dataclass
class World:
    server: Any
    settings: Any
    clients: dict[str, Any] = field(default_factory=dict)
    csrf: dict[str, str] = field(default_factory=dict)
    ids: dict[str, Any] = field(default_factory=dict)

    def db(self) -> Database:
        return open_database(self.settings)

    def read(self, fn):
        db = self.db()
        try:
            return db.read_sync(fn)
        finally:
            db.close()

    def write(self, fn):
        db = self.db()
        try:
            return db.write_sync(fn)
        finally:
            db.close()


def pdf_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (60, 80), "white").save(buf, "PDF")
    return buf.getvalue()


def _add_visit(w: World, patient: int, doctor: int, status: str, starts_in: float) -> tuple[str, int]:
    public_id = secrets.token_urlsafe(12)
    now = time.time()
    starts = int(now + starts_in)

    def write(d) -> int:
        cur = d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, hold_expires, fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 5000, 'CNY', ?, ?, 'nonce') RETURNING id",
            [
                public_id,
                patient,
                doctor,
                w.ids["department"],
                starts,
                starts + 900,
                status,
                now + 900 if status == "held" else None,
                now,
                now,
            ],
        )
        return int(cur.fetchone()[0])

    return public_id, w.write(write)


async def _client(aiohttp_client, w: World, role: str, identifier: str | None):
    client = await aiohttp_client(w.server)
    if identifier:
        await login(client, identifier)
        w.csrf[role] = await csrf_of(client, "/account")
    else:
        w.csrf[role] = await csrf_of(client, "/login")
    w.clients[role] = client
    return client


@pytest.fixture
async def world(aiohttp_server, aiohttp_client, settings, make_user) -> World:
    clinic = make_clinic(settings, make_user, doctors=2)
    patient = make_user("patient", PATIENT, name=XSS_NAME)
    other = make_user("patient", OTHER_PATIENT, name="Other Patient")
    server = await aiohttp_server(create_app(settings))
    w = World(server, settings)
    w.ids.update(
        department=clinic.department_id,
        doctor=clinic.doctor_ids[0],
        other_doctor=clinic.doctor_ids[1],
        admin=clinic.admin_id,
        patient=patient,
        other_patient=other,
    )
    # A held visit in two days (reports may be added), a confirmed one under way (notes, Rx),
    # and one of another patient with another doctor (nobody else's business).
    w.ids["held"], w.ids["held_id"] = _add_visit(w, patient, clinic.doctor_ids[0], "held", 2 * 86400)
    w.ids["live"], w.ids["live_id"] = _add_visit(w, patient, clinic.doctor_ids[0], "confirmed", -60)
    w.ids["foreign"], w.ids["foreign_id"] = _add_visit(w, other, clinic.doctor_ids[1], "confirmed", -60)
    for role, ident in (("anonymous", None), ("patient", PATIENT), ("doctor", DOCTOR), ("admin", ADMIN)):
        await _client(aiohttp_client, w, role, ident)
    await _client(aiohttp_client, w, "other_patient", OTHER_PATIENT)
    await _client(aiohttp_client, w, "other_doctor", OTHER_DOCTOR)

    p = w.clients["patient"]
    form = aiohttp.FormData()
    form.add_field("file", pdf_bytes(), filename=XSS_FILE, content_type="application/pdf")
    resp = await p.post(
        f"/api/visits/{w.ids['held']}/reports", data=form, headers={"X-CSRF-Token": w.csrf["patient"]}
    )
    assert resp.status == 201, await resp.text()
    w.ids["report"] = (await resp.json())["report"]["id"]

    resp = await p.post(
        f"/visits/{w.ids['held']}/pay", data={"csrf_token": w.csrf["patient"]}, allow_redirects=False
    )
    assert resp.status == 303, await resp.text()
    w.ids["order"] = w.read(
        lambda d: d.execute("SELECT order_id FROM payments ORDER BY id DESC").fetchone()[0]
    )

    rx_form = {
        "sex": "female",
        "age": 40,
        "diagnosis": XSS_NAME,
        "allergies": "无",
        "items": [
            {
                "drug": XSS_NAME,
                "strength": "1 mg",
                "dose": "1",
                "dose_unit": "mg",
                "route": "oral",
                "frequency": "qd",
                "days": 1,
                "quantity": 1,
                "quantity_unit": "box",
            }
        ],
    }
    resp = await w.clients["doctor"].post(
        f"/api/visits/{w.ids['live']}/prescriptions/preview",
        json=rx_form,
        headers={"X-CSRF-Token": w.csrf["doctor"]},
    )
    assert resp.status == 200, await resp.text()
    seen = (await resp.json())["preview_hash"]
    resp = await w.clients["doctor"].post(
        f"/api/visits/{w.ids['live']}/prescriptions",
        json={**rx_form, "preview_hash": seen},
        headers={"X-CSRF-Token": w.csrf["doctor"]},
    )
    assert resp.status == 201, await resp.text()
    w.ids["rx"] = (await resp.json())["prescription"]["number"]
    return w


# -- helpers ------------------------------------------------------------------------------------


def problems(status: int, headers, body: str, what: str) -> list[str]:
    found = []
    if status >= 500:
        found.append(f"{what} -> {status}: {body[:300]}")
    m = LEAK_RE.search(body)
    if m is not None:
        found.append(f"{what} leaks {m.group(0)!r}: {body[max(0, m.start() - 150) : m.end() + 150]}")
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            found.append(f"{what}: header {name} carries a newline")
    return found


async def send(
    client, method: str, path: str, what: str, failures: list[str] | None = None, **kwargs
) -> tuple[int, Any, str]:
    """One request; its problems go to ``failures`` when given (walkers), else fail at once."""
    kwargs.setdefault("allow_redirects", False)
    resp = await client.request(method, URL(path, encoded=True), **kwargs)
    body = (await resp.read()).decode("utf-8", "replace")
    found = problems(resp.status, resp.headers, body, f"{what}: {method} {path[:120]}")
    if failures is None:
        assert not found, "\n".join(found)
    else:
        failures.extend(found)
    return resp.status, resp.headers, body


def report(failures: list[str]) -> None:
    if failures:
        unique = list(dict.fromkeys(f[:400] for f in failures))
        pytest.fail(f"{len(failures)} problems:\n" + "\n".join(unique[:60]), pytrace=False)


def routes(app) -> list[tuple[str, str, list[str]]]:
    """(method, path template with {name} placeholders, parameter names) for every route."""
    out = []
    for route in app.router.routes():
        resource = route.resource
        info = resource.get_info()
        if "formatter" in info:
            template = info["formatter"]
        elif "prefix" in info:  # static files
            template = info["prefix"] + "/{filename}"
        else:
            template = info["path"]
        out.append((route.method, template, re.findall(r"\{(\w+)\}", template)))
    return out


# Routes that end the walker's own session are exercised on their own below.
SESSION_ENDING = {("POST", "/logout"), ("POST", "/logout-all"), ("POST", "/account/password")}


def fill(template: str, params: list[str], value: str) -> str:
    # A request line past 8 KiB is aiohttp's own 400 before any of our code: one long value only.
    values = {p: value if i == 0 or len(value) < 1000 else "1" for i, p in enumerate(params)}
    return template.format(**{p: quote(v, safe="") for p, v in values.items()})


def real_values(w: World) -> dict[str, str]:
    # Parameters added later (recordings, ...) get "1": the walker still reaches their handler.
    return collections.defaultdict(
        lambda: "1",
        {
            "user_id": str(w.ids["patient"]),
            "department_id": str(w.ids["department"]),
            "doctor_id": str(w.ids["doctor"]),
            "item_id": "1",
            "public_id": w.ids["live"],
            "room_id": w.ids["live"],
            "report_id": str(w.ids["report"]),
            "order_id": w.ids["order"],
            "provider": "simulator",
            "number": w.ids["rx"],
            "token": "x" * 40,
            "filename": "app.css",
        },
    )


def unsafe_headers(w: World, role: str) -> dict[str, str]:
    return {"X-CSRF-Token": w.csrf[role]}


# -- (1) every route, every role, hostile path values --------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_every_route_survives_hostile_path_values(world, role):
    w = world
    client = w.clients[role]
    seen, failures = 0, []
    for method, template, params in routes(w.server.app):
        if (method, template) in SESSION_ENDING:
            continue
        headers = unsafe_headers(w, role) if method not in ("GET", "HEAD") else {}
        values = HOSTILE_VALUES if params else [""]
        for value in values:
            path = fill(template, params, value)
            await send(client, method, path, f"{role} {value[:20]!r}", failures, headers=headers)
            seen += 1
    assert seen > 300
    report(failures)


@pytest.mark.parametrize("role", ROLES)
async def test_every_route_answers_every_method(world, role):
    """Real ids, every verb: a wrong method is a 405, never a crash."""
    w = world
    client = w.clients[role]
    values = real_values(w)
    done, failures = set(), []
    for _method, template, params in routes(w.server.app):
        path = template.format(**{p: quote(values[p], safe="") for p in params})
        if path in done:
            continue
        done.add(path)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            if (method, template) in SESSION_ENDING or path in ("/logout", "/logout-all"):
                continue
            await send(client, method, path, f"{role}", failures, headers=unsafe_headers(w, role))
    report(failures)


@pytest.mark.parametrize("role", ROLES)
async def test_every_get_route_survives_hostile_query_strings(world, role):
    w = world
    client = w.clients[role]
    values, failures = real_values(w), []
    for method, template, params in routes(w.server.app):
        if method != "GET" or template.startswith("/static"):
            continue
        path = template.format(**{p: quote(values[p], safe="") for p in params})
        for value in QUERY_VALUES:
            query = urlencode({name: value for name in QUERY_NAMES})
            what = f"{role} query {value[:20]!r}"
            status, headers, body = await send(client, "GET", f"{path}?{query}", what, failures)
            if "<script>alert(1)" in body and "json" not in headers.get("Content-Type", ""):
                failures.append(f"{what}: {path} reflects the query unescaped")
            if status in (301, 302, 303, 307, 308):
                location = headers.get("Location", "")
                if location.startswith(("//", "/\\")) or URL(location).host not in (None, "127.0.0.1"):
                    failures.append(f"{what}: {path} redirects off the site to {location[:80]}")
    report(failures)


# -- (2) hostile bodies on every unsafe route ----------------------------------------------------

FORM_FIELDS = (
    "identifier password next name phone password2 locale current new new2 role username display_name"
    " code name_zh name_en description_zh description_en active sort title_zh title_en bio_zh bio_en fee"
    " visit_minutes departments weekday start_local end_local valid_from valid_until day kind note"
    " doctor_id department_id starts_at reason action document recording_policy"
).split()
JSON_FIELDS = {
    "items": [{"drug": 1, "dose": [], "frequency": {}, "duration": None, "quantity": 1e308}],
    "client_ref": 12345678901,
    "text": 42,
    "advice": ["x"],
    "version": 99999999999999999999,
}


def hostile_bodies() -> list[tuple[str, dict[str, Any]]]:
    """(label, request keyword arguments) for one unsafe request each."""
    huge = "A" * 15_000  # per field: the whole form stays under the 2 MiB request limit
    return [
        ("no body", {}),
        ("text/plain", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}),
        ("xml", {"data": b"<?xml version='1.0'?><a/>", "headers": {"Content-Type": "application/xml"}}),
        ("malformed json", {"data": b'{"items": [', "headers": {"Content-Type": "application/json"}}),
        ("json array", {"data": b"[1, 2, 3]", "headers": {"Content-Type": "application/json"}}),
        ("json string", {"data": b'"just a string"', "headers": {"Content-Type": "application/json"}}),
        ("json null", {"data": b"null", "headers": {"Content-Type": "application/json"}}),
        ("json wrong types", {"json": {**JSON_FIELDS, **{f: 7 for f in FORM_FIELDS}}}),
        (
            "json nested deep",
            {
                "data": io.BytesIO(b"[" * 100_000 + b"]" * 100_000),
                "headers": {"Content-Type": "application/json"},
            },
        ),
        (
            "json NaN",
            {
                "data": b'{"version": NaN, "items": [Infinity]}',
                "headers": {"Content-Type": "application/json"},
            },
        ),
        (
            "json bad utf-8",
            {"data": b'{"text": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}},
        ),
        ("form huge fields", {"data": {f: huge for f in FORM_FIELDS}}),
        ("form numbers", {"data": {f: "99999999999999999999" for f in FORM_FIELDS}}),
        ("form unicode digits", {"data": {f: "²" for f in FORM_FIELDS}}),
        ("form hostile text", {"data": {f: "'\"><script>alert(1)</script>\x00\r\n" for f in FORM_FIELDS}}),
        (
            "form bad encoding",
            {
                "data": b"name=%ff%fe&phone=%&password=%zz&" + b"\xff" * 10,
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
        ),
        ("multipart fields", {"data": _multipart({f: "1" for f in FORM_FIELDS})}),
        (
            "multipart broken",
            {
                "data": b"--zzz\r\nContent-Disposition: form-data\r\n\r\nx",
                "headers": {"Content-Type": "multipart/form-data; boundary=zzz"},
            },
        ),
        ("multipart no boundary", {"data": b"x", "headers": {"Content-Type": "multipart/form-data"}}),
        ("bad content-length", {"data": b"a=1", "headers": {"Content-Type": "application/octet-stream"}}),
    ]


def _multipart(fields: dict[str, str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", b"%PDF-1.4 not really", filename="../../x.pdf", content_type="application/pdf")
    return form


def unsafe_routes(w: World) -> list[tuple[str, str]]:
    values = real_values(w)
    out = []
    for method, template, params in routes(w.server.app):
        if method in ("GET", "HEAD") or (method, template) in SESSION_ENDING:
            continue
        out.append((method, template.format(**{p: quote(values[p], safe="") for p in params})))
    return out


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.locale("en")  # asserts English texts
async def test_unsafe_routes_survive_hostile_bodies(world, role):
    w = world
    client = w.clients[role]
    failures: list[str] = []
    for method, path in unsafe_routes(w):
        for label, kwargs in hostile_bodies():
            headers = {**unsafe_headers(w, role), **kwargs.pop("headers", {})}
            await send(client, method, path, f"{role} {label}", failures, headers=headers, **kwargs)
    report(failures)
    assert_uploads_consistent(w)


def assert_uploads_consistent(w: World) -> None:
    """Every stored report has its file and every file its row: no orphan, no half-written row."""
    rows = w.read(lambda d: [r[0] for r in d.execute("SELECT stored_name FROM reports")])
    root = w.settings.data_dir / "uploads"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    names = {p.name for p in files}
    assert all(any(name.endswith(r) or r.endswith(name) for name in names) for r in rows), (rows, files)
    assert len(files) == len(rows), (rows, files)


@pytest.mark.parametrize("role", ["patient", "doctor", "admin"])
async def test_unsafe_routes_refuse_a_missing_or_forged_csrf_token(world, role):
    w = world
    client = w.clients[role]
    for method, path in unsafe_routes(w):
        if path.startswith("/api/payments/callback/"):
            continue  # signed by the gateway, not by a form
        for headers in ({}, {"X-CSRF-Token": "0" * 64}, {"X-CSRF-Token": "\u00e9" * 10}):
            status, _h, body = await send(client, method, path, f"{role} csrf", headers=headers)
            assert status == 403, f"{method} {path} without CSRF -> {status}: {body[:200]}"
        status, _h, _b = await send(client, method, path, f"{role} csrf", data={"csrf_token": "deadbeef" * 8})
        assert status == 403, f"{method} {path} with a forged form token -> {status}"
    # A request from another site is refused even with a valid token.
    status, _h, _b = await send(
        client,
        "POST",
        "/lang",
        "cross-site",
        data={"csrf_token": w.csrf[role], "locale": "en"},
        headers={"Origin": "https://evil.example"},
    )
    assert status == 403


async def test_recording_consent_refuses_deeply_nested_json(world):
    w = world
    status, _h, _b = await send(
        w.clients["doctor"],
        "POST",
        f"/doctor/visits/{w.ids['live']}/room/recording-consent",
        "deep json",
        data=io.BytesIO(b"[" * 100_000 + b"]" * 100_000),
        headers={"Content-Type": "application/json", **unsafe_headers(w, "doctor")},
    )
    assert status == 400


# -- (3) stored XSS -------------------------------------------------------------------------------

RAW_PAYLOADS = ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>")
ESCAPED_PAYLOADS = ("&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;img src=x onerror=alert(1)&gt;")


async def test_a_patient_registered_with_a_script_name_is_escaped_everywhere(world):
    w = world
    client = w.clients["anonymous"]
    await register(client, "13900000009", name=XSS_NAME, password="correct horse battery")
    status, _h, body = await send(client, "GET", "/account", "registered")
    assert status == 200
    assert XSS_NAME not in body and ESCAPED_PAYLOADS[0] in body


@pytest.mark.parametrize("role", ["patient", "doctor", "admin"])
async def test_stored_names_are_escaped_on_every_page(world, role):
    """The patient is called <script>…, the report <img onerror…>.pdf, the Rx's drug <script>…."""
    w = world
    client = w.clients[role]
    values = real_values(w)
    pages, escaped, failures = 0, 0, []
    for public_id in (w.ids["live"], w.ids["held"]):
        values["public_id"] = public_id
        for method, template, params in routes(w.server.app):
            if method != "GET" or template.startswith("/static"):
                continue
            path = template.format(**{p: quote(values[p], safe="") for p in params})
            _status, headers, body = await send(client, "GET", path, f"{role} xss", failures)
            if "html" not in headers.get("Content-Type", "") and "svg" not in headers.get("Content-Type", ""):
                continue
            pages += 1
            for raw in RAW_PAYLOADS:
                if raw in body:
                    failures.append(f"{role}: {path} carries {raw!r} unescaped")
            escaped += sum(body.count(e) for e in ESCAPED_PAYLOADS)
    report(failures)
    assert pages > 5 and escaped > 0, (pages, escaped)


async def test_a_hostile_report_name_is_safe_in_headers_json_and_pages(world):
    w = world
    client = w.clients["patient"]
    rid = w.ids["report"]
    for path in (f"/reports/{rid}", f"/reports/{rid}/download"):
        status, headers, _b = await send(client, "GET", path, "report serve")
        assert status == 200
        disposition = headers["Content-Disposition"]
        # One quoted ASCII name and one RFC 5987 name: nothing breaks out of either.
        ascii_name = re.search(r'filename="([^"]*)"', disposition).group(1)
        assert not set(ascii_name) & set('"\\;\r\n'), disposition
        assert "filename*=UTF-8''" in disposition and "<" not in disposition.split("''", 1)[1]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in headers["Content-Security-Policy"]
    status, headers, body = await send(client, "GET", f"/api/visits/{w.ids['held']}/reports", "list")
    assert headers["Content-Type"].startswith("application/json")
    # JSON, sniffing off: the panel script puts the name in with textContent, never as markup.
    assert json.loads(body)["reports"][0]["name"] == XSS_FILE
    assert headers["X-Content-Type-Options"] == "nosniff"


# -- (4) query strings: open redirects, paging -----------------------------------------------------

REDIRECT_ATTEMPTS = [
    "//evil.example",
    "///evil.example",
    "https://evil.example/",
    "http:evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\t/evil.example",
    " //evil.example",
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "/%2F%2Fevil.example",
    "/x\r\nSet-Cookie: stolen=1",
    "/x\nLocation: //evil.example",
    "/\u3002/evil.example",
    "\x00//evil.example",
]


def assert_local(location: str | None, what: str) -> None:
    assert location is not None, what
    assert "\r" not in location and "\n" not in location, (what, location)
    assert location.startswith("/") and not location.startswith(("//", "/\\")), (what, location)
    assert URL(location).host is None, (what, location)


@pytest.mark.parametrize("target", REDIRECT_ATTEMPTS)
async def test_login_next_never_leaves_the_site(world, target):
    w = world
    client = w.clients["anonymous"]
    status, headers, body = await send(client, "GET", "/login?" + urlencode({"next": target}), "login page")
    assert status == 200 and "<script>alert(1)" not in body
    status, headers, body = await send(
        client,
        "POST",
        "/login",
        "login next",
        data={
            "identifier": PATIENT,
            "password": "correct horse",
            "next": target,
            "csrf_token": w.csrf["anonymous"],
        },
    )
    assert status == 303, body[:300]
    assert_local(headers.get("Location"), f"login next={target!r}")
    assert "stolen" not in headers.get("Set-Cookie", "")


@pytest.mark.parametrize("target", REDIRECT_ATTEMPTS)
async def test_language_next_never_leaves_the_site(world, target):
    w = world
    for role in ("anonymous", "patient"):
        status, headers, body = await send(
            w.clients[role],
            "POST",
            "/lang",
            "lang next",
            data={"locale": "en", "next": target, "csrf_token": w.csrf[role]},
        )
        assert status == 303, body[:300]
        assert_local(headers.get("Location"), f"lang next={target!r}")


async def test_sign_in_redirect_keeps_a_hostile_path_inside_the_site(world):
    status, headers, _b = await send(
        world.clients["anonymous"], "GET", "/patient?x=%0d%0aSet-Cookie:%20a=b&next=//evil.example", "bounce"
    )
    assert status == 303
    assert_local(headers["Location"], "unauthorized bounce")


@pytest.mark.parametrize(
    "path",
    [
        "/admin/audit?before=-1",
        "/admin/audit?before=abc",
        "/admin/audit?before=99999999999999999999999",
        "/admin/audit?before=%C2%B2",
        "/admin/audit?from=9999-12-31&to=9999-12-31",
        "/admin/audit?from=0001-01-01&actor=%C2%B2&subject=%C2%B2",
        "/admin/sessions?cursor=garbage",
        "/admin/sessions?cursor=-999999999999.999999999999",
        "/admin/sessions?cursor=1.2.3&page=-1",
        "/admin/sessions?to=9999-12-31&q=%C2%B2",
        "/admin/sessions?from=0001-01-01&department=%C2%B2&doctor=99999999999999999999",
        "/admin/sessions.csv?to=9999-12-31",
        "/admin/sessions/overview?from=0001-01-01&to=0001-01-05",
        "/admin/sessions/overview?from=9999-12-01&to=9999-12-31",
        "/admin/catalogue/doctors/{doctor}?flagged=%C2%B2",
        "/admin/payments?done=%3Cscript%3Ealert(1)%3C/script%3E",
    ],
)
async def test_admin_lists_take_bad_paging_and_filters_calmly(world, path):
    w = world
    status, _h, body = await send(
        w.clients["admin"], "GET", path.format(doctor=w.ids["doctor"]), "admin list"
    )
    assert status == 200, body[:300]
    assert "<script>alert(1)" not in body
    if path.startswith("/admin/audit?from=9999"):
        assert "to" in body  # the bad date is named, not silently used


async def test_patient_access_log_paging(world):
    for before in ("-1", "abc", "²", "99999999999999999999999", "0"):
        status, _h, _b = await send(
            world.clients["patient"],
            "GET",
            "/patient/access-log?" + urlencode({"before": before}),
            "access log",
        )
        assert status == 200


async def test_sessions_csv_head_sends_no_body(world):
    client = world.clients["admin"]
    resp = await client.head("/admin/sessions.csv")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    # The connection is still usable: a body after HEAD would be read as the next status line.
    status, _h, _b = await send(client, "GET", "/admin", "after head")
    assert status == 200


# -- (5) headers, sizes and cookies ---------------------------------------------------------------

BIG = 3 * 1024 * 1024


@pytest.mark.parametrize("path", ["/login", "/register", "/lang", "/verify", "/admin/users", "/book/hold"])
@pytest.mark.parametrize("how", ["form token", "header token", "multipart"])
@pytest.mark.locale("en")  # asserts English texts
async def test_a_body_over_two_megabytes_is_a_413_with_a_message(world, path, how):
    w = world
    role = "admin" if path.startswith("/admin") else "patient" if path == "/book/hold" else "anonymous"
    headers = {"X-CSRF-Token": w.csrf[role]} if how != "form token" else {}
    if how == "multipart":
        form = aiohttp.FormData()
        form.add_field("name", io.BytesIO(b"x" * BIG), filename="name.txt")
        data: Any = form
    else:
        prefix = b"csrf_token=" + w.csrf[role].encode() + b"&" if how == "form token" else b""
        data = io.BytesIO(prefix + b"name=" + b"A" * BIG)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    status, _h, body = await send(w.clients[role], "POST", path, f"big {how}", data=data, headers=headers)
    assert status == 413, body[:300]
    assert "too large" in body


async def test_an_oversized_upload_is_refused_without_leaving_a_file(world):
    w = world
    form = aiohttp.FormData()
    form.add_field(
        "file",
        io.BytesIO(b"%PDF-1.4\n" + b"0" * (40 * 1024 * 1024)),
        filename="big.pdf",
        content_type="application/pdf",
    )
    status, _h, body = await send(
        w.clients["patient"],
        "POST",
        f"/api/visits/{w.ids['held']}/reports",
        "upload big",
        data=form,
        headers=unsafe_headers(w, "patient"),
    )
    assert status == 413, body[:300]
    assert json.loads(body)["message"]
    assert_uploads_consistent(w)


@pytest.mark.parametrize(
    "value",
    [
        "*;q=abc, zz-ZZ;q=nan, en;q=1e999, ;;;, ,",
        "q=0.5",
        ";q=1",
        "zh-Hant-TW-x-private-🙂;q=0.9",
        "a" * 6000,
        "en;q=-inf, zh;q=inf",
        "\\x00, ../../etc/passwd",
        "i-klingon, x-pig-latin, und",
    ],
)
async def test_bad_accept_language_is_ignored(world, value):
    w = world
    for role in ("anonymous", "patient"):
        for path in ("/", "/login", "/patient", "/verify"):
            status, _h, _b = await send(
                w.clients[role], "GET", path, "accept-language", headers={"Accept-Language": value}
            )
            assert status in (200, 303)


GARBAGE_COOKIES = [
    "x",
    "A" * 4000,
    '"quoted\\"value"',
    "%00%ff%fe",
    "患者",
    "a=b; consult_session=c",
    "../../etc/passwd",
]


@pytest.mark.parametrize("value", GARBAGE_COOKIES)
@pytest.mark.parametrize("name", ["consult_session", "consult_csrf", "consult_lang"])
async def test_garbage_cookies_are_ignored(aiohttp_client, world, name, value):
    client = await aiohttp_client(world.server)
    cookie = f"{name}={quote(value) if not value.isascii() else value}"
    for path in ("/", "/login", "/patient", "/admin", "/verify"):
        status, _h, _b = await send(client, "GET", path, f"cookie {name}", headers={"Cookie": cookie})
        assert status in (200, 303, 401), path
    # A forged CSRF cookie cannot carry a post, and is refused rather than crashing.
    status, _h, _b = await send(
        client,
        "POST",
        "/lang",
        "cookie post",
        data={"locale": "en", "csrf_token": "0" * 64},
        headers={"Cookie": cookie},
    )
    assert status == 403


async def test_garbage_session_cookie_is_anonymous(aiohttp_client, world):
    client = await aiohttp_client(world.server)
    for value in GARBAGE_COOKIES:
        status, headers, _b = await send(
            client,
            "GET",
            "/patient",
            "session cookie",
            headers={"Cookie": f"consult_session={value!s}" if value.isascii() else "consult_session=x"},
        )
        assert status == 303 and headers["Location"].startswith("/login")


# -- another user's data ----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["other_patient", "other_doctor"])
async def test_another_users_records_are_not_found(world, role):
    """The walker with real ids, as someone with no business there: never a 200 with the data."""
    w = world
    client = w.clients[role]
    values = real_values(w)
    secret_bits = (w.ids["held"], w.ids["live"], XSS_FILE, w.ids["rx"])
    failures = []
    for method, template, params in routes(w.server.app):
        if method not in ("GET",) or not params or template.startswith("/static"):
            continue
        if template in ("/call/{token}", "/api/payments/callback/{provider}"):
            continue
        if template.startswith("/book/"):
            continue  # the booking catalogue is public to every patient
        for public_id in (w.ids["live"], w.ids["held"]):
            values["public_id"] = public_id
            path = template.format(**{p: quote(values[p], safe="") for p in params})
            status, _h, body = await send(client, method, path, f"{role} idor", failures)
            if status < 300:
                leaked = [b for b in secret_bits if b in body]
                failures.append(f"{role} GET {path} -> {status}, carries {leaked}")
            elif any(b in body for b in secret_bits if b not in path):  # the URL may be echoed
                failures.append(f"{role} GET {path} -> {status} names another user's records")
    report(failures)


@pytest.mark.parametrize("role", ["other_patient", "other_doctor"])
async def test_another_user_cannot_change_records(world, role):
    """Every unsafe route with real ids and a valid token, as a stranger: refused, nothing moves."""
    w = world
    client = w.clients[role]

    def state(d) -> tuple:
        return (
            [tuple(r) for r in d.execute("SELECT id, status, starts_at, needs_reschedule FROM visits")],
            [tuple(r) for r in d.execute("SELECT id, stored_name FROM reports")],
            [tuple(r) for r in d.execute("SELECT id, status FROM payments")],
            [tuple(r) for r in d.execute("SELECT visit_id, version FROM visit_notes")],
            d.execute("SELECT count(*) FROM prescriptions").fetchone()[0],
        )

    before = w.read(state)
    failures: list[str] = []
    for method, path in unsafe_routes(w):
        if path.startswith(
            ("/login", "/register", "/password/", "/lang", "/verify", "/api/payments/callback")
        ):
            continue  # open to everyone by design
        if path.startswith("/book/hold"):
            continue  # books the stranger's own visit
        kwargs: dict[str, Any] = {"headers": unsafe_headers(w, role)}
        if path.startswith("/api/"):
            kwargs["json"] = {"items": [{"drug": "x"}], "text": "x", "version": 0}
        else:
            kwargs["data"] = {"starts_at": "1", "reason": "x", "action": "pay"}
        status, _h, _b = await send(client, method, path, f"{role} write", failures, **kwargs)
        if status < 400:
            failures.append(f"{role} {method} {path} -> {status}")
    report(failures)
    assert w.read(state) == before


def test_json_deeper_than_any_form_is_refused_before_parsing():
    """Deep nesting never reaches the recursive parser: refused in well under a millisecond a KiB."""
    import time

    from consult.core.forms import json_value

    assert json_value('{"items": [{"drug": "x", "days": 7}], "a": [[1], [2]]}')["a"] == [[1], [2]]
    assert json_value("[" * 32 + "]" * 32)
    for deep in (
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 40 + "1" + "}" * 40,
        "[1, " * 3000 + "1" + "]" * 3000,
    ):
        started = time.perf_counter()
        with pytest.raises(ValueError, match="too deeply"):
            json_value(deep)
        assert time.perf_counter() - started < 1.0
