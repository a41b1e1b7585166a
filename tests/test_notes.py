"""Visit notes: autosave with optimistic concurrency, who may write, earlier visits, audit."""

from __future__ import annotations

import json

import pytest

from consult.clinical import notes
from tests.test_prescriptions import ADMIN, DOCTOR, ITEM, OTHER_DOCTOR, OTHER_PATIENT, PATIENT, issue, sign_in


@pytest.fixture
def clinic(client, settings, make_user):
    from tests.test_prescriptions import build_clinic

    c = build_clinic(client, settings, make_user)
    yield c
    c.db.close()


async def put(client, public_id: str, token: str | None, body: dict):
    headers = {"X-CSRF-Token": token} if token else {}
    return await client.put(f"/api/visits/{public_id}/notes", json=body, headers=headers)


async def test_autosave_versions_and_stale_save(clinic):
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    url = f"/api/visits/{clinic.public_id}/notes"
    body = await (await client.get(url)).json()
    assert body["note"] == {"text": "", "advice": "", "version": 0, "updated": None}
    assert body["editable"] is True and body["earlier"] == []

    resp = await put(client, clinic.public_id, token, {"text": "Cough 3 days.", "version": 0})
    assert resp.status == 200
    assert (await resp.json())["note"]["version"] == 1
    resp = await put(client, clinic.public_id, token, {"text": "Cough 3 days. No fever.", "version": 1})
    assert (await resp.json())["note"]["version"] == 2

    # A second window still at version 1 must not overwrite version 2.
    resp = await put(client, clinic.public_id, token, {"text": "Old tab text", "version": 1})
    assert resp.status == 409
    stale = await resp.json()
    assert stale["error"] == "stale_version"
    assert stale["current"]["version"] == 2 and stale["current"]["text"] == "Cough 3 days. No fever."

    # Saving the same text again is not a new version (autosave after a no-op keystroke).
    resp = await put(client, clinic.public_id, token, {"text": "Cough 3 days. No fever.", "version": 2})
    assert (await resp.json())["note"]["version"] == 2

    # Advice is kept when a save leaves it out, replaced when given.
    resp = await put(client, clinic.public_id, token, {"text": "x", "advice": "Rest.", "version": 2})
    resp = await put(client, clinic.public_id, token, {"text": "y", "version": 3})
    note = (await resp.json())["note"]
    assert (note["text"], note["advice"], note["version"]) == ("y", "Rest.", 4)

    entries = clinic.audit("note.update")
    assert [json.loads(e["detail"])["version"] for e in entries] == [1, 2, 3, 4]
    assert all(
        e["actor_id"] == clinic.doctor_id and e["subject_user_id"] == clinic.patient_id for e in entries
    )
    assert all("Cough" not in e["detail"] for e in entries)  # no clinical text in the audit trail


@pytest.mark.parametrize(
    ("who", "status"), [(OTHER_DOCTOR, 404), (PATIENT, 403), (OTHER_PATIENT, 404), (ADMIN, 403)]
)
async def test_only_the_visits_doctor_reads_and_writes_notes(clinic, who, status):
    token = await sign_in(clinic.client, DOCTOR)
    await put(clinic.client, clinic.public_id, token, {"text": "Private clinical note", "version": 0})
    token = await sign_in(clinic.client, who)
    resp = await clinic.client.get(f"/api/visits/{clinic.public_id}/notes")
    assert resp.status == status
    assert "Private clinical note" not in await resp.text()
    resp = await put(clinic.client, clinic.public_id, token, {"text": "overwrite", "version": 1})
    assert resp.status == status
    row = clinic.db.read_sync(lambda d: d.execute("SELECT text, version FROM visit_notes").fetchone())
    assert tuple(row) == ("Private clinical note", 1)


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"text": "x" * (notes.MAX_TEXT + 1), "version": 0}, 400, "note_too_long"),
        ({"text": "ok", "advice": "a" * (notes.MAX_ADVICE + 1), "version": 0}, 400, "note_too_long"),
        ({"text": "no version"}, 400, "bad_version"),
        ({"text": "bad", "version": "1"}, 400, "bad_version"),
        ({"text": 42, "version": 0}, 400, "bad_note"),
    ],
)
async def test_malformed_saves_are_refused(clinic, body, status, error):
    token = await sign_in(clinic.client, DOCTOR)
    resp = await put(clinic.client, clinic.public_id, token, body)
    assert resp.status == status
    assert (await resp.json())["error"] == error


async def test_longest_note_is_accepted(clinic):
    token = await sign_in(clinic.client, DOCTOR)
    resp = await put(clinic.client, clinic.public_id, token, {"text": "字" * notes.MAX_TEXT, "version": 0})
    assert resp.status == 200


async def test_saves_need_csrf_and_json_and_an_open_visit(clinic):
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    resp = await put(client, clinic.public_id, None, {"text": "x", "version": 0})
    assert resp.status == 403
    resp = await client.put(
        f"/api/visits/{clinic.public_id}/notes", data="text=x", headers={"X-CSRF-Token": token}
    )
    assert resp.status == 415
    held = clinic.add_visit(status="held", starts_in=7200)
    resp = await put(client, held, token, {"text": "x", "version": 0})
    assert resp.status == 409
    assert (await (await client.get(f"/api/visits/{held}/notes")).json())["editable"] is False


async def test_earlier_visits_carry_notes_and_prescriptions(clinic):
    client = clinic.client
    token = await sign_in(client, DOCTOR)
    earlier = clinic.add_visit(status="completed", starts_in=-30 * 86400)
    await put(client, earlier, token, {"text": "Asthma, mild.", "advice": "Use the inhaler.", "version": 0})
    number = (await (await issue(client, earlier, token, items=[ITEM])).json())["prescription"]["number"]
    clinic.add_visit(status="cancelled", starts_in=-10 * 86400)  # cancelled visits are not history

    body = await (await client.get(f"/api/visits/{clinic.public_id}/notes")).json()
    assert [(e["public_id"], e["text"], e["advice"]) for e in body["earlier"]] == [
        (earlier, "Asthma, mild.", "Use the inhaler.")
    ]
    assert body["earlier"][0]["doctor_name"] == "Dr Wang"
    assert body["earlier"][0]["prescriptions"] == [
        {"number": number, "items": [ITEM], "url": f"/prescriptions/{number}"}
    ]
    reads = clinic.audit("note.view")
    assert json.loads(reads[-1]["detail"]) == {"earlier_visits": 1}


@pytest.mark.parametrize(("role", "shown"), [("doctor", True), ("patient", False)])
async def test_partials_render_for_the_doctor_only(clinic, role, shown):
    """The consult room includes the partials with a ``visit`` dict; render them the same way."""
    import aiohttp_jinja2
    from aiohttp.test_utils import make_mocked_request

    from consult.accounts.users import User
    from consult.core import keys
    from consult.core.templates import template_context

    app = clinic.client.app
    user_id = clinic.doctor_id if role == "doctor" else clinic.patient_id
    request = make_mocked_request("GET", "/room", app=app)
    request[keys.USER] = User(user_id, role, "Someone", None, None, None)
    visit = {"id": clinic.visit_id, "public_id": clinic.public_id, "patient_id": clinic.patient_id,
             "doctor_id": clinic.doctor_id, "status": "confirmed"}  # fmt: skip
    ctx = {**template_context(request), "app": app, "visit": visit}
    env = aiohttp_jinja2.get_env(app)
    notes_html = env.get_template("_notes_panel.html").render(ctx)
    form_html = env.get_template("_rx_form.html").render(ctx)
    list_html = env.get_template("_rx_list.html").render(ctx)
    assert (f"/api/visits/{clinic.public_id}/notes" in notes_html) is shown
    assert ('data-testid="rx-issue"' in form_html) is shown
    assert 'data-testid="rx-list-panel"' in list_html  # the patient's visit page shows the list
    if shown:
        assert "notes.js" in notes_html and "{number}" in form_html  # placeholder rx.js fills in
