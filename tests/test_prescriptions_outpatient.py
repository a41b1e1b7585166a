"""The outpatient prescription (门诊处方): its fields and their checks in Chinese, the preview that
signing requires, the PDF whose QR code leads to a page that verifies it, old prescriptions, and
the optional pharmacist review."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import pypdfium2
import pytest
import zxingcpp

from consult.app import create_app
from consult.clinical import signing
from consult.clinical.signing import SIGNING_KEY
from tests.conftest import csrf_of
from tests.test_prescriptions import (
    DOCTOR,
    ITEM,
    OTHER_PATIENT,
    PATIENT,
    build_clinic,
    issue,
    preview,
    run_cli,
    sign_in,
)

PHARMACIST = "yaoshi"
ZH_ITEM = {
    **ITEM,
    "drug": "阿莫西林胶囊",
    "strength": "0.25 g × 24 粒",
    "dose": "0.5",
    "dose_unit": "g",
    "quantity_unit": "盒",
    "instructions": "饭后服用",
}
ZH_HEAD = {"sex": "male", "age": "67", "diagnosis": "急性鼻窦炎", "allergies": "无"}


@pytest.fixture
def clinic(client, settings, make_user):
    c = build_clinic(client, settings, make_user)
    yield c
    c.db.close()


# -- the fields, checked on the server, in the doctor's language ----------------------------------


async def test_missing_diagnosis_is_refused_with_a_clear_chinese_message(clinic):
    token = await sign_in(clinic.client, DOCTOR)
    for diagnosis in ("", "   ", None):
        resp, _ = await preview(
            clinic.client, clinic.public_id, token, [ZH_ITEM], **{**ZH_HEAD, "diagnosis": diagnosis}
        )
        assert resp.status == 400
        body = await resp.json()
        assert body["error"] == "invalid_prescription"
        assert body["message"] == "请填写临床诊断：没有临床诊断不能开具处方。"
        assert body["errors"][0] == {"item": None, "field": "diagnosis", "message": body["message"]}
    # Signing straight away, without a preview, is refused the same way: nothing is written.
    resp = await clinic.client.post(
        f"/api/visits/{clinic.public_id}/prescriptions",
        json={**ZH_HEAD, "diagnosis": "", "items": [ZH_ITEM], "preview_hash": "0" * 64},
        headers={"X-CSRF-Token": token},
    )
    assert resp.status == 400
    assert (await resp.json())["message"] == "请填写临床诊断：没有临床诊断不能开具处方。"
    assert clinic.audit("prescription.issue") == []


@pytest.mark.parametrize(
    ("head", "items", "field", "message"),
    [
        ({"allergies": ""}, [ZH_ITEM], "allergies", "请填写过敏史（无过敏史请填写“无”）。"),
        ({"sex": "x"}, [ZH_ITEM], "sex", "请选择患者性别。"),
        ({"age": 151}, [ZH_ITEM], "age", "请填写患者年龄（整数岁，0 至 150）。"),
        ({"age": "六十"}, [ZH_ITEM], "age", "请填写患者年龄（整数岁，0 至 150）。"),
        ({}, [{**ZH_ITEM, "drug": ""}], "drug", "药品 1：请填写药品名称。"),
        ({}, [ZH_ITEM, {**ZH_ITEM, "route": "drink"}], "route", "药品 2：请选择用法（给药途径）。"),
        ({}, [{**ZH_ITEM, "days": 0}], "days", "药品 1：天数须为 1 至 90 的整数。"),
        ({}, [{**ZH_ITEM, "dose": "-1"}], "dose", "药品 1：单次剂量须为大于 0、不超过 10000 的数字。"),
        ({}, [{**ZH_ITEM, "strength": "x" * 51}], "strength", "药品 1：规格过长（最多 50 个字符）。"),
        ({}, [ZH_ITEM] * 6, None, "一张处方最多开 5 种药品。"),
    ],
)
async def test_every_field_is_checked_with_a_chinese_message(clinic, head, items, field, message):
    token = await sign_in(clinic.client, DOCTOR)
    resp, _ = await preview(clinic.client, clinic.public_id, token, items, **{**ZH_HEAD, **head})
    assert resp.status == 400
    body = await resp.json()
    assert (body["errors"][0]["field"], body["errors"][0]["message"]) == (field, message)


async def test_allergies_none_is_accepted_when_written_explicitly(clinic):
    token = await sign_in(clinic.client, DOCTOR)
    resp = await issue(clinic.client, clinic.public_id, token, [ZH_ITEM], head=ZH_HEAD)
    assert resp.status == 201, await resp.text()
    number = (await resp.json())["prescription"]["number"]
    doc = json.loads(await (await clinic.client.get(f"/prescriptions/{number}.json")).read())["document"]
    assert doc["allergies"] == "无"
    assert doc["patient"]["age"] == 67 and doc["patient"]["sex"] == "male"
    assert doc["department"] == {"name": "呼吸科"}
    assert doc["items"][0]["days"] == 7 and doc["items"][0]["dose"] == "0.5"


# -- preview, then sign -----------------------------------------------------------------------------


async def test_preview_shows_what_is_signed_and_signing_needs_that_preview(clinic):
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    resp, form = await preview(client, clinic.public_id, token, [ZH_ITEM], **ZH_HEAD)
    assert resp.status == 200
    shown = await resp.json()
    html = shown["html"]
    for text in (
        "门诊处方",
        "急性鼻窦炎",
        "阿莫西林胶囊 0.25 g × 24 粒",
        "每次 0.5 g，口服，每日三次（tid），共 7 天；总量 2 盒",
        "饭后服用",
        "男",
        "67 岁",
        "呼吸科",
        "Zhang San",
        "Dr Wang",
        "签名时生成",
    ):
        assert text in html, text
    assert clinic.audit("prescription.issue") == []  # a preview writes nothing

    # No preview hash: refused. A form changed after its preview: refused, nothing signed.
    url = f"/api/visits/{clinic.public_id}/prescriptions"
    headers = {"X-CSRF-Token": token}
    resp = await client.post(url, json=form, headers=headers)
    assert resp.status == 400 and (await resp.json())["error"] == "preview_required"
    changed = {**form, "items": [{**ZH_ITEM, "quantity": 20}], "preview_hash": shown["preview_hash"]}
    resp = await client.post(url, json=changed, headers=headers)
    assert resp.status == 409
    assert (await resp.json())["message"] == "预览后处方内容有改动，请重新预览后再签名。"
    assert clinic.audit("prescription.issue") == []

    # What the server adds is covered too: a patient renamed since the preview is not signed unseen.
    rename = "UPDATE users SET display_name = ? WHERE id = ?"
    clinic.db.write_sync(lambda d: d.execute(rename, ["Zhang Sanfeng", clinic.patient_id]))
    resp = await client.post(url, json={**form, "preview_hash": shown["preview_hash"]}, headers=headers)
    assert resp.status == 409 and (await resp.json())["error"] == "preview_stale"
    clinic.db.write_sync(lambda d: d.execute(rename, ["Zhang San", clinic.patient_id]))

    # Exactly what was previewed: signed and issued.
    resp = await client.post(url, json={**form, "preview_hash": shown["preview_hash"]}, headers=headers)
    assert resp.status == 201
    rx = (await resp.json())["prescription"]
    assert rx["status"] == "issued" and rx["diagnosis"] == "急性鼻窦炎"
    page = await (await client.get(rx["url"])).text()
    for text in ("急性鼻窦炎", "阿莫西林胶囊 0.25 g × 24 粒", rx["number"]):
        assert text in page
    assert len(clinic.audit("prescription.issue")) == 1


# -- the PDF and its QR code ------------------------------------------------------------------------


def decode_pdf_qr(pdf: bytes) -> list[str]:
    document = pypdfium2.PdfDocument(pdf)
    try:
        assert len(document) == 1
        image = document[0].render(scale=3).to_pil()
        text = document[0].get_textpage().get_text_range()
    finally:
        document.close()
    return [r.text for r in zxingcpp.read_barcodes(image)], text


async def test_pdf_qr_code_decodes_to_the_check_page_that_verifies_it(clinic):
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    resp = await issue(
        client, clinic.public_id, token, [ZH_ITEM, {**ZH_ITEM, "drug": "布洛芬缓释胶囊"}], head=ZH_HEAD
    )
    number = (await resp.json())["prescription"]["number"]
    await sign_in(client, PATIENT)
    resp = await client.get(f"/prescriptions/{number}.pdf")
    assert resp.status == 200
    assert resp.content_type == "application/pdf"
    assert resp.headers["Cache-Control"] == "private, no-store"
    pdf = await resp.read()
    assert pdf.startswith(b"%PDF-")
    assert b"STSong-Light" in pdf  # the reader's built-in CID font: nothing downloaded, nothing embedded

    codes, text = decode_pdf_qr(pdf)
    assert len(codes) == 1
    url = urlsplit(codes[0])
    assert url.path == "/verify" and f"number={number}" in url.query
    for words in ("门诊处方", "急性鼻窦炎", "阿莫西林胶囊", "布洛芬缓释胶囊", "过敏史", "无", number):
        assert words in text, words
    assert [e["object_id"] for e in clinic.audit("prescription.pdf")] == [number]

    # Whoever scans it, signed in or not, reaches a page that verifies the prescription.
    client.session.cookie_jar.clear()
    page = await (await client.get(f"{url.path}?{url.query}")).text()
    assert 'data-verdict="valid"' in page
    assert number in page and "急性鼻窦炎" in page and "阿莫西林胶囊" in page

    # Strangers get no PDF.
    await sign_in(client, OTHER_PATIENT)
    assert (await client.get(f"/prescriptions/{number}.pdf")).status == 404


async def test_a_tampered_new_format_file_fails_everywhere(clinic, tmp_path):
    token = await sign_in(clinic.client, DOCTOR)
    resp = await issue(clinic.client, clinic.public_id, token, [ZH_ITEM], head=ZH_HEAD)
    number = (await resp.json())["prescription"]["number"]
    signed = await (await clinic.client.get(f"/prescriptions/{number}.json")).json()
    for change in (
        lambda d: d.update(diagnosis="感冒"),
        lambda d: d.update(allergies="青霉素"),
        lambda d: d["patient"].update(age=7),
        lambda d: d["items"][0].update(route="intravenous"),
        lambda d: d["items"][0].update(days=30),
    ):
        doc = json.loads(json.dumps(signed["document"]))
        change(doc)
        bad = json.dumps({**signed, "document": doc}, ensure_ascii=False)
        assert signing.verify(bad, signing.load_public(clinic.data_dir)).code == "mismatch"
        form_token = await csrf_of(clinic.client, "/verify")
        page = await (
            await clinic.client.post("/verify", data={"document": bad, "csrf_token": form_token})
        ).text()
        assert 'data-verdict="mismatch"' in page
    path = tmp_path / "bad.json"
    path.write_text(bad)
    result = run_cli(clinic.data_dir, "verify", str(path))
    assert result.returncode == 1 and result.stdout.startswith("INVALID")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(signed, ensure_ascii=False))
    result = run_cli(clinic.data_dir, "verify", str(good))
    assert result.returncode == 0 and result.stdout.startswith("VALID")
    assert "diagnosis 急性鼻窦炎" in result.stdout and "阿莫西林胶囊 0.25 g × 24 粒" in result.stdout


async def test_a_prescription_of_the_old_format_still_shows_and_verifies(clinic):
    """Rows written before the outpatient fields keep their document: shown with what they have."""
    key = await clinic.client.app[SIGNING_KEY].get()
    document = {
        "format": "consult-prescription/1",
        "number": "RX-2025-000007",
        "issued_at": "2025-11-02T03:04:05Z",
        "hospital": {"name": "Consult Hospital"},
        "doctor": {"id": clinic.doctor_id, "name": "Dr Wang"},
        "patient": {"id": clinic.patient_id, "name": "Zhang San", "phone": "139****0001"},
        "visit": {"public_id": clinic.public_id},
        "items": [
            {
                "drug": "氨溴索",
                "strength": "30 mg",
                "dose": "1 片",
                "frequency": "每日三次",
                "duration": "5 天",
                "quantity": "15 片",
                "instructions": "",
            }
        ],
    }
    signed = key.sign(document)
    clinic.db.write_sync(
        lambda d: d.execute(
            "INSERT INTO prescriptions (number, visit_id, doctor_id, patient_id, issued_at, document,"
            " signature, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                "RX-2025-000007",
                clinic.visit_id,
                clinic.doctor_id,
                clinic.patient_id,
                time.time(),
                signing.canonical(document).decode(),
                signed["signature"],
                signed["key_id"],
            ],
        )
    )
    await sign_in(clinic.client, PATIENT)
    page = await (await clinic.client.get("/prescriptions/RX-2025-000007")).text()
    assert "氨溴索 30 mg" in page and "1 片 · 每日三次 · 5 天 · 15 片" in page
    assert 'data-testid="rx-verified-mark"' in page
    codes, text = decode_pdf_qr(await (await clinic.client.get("/prescriptions/RX-2025-000007.pdf")).read())
    assert len(codes) == 1 and "氨溴索" in text
    listed = await (await clinic.client.get(f"/api/visits/{clinic.public_id}/prescriptions")).json()
    assert [p["number"] for p in listed["prescriptions"]] == ["RX-2025-000007"]


# -- the pharmacist -------------------------------------------------------------------------------


@pytest.fixture
async def review_clinic(aiohttp_client, make_settings, make_user):
    settings = make_settings(pharmacist_review=True)
    client = await aiohttp_client(create_app(settings))
    c = build_clinic(client, settings, make_user)
    c.pharmacist_id = make_user("pharmacist", PHARMACIST, name="Pharmacist Zhou")
    yield c
    c.db.close()


async def test_pharmacist_approves_or_returns_before_the_patient_sees_it(review_clinic):
    clinic = review_clinic
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    resp = await issue(client, clinic.public_id, token, [ZH_ITEM], head=ZH_HEAD)
    assert resp.status == 201
    first = (await resp.json())["prescription"]
    assert first["status"] == "pending" and first["status_label"] == "等待药师审核"
    resp = await issue(client, clinic.public_id, token, [{**ZH_ITEM, "drug": "氯雷他定片"}], head=ZH_HEAD)
    second = (await resp.json())["prescription"]

    # Waiting: the patient sees neither, and a scan of the paper says it is not valid yet.
    await sign_in(client, PATIENT)
    listed = await (await client.get(f"/api/visits/{clinic.public_id}/prescriptions")).json()
    assert listed["prescriptions"] == []
    home = await (await client.get("/patient")).text()
    assert first["number"] not in home and second["number"] not in home
    assert (await client.get(first["url"])).status == 404
    assert (await client.get(first["pdf_url"])).status == 404
    # Doctors cannot review, nor can patients.
    assert (await client.get("/pharmacy")).status == 403
    await sign_in(client, DOCTOR)
    assert (await client.get("/pharmacy")).status == 403
    resp = await client.post(
        f"/pharmacy/{first['number']}", data={"decision": "approve", "csrf_token": await csrf_of(client, "/")}
    )
    assert resp.status == 403

    # The pharmacist's queue, oldest first.
    await sign_in(client, PHARMACIST)
    resp = await client.get("/pharmacy")
    page = await resp.text()
    assert resp.status == 200
    assert page.index(first["number"]) < page.index(second["number"])
    assert "急性鼻窦炎" in page and "阿莫西林胶囊" in page and "氯雷他定片" in page
    token = await csrf_of(client, "/pharmacy")
    # CSRF is required; a return needs a reason.
    resp = await client.post(f"/pharmacy/{second['number']}", data={"decision": "return"})
    assert resp.status == 403
    resp = await client.post(
        f"/pharmacy/{second['number']}", data={"decision": "return", "reason": " ", "csrf_token": token}
    )
    assert resp.status == 400 and "请填写退回处方的理由" in await resp.text()
    resp = await client.post(
        f"/pharmacy/{second['number']}",
        data={"decision": "return", "reason": "与阿莫西林重复，请核对", "csrf_token": token},
        allow_redirects=False,
    )
    assert resp.status == 303
    resp = await client.post(
        f"/pharmacy/{first['number']}",
        data={"decision": "approve", "csrf_token": token},
        allow_redirects=False,
    )
    assert resp.status == 303
    resp = await client.post(
        f"/pharmacy/{first['number']}", data={"decision": "approve", "csrf_token": token}
    )
    assert resp.status == 409  # reviewed once
    page = await (await client.get("/pharmacy")).text()
    assert 'data-testid="pharmacy-empty"' in page and "与阿莫西林重复" in page

    # The doctor sees the return and its reason; the patient sees only the approved one.
    await sign_in(client, DOCTOR)
    listed = await (await client.get(f"/api/visits/{clinic.public_id}/prescriptions")).json()
    states = {p["number"]: (p["status"], p["review_note"]) for p in listed["prescriptions"]}
    assert states == {
        first["number"]: ("issued", ""),
        second["number"]: ("returned", "与阿莫西林重复，请核对"),
    }
    await sign_in(client, PATIENT)
    listed = await (await client.get(f"/api/visits/{clinic.public_id}/prescriptions")).json()
    assert [p["number"] for p in listed["prescriptions"]] == [first["number"]]
    assert (await client.get(first["url"])).status == 200
    assert (await client.get(second["url"])).status == 404
    home = await (await client.get("/patient")).text()
    assert first["number"] in home and second["number"] not in home

    # Audited, with who and why.
    looks = clinic.audit("prescription.review_queue")
    assert looks and {e["actor_id"] for e in looks} == {clinic.pharmacist_id}
    assert first["number"] in json.loads(looks[0]["detail"])["numbers"]
    approve = clinic.audit("prescription.approve")
    returned = clinic.audit("prescription.return")
    assert [(e["actor_id"], e["actor_role"], e["object_id"]) for e in approve] == [
        (clinic.pharmacist_id, "pharmacist", first["number"])
    ]
    assert [(e["object_id"], json.loads(e["detail"])["reason"]) for e in returned] == [
        (second["number"], "与阿莫西林重复，请核对")
    ]


# -- migration 0018 ---------------------------------------------------------------------------------


@pytest.mark.sqlite_only("a migration of an old SQLite file")
def test_migration_0018_keeps_old_prescriptions_issued_and_admits_pharmacists(tmp_path):
    """A database at 0017 with a prescription and sessions: after 0018 the row is issued, the
    sessions survive (no cascade from rebuilding users) and a pharmacist account can be made."""
    import sqlite3

    from consult.core import migrations
    from consult.core.db import Database

    path = tmp_path / "old.db"
    db = Database(path)
    try:
        db.write_sync(migrations._ensure_table)
        for name, fn in migrations.MIGRATIONS:
            if name.startswith("0018"):
                break

            def step(d, fn=fn, name=name) -> None:
                fn(d)
                d.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, 0)", [name])

            db.write_sync(step)

        def old_rows(d) -> None:
            for i, role in enumerate(("patient", "doctor")):
                d.execute(
                    "INSERT INTO users (id, role, username, display_name, password_hash, created,"
                    " password_changed) VALUES (?, ?, ?, 'x', 'h', 0, 0)",
                    [i + 1, role, f"u{i}"],
                )
            d.execute("INSERT INTO sessions (token_hash, user_id, created, last_seen) VALUES ('t', 1, 0, 0)")
            d.execute("INSERT INTO departments (code, name_zh, name_en) VALUES ('x', '内科', 'Medicine')")
            d.execute("INSERT INTO doctors (user_id) VALUES (2)")
            d.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, fee_minor, currency, created, updated, call_nonce)"
                " VALUES ('v', 1, 2, 1, 0, 900, 'completed', 0, 'CNY', 0, 0, 'n')"
            )
            d.execute(
                "INSERT INTO prescriptions (number, visit_id, doctor_id, patient_id, issued_at, document,"
                " signature, key_id) VALUES ('RX-2025-000001', 1, 2, 1, 0, '{}', 's', 'k')"
            )

        db.write_sync(old_rows)
        with pytest.raises(sqlite3.IntegrityError):
            db.write_sync(lambda d: d.execute(
                "INSERT INTO users (role, username, display_name, password_hash, created, password_changed)"
                " VALUES ('pharmacist', 'ph', 'P', 'h', 0, 0)"))  # fmt: skip
    finally:
        db.close()

    assert "0018_prescription_review" in migrations.migrate(path)
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT status, reviewed_by, review_note FROM prescriptions").fetchone()
        assert row == ("issued", None, None)
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1
        conn.execute(
            "INSERT INTO users (role, username, display_name, password_hash, created, password_changed)"
            " VALUES ('pharmacist', 'ph', 'P', 'h', 0, 0)"
        )
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO users (role, username, display_name, password_hash, created, password_changed)"
                " VALUES ('nurse', 'n', 'N', 'h', 0, 0)"
            )
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def test_the_consult_room_lists_earlier_prescriptions_in_words(review_clinic):
    """The next doctor reads what the patient was given: approved ones, worded, not codes."""
    clinic = review_clinic
    client = clinic.client
    earlier = clinic.add_visit(status="completed", starts_in=-86400)
    token = await sign_in(client, DOCTOR)
    given = (await (await issue(client, earlier, token, [ZH_ITEM], head=ZH_HEAD)).json())["prescription"]
    other = {**ZH_ITEM, "drug": "氯雷他定片"}
    returned = (await (await issue(client, earlier, token, [other], head=ZH_HEAD)).json())["prescription"]
    await sign_in(client, PHARMACIST)
    token = await csrf_of(client, "/pharmacy")
    for number, data in (
        (given["number"], {"decision": "approve"}),
        (returned["number"], {"decision": "return", "reason": "重复"}),
    ):
        resp = await client.post(
            f"/pharmacy/{number}", data={**data, "csrf_token": token}, allow_redirects=False
        )
        assert resp.status == 303
    await sign_in(client, DOCTOR)
    page = await (await client.get(f"/doctor/visits/{clinic.public_id}/room")).text()
    assert given["number"] in page
    assert "阿莫西林胶囊 0.25 g × 24 粒 · 每次 0.5 g，口服，每日三次（tid），共 7 天；总量 2 盒" in page
    assert returned["number"] not in page and "氯雷他定片" not in page


async def test_the_doctors_visit_page_gives_sex_and_age_from_the_prescription_in_words(clinic):
    """The doctor's own view of a visit reads the patient's sex and age off the latest
    prescription, in the reader's language ("男", not the stored code "male")."""
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    resp = await issue(client, clinic.public_id, token, [ZH_ITEM], head=ZH_HEAD)
    assert resp.status == 201, await resp.text()
    page = await (await client.get(f"/visits/{clinic.public_id}")).text()
    assert 'data-testid="patient-sex">男<' in page, page[page.find("patient-sex") - 200 :][:400]
    assert 'data-testid="patient-age">67<' in page
    assert ">male<" not in page
