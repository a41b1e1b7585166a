"""Audit trail pages: admin search with keyset pages, the chain check, a patient's access log."""

from __future__ import annotations

import re
import time

import pytest
from aiohttp import web

from consult.app import create_app
from consult.audit import chain as audit
from consult.audit import reads as auditing
from tests.conftest import login
from tests.sessionlog_helpers import make_world, read, write


@pytest.fixture
def world(settings, make_user):
    w = make_world(settings, make_user)
    w.admin_id = make_user("admin", login="boss", name="Admin Zhao")  # type: ignore[attr-defined]
    w.other_patient = make_user("patient", login="13900000002", name="Han Meimei")  # type: ignore[attr-defined]
    return w


def add(world, **kwargs) -> int:
    return write(world.settings, lambda db: audit.append(db, audit.AuditEntry(**kwargs)))


def seed(world) -> dict[str, int]:
    return {
        "doctor_reads_mine": add(
            world,
            action="report.view",
            object_type="report",
            object_id="7",
            actor_id=world.doctor_id,
            actor_role="doctor",
            subject_user_id=world.patient_id,
        ),
        "i_read_mine": add(
            world,
            action="report.view",
            object_type="report",
            object_id="7",
            actor_id=world.patient_id,
            actor_role="patient",
            subject_user_id=world.patient_id,
        ),
        "change_to_mine": add(
            world,
            action="visit.cancel",
            object_type="visit",
            object_id="3",
            actor_id=world.admin_id,
            actor_role="admin",
            subject_user_id=world.patient_id,
        ),
        "admin_reads_other": add(
            world,
            action="visit.view",
            object_type="visit",
            object_id="9",
            actor_id=world.admin_id,
            actor_role="admin",
            subject_user_id=world.other_patient,
        ),
        "admin_reads_mine": add(
            world,
            action="session.view",
            object_type="visit",
            object_id="3",
            actor_id=world.admin_id,
            actor_role="admin",
            subject_user_id=world.patient_id,
        ),
    }


async def test_audit_read_appends_exactly_one_entry(aiohttp_client, settings, world):
    app = create_app(settings)

    async def handler(request: web.Request) -> web.Response:
        await auditing.audit_read(request, "report.view", "report", 5, world.patient_id, page=1)
        with pytest.raises(ValueError, match="read action"):
            await auditing.audit_read(request, "report.delete", "report", 5, world.patient_id)
        return web.Response(text="ok")

    app.router.add_get("/test-read", handler)
    client = await aiohttp_client(app)
    await login(client, "drwang")
    before = read(world.settings, "SELECT count(*) AS n FROM audit_log")[0]["n"]
    assert (await client.get("/test-read")).status == 200
    rows = read(world.settings, "SELECT * FROM audit_log WHERE id > ?", [before])
    assert len(rows) == 1
    r = rows[0]
    assert (r["action"], r["object_type"], r["object_id"]) == ("report.view", "report", "5")
    assert (r["actor_id"], r["actor_role"], r["subject_user_id"]) == (
        world.doctor_id,
        "doctor",
        world.patient_id,
    )
    assert r["remote"] == "127.0.0.1"
    assert r["detail"] == '{"page": 1}'


@pytest.mark.locale("en")  # asserts English texts
async def test_patient_access_log_shows_only_others_reads_of_own_records(client, world):
    ids = seed(world)
    await login(client, "13812345678")
    resp = await client.get("/patient/access-log")
    assert resp.status == 200
    html = await resp.text()
    rows = re.findall(r"<tr>\s*<td>.*?</tr>", html, flags=re.S)
    assert len(rows) == 2
    assert "Dr Wang" in rows[1] and "Test report" in rows[1]
    assert "Admin Zhao" in rows[0] and "session.view" in rows[0]
    assert "visit.cancel" not in html and "visit.view" not in html
    # Reading one's own log is itself recorded (and not shown back).
    last = read(world.settings, "SELECT * FROM audit_log ORDER BY id DESC LIMIT 1")[0]
    assert (last["action"], last["actor_id"], last["subject_user_id"]) == (
        "access_log.view",
        world.patient_id,
        world.patient_id,
    )
    assert ids


@pytest.mark.parametrize("who", ["boss", "drwang"])
async def test_access_log_is_for_patients(client, world, who):
    await login(client, who)
    assert (await client.get("/patient/access-log")).status == 403


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"actor": "Admin Zhao"}, ["admin_reads_mine", "admin_reads_other", "change_to_mine"]),
        ({"actor": "drwang"}, ["doctor_reads_mine"]),
        ({"subject": "Han"}, ["admin_reads_other"]),
        ({"subject": "13812345678", "action": "report.view"}, ["i_read_mine", "doctor_reads_mine"]),
        ({"action": "visit."}, ["admin_reads_other", "change_to_mine"]),
        ({"object_type": "visit", "object_id": "3"}, ["admin_reads_mine", "change_to_mine"]),
        ({"actor": "nobody-like-this"}, []),
    ],
)
def test_search_filters(world, query, expected):
    ids = seed(world)
    f = auditing.AuditFilters.from_query(query)
    rows, _ = write(world.settings, lambda db: auditing.search_sync(db, f))
    by_id = {v: k for k, v in ids.items()}
    # Creating the test accounts wrote account.create entries too: only the seeded ones matter.
    assert [by_id[r["id"]] for r in rows if r["id"] in by_id] == sorted(expected, key=lambda k: -ids[k])


def test_search_by_date_range(world):
    seed(world)
    total = read(world.settings, "SELECT count(*) AS n FROM audit_log")[0]["n"]
    today = time.strftime("%Y-%m-%d")
    for query, n in (
        ({"from": "2001-01-01", "to": "2001-12-31"}, 0),
        ({"to": "2999-01-01"}, total),
        ({"from": "2999-01-01"}, 0),
    ):
        f = auditing.AuditFilters.from_query(query)
        rows, _ = write(world.settings, lambda db, f=f: auditing.search_sync(db, f))
        assert len(rows) == n, (query, today)


async def test_admin_search_pages_by_keyset(client, world):
    for i in range(120):
        add(
            world,
            action="report.view",
            object_type="report",
            object_id=str(i),
            subject_user_id=world.patient_id,
        )
    await login(client, "boss")
    seen: list[str] = []
    url = "/admin/audit?action=report.view"
    while url:
        html = await (await client.get(url)).text()
        seen += re.findall(r"<td>report (\d+)</td>", html)
        m = re.search(r'<a href="([^"]+)" data-testid="older">', html)
        url = m.group(1).replace("&amp;", "&") if m else None
    assert sorted(seen, key=int) == [str(i) for i in range(120)]
    searches = read(world.settings, "SELECT count(*) AS n FROM audit_log WHERE action = 'audit.search'")
    assert searches[0]["n"] == 3


@pytest.mark.locale("en")  # asserts English texts
async def test_verify_page_reports_intact_then_names_the_edited_row(client, world):
    seed(world)
    await login(client, "boss")
    html = await (await client.get("/admin/audit/verify")).text()
    assert 'data-ok="1"' in html and "chain intact" in html
    write(world.settings, lambda db: db.execute("UPDATE audit_log SET object_id = '8' WHERE id = 2"))
    html = await (await client.get("/admin/audit/verify")).text()
    assert 'data-ok="0"' in html and "row 2 was altered" in html


@pytest.mark.locale("en")  # asserts English texts
async def test_verify_page_names_a_deleted_row(client, world):
    seed(world)
    write(world.settings, lambda db: db.execute("DELETE FROM audit_log WHERE id = 3"))
    await login(client, "boss")
    html = await (await client.get("/admin/audit/verify")).text()
    assert 'data-ok="0"' in html and "row 3 is missing" in html
