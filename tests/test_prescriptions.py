"""Prescriptions: issue, numbering, access, printable page, signed file and its verification."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consult.clinical import signing
from consult.clinical.signing import SIGNING_KEY
from consult.core.db import Database
from consult.core.engine import open_database
from tests.conftest import csrf_of, login

PATIENT, OTHER_PATIENT = "13900000001", "13900000002"
DOCTOR, OTHER_DOCTOR, ADMIN = "drwang", "drli", "clerk"
ROOT = Path(__file__).resolve().parent.parent

ITEM = {
    "drug": "Amoxicillin",
    "strength": "0.25 g x 24",
    "dose": "0.5",
    "dose_unit": "g",
    "route": "oral",
    "frequency": "tid",
    "days": 7,
    "quantity": 2,
    "quantity_unit": "box",
    "instructions": "After meals.\nFinish the course.",
}
HEAD = {"sex": "female", "age": 45, "diagnosis": "Acute sinusitis", "allergies": "Penicillin: none known"}


@dataclass
class Clinic:
    client: object
    db: Database
    data_dir: Path
    visit_id: int
    public_id: str
    patient_id: int
    doctor_id: int
    other_patient_id: int
    other_doctor_id: int
    admin_id: int

    def add_visit(
        self, *, status: str = "confirmed", starts_in: float = 0, doctor_id: int | None = None
    ) -> str:
        public_id = secrets.token_urlsafe(12)
        starts = int(time.time() + starts_in)
        now = time.time()
        self.db.write_sync(
            lambda d: d.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, fee_minor, currency, created, updated, call_nonce)"
                " VALUES (?, ?, ?, 1, ?, ?, ?, 5000, 'CNY', ?, ?, 'nonce')",
                [
                    public_id,
                    self.patient_id,
                    doctor_id or self.doctor_id,
                    starts,
                    starts + 900,
                    status,
                    now,
                    now,
                ],
            )
        )
        return public_id

    def audit(self, action: str) -> list[dict]:
        return self.db.read_sync(
            lambda d: [
                dict(r) for r in d.execute("SELECT * FROM audit_log WHERE action = ? ORDER BY id", [action])
            ]
        )


def build_clinic(client, settings, make_user) -> Clinic:
    """A department, two doctors, two patients, an admin and one confirmed visit happening now."""
    patient = make_user("patient", PATIENT, name="Zhang San")
    other_patient = make_user("patient", OTHER_PATIENT, name="Li Si")
    doctor = make_user("doctor", DOCTOR, name="Dr Wang")
    other_doctor = make_user("doctor", OTHER_DOCTOR, name="Dr Li")
    admin = make_user("admin", ADMIN, name="Clerk")
    db = open_database(settings)

    def write(d) -> None:
        d.execute("INSERT INTO departments (code, name_zh, name_en) VALUES ('resp', '呼吸科', 'Respiratory')")
        for doc in (doctor, other_doctor):
            d.execute("INSERT INTO doctors (user_id) VALUES (?)", [doc])

    db.write_sync(write)
    clinic = Clinic(client, db, settings.data_dir, 0, "", patient, doctor, other_patient, other_doctor, admin)
    clinic.public_id = clinic.add_visit(starts_in=-60)
    clinic.visit_id = db.read_sync(
        lambda d: d.execute("SELECT id FROM visits WHERE public_id = ?", [clinic.public_id]).fetchone()[0]
    )
    return clinic


@pytest.fixture
def clinic(client, settings, make_user):
    c = build_clinic(client, settings, make_user)
    yield c
    c.db.close()


async def sign_in(client, identifier: str) -> str:
    """Become ``identifier`` on this client; returns a CSRF token for headers."""
    client.session.cookie_jar.clear()
    await login(client, identifier)
    return await csrf_of(client, "/")


async def preview(client, public_id: str, token: str, items=None, **head):
    form = {**HEAD, **head, "items": [ITEM] if items is None else items}
    resp = await client.post(
        f"/api/visits/{public_id}/prescriptions/preview", json=form, headers={"X-CSRF-Token": token}
    )
    return resp, form


async def issue(client, public_id: str, token: str, items=None, head=None, **extra):
    """What the doctor's page does: preview, then sign what the preview showed."""
    resp, form = await preview(client, public_id, token, items, **(head or {}))
    if resp.status != 200:
        return resp
    seen = (await resp.json())["preview_hash"]
    return await client.post(
        f"/api/visits/{public_id}/prescriptions",
        json={**form, "preview_hash": seen, **extra},
        headers={"X-CSRF-Token": token},
    )


async def issued_number(clinic: Clinic) -> str:
    token = await sign_in(clinic.client, DOCTOR)
    resp = await issue(clinic.client, clinic.public_id, token)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["prescription"]["number"]


def run_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSULT_")}
    return subprocess.run(
        [sys.executable, "-m", "consult", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


# -- issue and verify ----------------------------------------------------------------------------


@pytest.mark.locale("en")  # its prescription is written in English
async def test_issue_download_and_verify_everywhere(clinic, tmp_path):
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    resp = await issue(
        client, clinic.public_id, token, items=[ITEM, {**ITEM, "drug": "布洛芬", "instructions": ""}]
    )
    assert resp.status == 201, await resp.text()
    rx = (await resp.json())["prescription"]
    number = rx["number"]
    assert re.fullmatch(r"RX-\d{4}-000001", number)
    assert [i["drug"] for i in rx["items"]] == ["Amoxicillin", "布洛芬"]

    resp = await client.get(f"/prescriptions/{number}.json")
    assert resp.status == 200
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{number}.json"'
    raw = await resp.read()
    signed = json.loads(raw)
    assert set(signed) == {"document", "signature", "key_id"}
    doc = signed["document"]
    assert doc["number"] == number
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["issued_at"])
    assert doc["hospital"]["name"] == "Consult Hospital"
    assert doc["doctor"] == {"id": clinic.doctor_id, "name": "Dr Wang"}
    assert doc["format"] == "consult-prescription/2"
    assert doc["patient"] == {
        "id": clinic.patient_id,
        "name": "Zhang San",
        "phone": "139****0001",
        "sex": "female",
        "age": 45,
    }
    assert doc["department"] == {"name": "Respiratory"}
    assert (doc["diagnosis"], doc["allergies"]) == ("Acute sinusitis", "Penicillin: none known")
    assert doc["visit"] == {"public_id": clinic.public_id}
    assert doc["items"][0] == ITEM

    # The key on disk: private 0600, public exported next to it, same fingerprint as the file.
    priv, pub = signing.key_paths(clinic.data_dir)
    assert priv.stat().st_mode & 0o777 == 0o600
    public = signing.PublicKey.from_pem(pub.read_bytes())
    assert signed["key_id"] == public.key_id
    assert signing.verify(raw, public).valid

    # The public verification page, anonymously.
    client.session.cookie_jar.clear()
    token = await csrf_of(client, "/verify")
    resp = await client.post("/verify", data={"document": raw.decode(), "csrf_token": token})
    page = await resp.text()
    assert resp.status == 200
    assert 'data-verdict="valid"' in page
    assert number in page and "Amoxicillin" in page

    # The key a pharmacy downloads verifies the file offline.
    resp = await client.get("/verify/key")
    assert resp.status == 200
    offline = signing.PublicKey.from_pem(await resp.read())
    assert offline.key_id == public.key_id == resp.headers["X-Key-Id"]

    # And the command line, against the data directory's key, exits 0.
    path = tmp_path / f"{number}.json"
    path.write_bytes(raw)
    result = run_cli(clinic.data_dir, "verify", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("VALID") and number in result.stdout
    # ... and against the downloaded PEM.
    pem = tmp_path / "key.pem"
    pem.write_bytes(offline.pem)
    assert run_cli(tmp_path / "elsewhere", "verify", "--key", str(pem), str(path)).returncode == 0

    entries = clinic.audit("prescription.issue")
    assert [(e["actor_id"], e["object_id"], e["subject_user_id"]) for e in entries] == [
        (clinic.doctor_id, number, clinic.patient_id)
    ]


def tamper_document(signed: dict) -> dict:
    doc = json.loads(json.dumps(signed["document"]))
    doc["items"][0]["quantity"] = 20
    return {**signed, "document": doc}


def tamper_signature(signed: dict) -> dict:
    sig = bytearray(base64.b64decode(signed["signature"]))
    sig[10] ^= 0x01
    return {**signed, "signature": base64.b64encode(bytes(sig)).decode()}


def other_key(signed: dict) -> dict:
    stranger = Ed25519PrivateKey.generate()
    pub = stranger.public_key()
    key = signing.HospitalKey(stranger, signing.PublicKey(pub, signing.key_id(pub)))
    return key.sign(signed["document"])


def other_key_claiming_ours(signed: dict) -> dict:
    return {**other_key(signed), "key_id": signed["key_id"]}


@pytest.mark.parametrize(
    ("tamper", "code", "reason"),
    [
        (tamper_document, "mismatch", "changed after signing"),
        (tamper_signature, "mismatch", "changed after signing"),
        (other_key, "other_key", "signed with another key"),
        (other_key_claiming_ours, "mismatch", "not signed by this hospital"),
        (lambda s: {**s, "signature": "not base64!"}, "bad_signature", "not valid base64"),
        (lambda s: {**s, "signature": base64.b64encode(b"short").decode()}, "bad_signature", "wrong length"),
        (lambda s: {"document": s["document"]}, "bad_format", "not a signed prescription"),
    ],
)
@pytest.mark.locale("en")  # asserts English texts
async def test_tampered_files_are_invalid_with_a_reason(clinic, tmp_path, tamper, code, reason):
    number = await issued_number(clinic)
    resp = await clinic.client.get(f"/prescriptions/{number}.json")
    bad = json.dumps(tamper(await resp.json()), ensure_ascii=False)

    verdict = signing.verify(bad, signing.load_public(clinic.data_dir))
    assert (verdict.valid, verdict.code) == (False, code)
    assert reason in verdict.reason

    token = await csrf_of(clinic.client, "/verify")
    page = await (await clinic.client.post("/verify", data={"document": bad, "csrf_token": token})).text()
    assert f'data-verdict="{code}"' in page
    assert reason in page
    assert "Amoxicillin" not in page and "Zhang San" not in page  # nothing echoed from a bad file

    path = tmp_path / "bad.json"
    path.write_text(bad)
    result = run_cli(clinic.data_dir, "verify", str(path))
    assert result.returncode == 1
    assert result.stdout.startswith("INVALID:") and reason in result.stdout


@pytest.mark.locale("en")  # asserts English texts
async def test_verify_rejects_garbage_and_cli_reports_missing_key(clinic, tmp_path):
    token = await csrf_of(clinic.client, "/verify")
    page = await (await clinic.client.post("/verify", data={"document": "{oops", "csrf_token": token})).text()
    assert 'data-verdict="not_json"' in page
    resp = await clinic.client.post("/verify", data={"document": "  ", "csrf_token": token})
    assert resp.status == 400
    path = tmp_path / "x.json"
    path.write_text("{}")
    result = run_cli(tmp_path / "empty-data", "verify", str(path))
    assert result.returncode == 2 and "no prescription signing key" in result.stderr


async def test_numbers_are_unique_and_increasing_under_concurrent_issue(clinic):
    token = await sign_in(clinic.client, DOCTOR)
    responses = await asyncio.gather(*(issue(clinic.client, clinic.public_id, token) for _ in range(12)))
    assert [r.status for r in responses] == [201] * 12
    numbers = [(await r.json())["prescription"]["number"] for r in responses]
    assert len(set(numbers)) == 12
    seqs = sorted(int(n.rsplit("-", 1)[1]) for n in numbers)
    assert seqs == list(range(1, 13))
    rows = clinic.db.read_sync(
        lambda d: d.execute("SELECT number, issued_at FROM prescriptions ORDER BY id").fetchall()
    )
    # Row order, issue time and number order agree: numbers increase in issue order.
    assert [r[0] for r in rows] == sorted(numbers)
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)


async def test_a_retried_submission_returns_the_first_prescription(clinic):
    token = await sign_in(clinic.client, DOCTOR)
    ref = "8f5c2a1e-6d3b-4c1a-9b7e-2f0d1c3a4b5c"
    first = await issue(clinic.client, clinic.public_id, token, client_ref=ref)
    again = await issue(clinic.client, clinic.public_id, token, client_ref=ref)
    assert (first.status, again.status) == (201, 200)
    assert (await first.json())["prescription"]["number"] == (await again.json())["prescription"]["number"]
    assert len(clinic.audit("prescription.issue")) == 1
    resp = await issue(clinic.client, clinic.public_id, token, client_ref="../../etc")
    assert resp.status == 400


# -- who may issue ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "status"), [(OTHER_DOCTOR, 404), (PATIENT, 403), (OTHER_PATIENT, 404), (ADMIN, 403)]
)
async def test_only_the_visits_doctor_may_issue(clinic, who, status):
    token = await sign_in(clinic.client, who)
    resp = await issue(clinic.client, clinic.public_id, token)
    assert resp.status == status, await resp.text()
    assert clinic.audit("prescription.issue") == []


async def test_issue_needs_sign_in_csrf_and_an_open_visit(clinic):
    client = clinic.client
    client.session.cookie_jar.clear()
    resp = await issue(client, clinic.public_id, "x")
    assert resp.status in (401, 403)
    await sign_in(client, DOCTOR)
    resp = await client.post(f"/api/visits/{clinic.public_id}/prescriptions", json={"items": [ITEM]})
    assert resp.status == 403 and (await resp.json())["error"] == "csrf"
    token = await csrf_of(client, "/")
    for status in ("held", "cancelled"):
        resp = await issue(client, clinic.add_visit(status=status, starts_in=3600), token)
        assert resp.status == 409, status
    resp = await issue(client, "no-such-visit", token)
    assert resp.status == 404


@pytest.mark.parametrize(
    ("items", "field", "fragment"),
    [
        ([{**ITEM, "drug": "  "}], "drug", "enter the drug name"),
        ([{**ITEM, "dose": ""}], "dose", "the dose must be a number greater than 0"),
        ([{**ITEM, "dose": "0"}], "dose", "the dose must be a number greater than 0"),
        ([{**ITEM, "dose": "1e3"}], "dose", "the dose must be a number greater than 0"),
        ([ITEM, {**ITEM, "quantity": None}], "quantity", "Medicine 2: the total quantity must be a whole"),
        ([{**ITEM, "quantity": 10000}], "quantity", "from 1 to 9999"),
        ([{**ITEM, "days": 91}], "days", "from 1 to 90"),
        ([{**ITEM, "days": 2.5}], "days", "from 1 to 90"),
        ([{**ITEM, "drug": "x" * 101}], "drug", "too long"),
        ([{**ITEM, "strength": ["bid"]}], "strength", "must be text"),
        ([{**ITEM, "frequency": "thrice"}], "frequency", "choose how often"),
        ([{**ITEM, "route": ""}], "route", "choose the route"),
        ([{**ITEM, "drug": "Aspirin\x07"}], "drug", "cannot be printed"),
    ],
)
@pytest.mark.locale("en")  # asserts English texts
async def test_invalid_items_are_refused_with_clear_messages(clinic, items, field, fragment):
    token = await sign_in(clinic.client, DOCTOR)
    resp = await issue(clinic.client, clinic.public_id, token, items=items)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid_prescription"
    assert fragment in body["message"]
    assert body["errors"][0]["field"] == field


@pytest.mark.parametrize("items", [[], "Aspirin", [ITEM] * 6])
async def test_empty_or_oversized_prescriptions_are_refused(clinic, items):
    token = await sign_in(clinic.client, DOCTOR)
    resp = await issue(clinic.client, clinic.public_id, token, items=items)
    assert resp.status == 400
    assert (await resp.json())["message"]


# -- who may read --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "status"),
    [(PATIENT, 200), (DOCTOR, 200), (ADMIN, 200), (OTHER_PATIENT, 404), (OTHER_DOCTOR, 404)],
)
@pytest.mark.locale("en")  # its prescription is written in English
async def test_printable_page_and_file_access(clinic, who, status):
    number = await issued_number(clinic)
    await sign_in(clinic.client, who)
    for path in (f"/prescriptions/{number}", f"/prescriptions/{number}.json"):
        resp = await clinic.client.get(path)
        assert resp.status == status, path
    if status == 200:
        views = clinic.audit("prescription.view")
        assert [(v["object_id"], v["subject_user_id"]) for v in views] == [(number, clinic.patient_id)]
        assert len(clinic.audit("prescription.download")) == 1
    else:
        assert clinic.audit("prescription.view") == []


@pytest.mark.locale("en")  # its prescription is written in English
async def test_printable_page_shows_signature_and_verification_link(clinic):
    number = await issued_number(clinic)
    await sign_in(clinic.client, PATIENT)
    resp = await clinic.client.get(f"/prescriptions/{number}")
    page = await resp.text()
    row = clinic.db.read_sync(
        lambda d: d.execute(
            "SELECT signature, key_id FROM prescriptions WHERE number = ?", [number]
        ).fetchone()
    )
    # The patient sees a "verified" mark and a link to the public check page, never the raw bytes.
    assert row["signature"] not in page and row["key_id"] not in page
    assert 'data-testid="rx-verified-mark"' in page and "Verified" in page
    assert "print.css" in page and 'data-testid="rx-qr"' in page and "data:image/svg+xml;base64," in page
    m = re.search(r'href="([^"]+)" data-testid="rx-verify-link"', page)
    assert m
    url = m.group(1).replace("&amp;", "&")
    assert f"/verify?number={number}&code=" in url
    # The doctor (staff) can still read the signature itself.
    await sign_in(clinic.client, DOCTOR)
    page = await (await clinic.client.get(f"/prescriptions/{number}")).text()
    assert row["signature"] in page and row["key_id"] in page

    # Scanning the paper's code (anonymously) confirms it, showing only what the paper shows.
    clinic.client.session.cookie_jar.clear()
    path = url[url.index("/verify") :]
    page = await (await clinic.client.get(path)).text()
    assert 'data-verdict="valid"' in page and number in page
    assert [e["remote"] is not None for e in clinic.audit("prescription.verify")] == [True]
    wrong = path[:-4] + "0000"
    page = await (await clinic.client.get(wrong)).text()
    assert 'data-verdict="not_found"' in page and "Amoxicillin" not in page


async def test_visit_list_shows_prescriptions_and_advice_to_the_patient(clinic):
    number = await issued_number(clinic)
    token = await csrf_of(clinic.client, "/")
    resp = await clinic.client.put(
        f"/api/visits/{clinic.public_id}/notes",
        json={
            "text": "Chest clear. Suspect dental origin.",
            "advice": "Drink plenty of water.",
            "version": 0,
        },
        headers={"X-CSRF-Token": token},
    )
    assert resp.status == 200
    await sign_in(clinic.client, PATIENT)
    resp = await clinic.client.get(f"/api/visits/{clinic.public_id}/prescriptions")
    body = await resp.json()
    assert [p["number"] for p in body["prescriptions"]] == [number]
    assert body["prescriptions"][0]["url"] == f"/prescriptions/{number}"
    assert body["advice"] == "Drink plenty of water."
    assert body["can_issue"] is False
    assert "dental" not in await resp.text()  # the clinical note stays with the doctors
    await sign_in(clinic.client, OTHER_PATIENT)
    assert (await clinic.client.get(f"/api/visits/{clinic.public_id}/prescriptions")).status == 404


async def test_list_helpers(clinic):
    from consult.clinical import prescriptions

    first = await issued_number(clinic)
    second_visit = clinic.add_visit(status="completed", starts_in=-86400)
    token = await csrf_of(clinic.client, "/")
    resp = await issue(clinic.client, second_visit, token)
    second = (await resp.json())["prescription"]["number"]
    db = clinic.db
    assert [p.number for p in await prescriptions.list_for_visit(db, clinic.visit_id)] == [first]
    mine = await prescriptions.list_for_patient(db, clinic.patient_id)
    assert [p.number for p in mine] == [second, first]  # newest first
    assert mine[0].items[0]["drug"] == "Amoxicillin"
    assert await prescriptions.list_for_patient(db, clinic.other_patient_id) == []


# -- the key -------------------------------------------------------------------------------------


def test_key_is_created_once_and_reused(tmp_path):
    first = signing.load_or_create(tmp_path)
    again = signing.load_or_create(tmp_path)
    assert first.key_id == again.key_id
    priv, pub = signing.key_paths(tmp_path)
    assert priv.stat().st_mode & 0o777 == 0o600
    assert (priv.parent.stat().st_mode & 0o777) == 0o700
    assert pub.read_bytes() == first.public.pem
    pub.write_text("garbage")  # a damaged export is rewritten from the private key
    assert signing.load_or_create(tmp_path).key_id == first.key_id
    assert signing.load_public(tmp_path).key_id == first.key_id
    signed = first.sign({"number": "RX-2026-000001", "items": [{"drug": "药"}]})
    assert signing.verify(json.dumps(signed, indent=4, ensure_ascii=True), again.public).valid
    with pytest.raises(TypeError):
        signing.canonical({"dose": 0.5})


async def test_key_survives_an_app_restart(aiohttp_client, settings):
    from consult.app import create_app

    ids = []
    for _ in range(2):
        client = await aiohttp_client(create_app(settings))
        ids.append((await client.app[SIGNING_KEY].get()).key_id)
        await client.close()
    assert ids[0] == ids[1]


async def test_verification_page_speaks_chinese(clinic):
    resp = await clinic.client.get("/verify", headers={"Accept-Language": "zh-CN"})
    page = await resp.text()
    assert resp.status == 200
    assert "核验处方" in page and "下载公钥（PEM）" in page
    assert signing.load_public(clinic.data_dir).key_id in page
