"""Admin session pages over HTTP: who may see them, the list, one session, the overview, CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import time
import xml.etree.ElementTree as ET

import pytest

from consult import sessionlog
from consult.app import create_app
from consult.audit import chain
from tests import db_helpers
from tests.conftest import login
from tests.sessionlog_helpers import add_visit, full_call, make_world, read, record, write

ADMIN_ONLY = [
    "/admin/sessions",
    "/admin/sessions/overview",
    "/admin/sessions.csv",
    "/admin/sessions/{public_id}",
    "/admin/audit",
    "/admin/audit/verify",
    "/metrics",
]


@pytest.fixture
def world(settings, make_user):
    w = make_world(settings, make_user)
    make_user("admin", login="boss", name="Admin")
    return w


@pytest.fixture
def call(world):
    t0 = time.time() - 7200
    visit_id, public_id = write(world.settings, lambda db: add_visit(db, world, int(t0)))
    write(world.settings, lambda db: record(db, visit_id, full_call(t0)))
    return visit_id, public_id


@pytest.mark.parametrize("path", ADMIN_ONLY)
@pytest.mark.parametrize("who", [None, "patient", "doctor"])
async def test_only_admins_reach_admin_pages(client, world, call, path, who):
    if who == "patient":
        await login(client, "13812345678")
    elif who == "doctor":
        await login(client, "drwang")
    resp = await client.get(path.format(public_id=call[1]), allow_redirects=False)
    if who is None:
        assert resp.status == 303
        assert resp.headers["Location"].startswith("/login?next=")
    else:
        assert resp.status == 403


@pytest.mark.parametrize("path", ADMIN_ONLY)
async def test_admin_reaches_them(client, world, call, path):
    await login(client, "boss")
    resp = await client.get(path.format(public_id=call[1]))
    assert resp.status == 200, await resp.text()


@pytest.mark.locale("en")  # asserts English texts
async def test_session_page_shows_timeline_in_order_and_charts(client, world, call):
    await login(client, "boss")
    resp = await client.get(f"/admin/sessions/{call[1]}")
    html = await resp.text()
    names = re.findall(r'<tr data-event="([a-z_]+)">', html)
    assert names == [
        "room_opened",
        "joined",
        "waiting",
        "joined",
        "admitted",
        "clock_started",
        "ice_state",
        "ice_state",
        "warning",
        "ended",
        "left",
        "left",
    ]
    assert "203.0.113.7" in html  # unmasked by default
    assert "mobile · iOS 17.2 · WeChat 8.0" in html
    assert 'data-testid="end-reason">Time limit reached' in html
    assert "6 quality samples" in html
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == 4
    for svg in svgs:
        ET.fromstring(svg)  # noqa: S314 - our own output
    assert svgs[0].count("<polyline") == 2  # bitrate from both sides


async def test_addresses_masked_when_configured(aiohttp_client, make_settings, world, call):
    client = await aiohttp_client(create_app(make_settings(mask_addresses=True)))
    await login(client, "boss")
    html = await (await client.get(f"/admin/sessions/{call[1]}")).text()
    assert "203.0.113.7" not in html
    assert "203.0.113.0/24" in html


async def test_list_filters_and_paginates_through_older_links(client, world):
    base = int(time.time()) - 40 * 86400

    def seed(db):
        for i in range(120):
            visit_id, _ = add_visit(db, world, base + i * 3600)
            sessionlog.apply_event_sync(db, visit_id, "room_opened", None, base + i * 3600, {})
            reason = "host_ended" if i % 4 else "time_limit"
            sessionlog.apply_event_sync(db, visit_id, "joined", "guest", base + i * 3600 + 1, {})
            sessionlog.apply_event_sync(
                db, visit_id, "clock_started", None, base + i * 3600 + 2, {"started_at": base + i * 3600 + 2}
            )
            sessionlog.apply_event_sync(
                db, visit_id, "ended", None, base + i * 3600 + 600, {"reason": reason}
            )

    write(world.settings, seed)
    await login(client, "boss")
    seen: list[str] = []
    url = "/admin/sessions?end_reason=host_ended"
    pages = 0
    while url:
        html = await (await client.get(url)).text()
        seen += re.findall(r'<tr data-visit="([^"]+)">', html)
        m = re.search(r'<a href="([^"]+)" data-testid="older">', html)
        url = m.group(1).replace("&amp;", "&") if m else None
        assert url is None or "end_reason=host_ended" in url
        pages += 1
    assert pages == 2
    assert len(seen) == len(set(seen)) == 90


@pytest.mark.locale("en")  # asserts English texts
@pytest.mark.parametrize("tz", ["Asia/Shanghai", "America/New_York"])
async def test_list_rows_show_local_times_labels_and_links_with_names_escaped(
    aiohttp_client, make_settings, make_user, tz
):
    """The rows are made in Python (sessionlog.views.ListRow) and written unescaped by the
    template: every cell must still be escaped, in the clinic's time and the reader's words."""
    settings = make_settings(timezone=tz)
    hostile = "<b id=\"x\">Li & 'Lei'</b>"
    world = make_world(settings, make_user, patient_name=hostile)
    make_user("admin", login="boss", name="Admin")
    client = await aiohttp_client(create_app(settings))
    t0 = 1_710_054_000  # 2024-03-10 07:00 UTC: New York's clocks went forward that morning
    visit_id, public_id = write(world.settings, lambda db: add_visit(db, world, t0))
    write(world.settings, lambda db: record(db, visit_id, full_call(t0)))
    await login(client, "boss")
    html = await (await client.get("/admin/sessions")).text()
    assert hostile not in html
    row = re.search(rf'<tr data-visit="{public_id}">(.*?)</tr>', html, flags=re.S).group(1)
    cells = [c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
    local = {"Asia/Shanghai": "2024-03-10 15:00", "America/New_York": "2024-03-10 03:00"}[tz]
    assert cells == [
        f'<a href="/admin/sessions/{public_id}">{local}</a>',
        "Cardiology",
        "Dr Wang",
        "&lt;b id=&#34;x&#34;&gt;Li &amp; &#39;Lei&#39;&lt;/b&gt;",
        '<span class="badge ok">Completed</span>',
        "Time limit reached",
        "15.0",
        "yes",
        "0",
    ]
    page = await client.get(f"/admin/sessions/{public_id}")
    assert page.status == 200


async def test_list_filter_form_keeps_the_chosen_doctor_and_department_with_names_escaped(
    client, world, make_user
):
    """The selects' options are made in Python (sessionlog.views.options) and written unescaped."""
    hostile = make_user("doctor", login="drevil", name='Dr <i>"Evil"</i> & Co')

    def add(db):
        db.execute("INSERT INTO doctors (user_id) VALUES (?)", [hostile])
        return db.execute(
            "INSERT INTO departments (code, name_zh, name_en) VALUES ('x', '<眼科>', '<Eyes>') RETURNING id"
        ).fetchone()[0]

    eyes = write(world.settings, add)
    await login(client, "boss")
    html = await (await client.get(f"/admin/sessions?doctor={hostile}&department={eyes}")).text()
    assert "<i>" not in html and "<眼科>" not in html
    doctors = re.search(r'<select name="doctor">(.*?)</select>', html, flags=re.S).group(1)
    assert (
        f'<option value="{hostile}" selected>Dr &lt;i&gt;&#34;Evil&#34;&lt;/i&gt; &amp; Co</option>'
        in doctors
    )
    assert f'<option value="{world.doctor_id}">Dr Wang</option>' in doctors
    departments = re.search(r'<select name="department">(.*?)</select>', html, flags=re.S).group(1)
    assert f'<option value="{eyes}" selected>&lt;眼科&gt;</option>' in departments  # zh_CN: the Chinese name
    assert f'<option value="{world.department_id}">心内科</option>' in departments
    assert departments.count(" selected") == 1 and doctors.count(" selected") == 1


@pytest.mark.locale("en")  # asserts English texts
async def test_csv_export_streams_all_rows_with_formula_cells_escaped(client, settings, make_user, world):
    evil = make_user("patient", login="13700000000", name='=HYPERLINK("http://evil","x")')
    now = int(time.time())

    def seed(db):
        for i in range(2500):
            visit_id, _ = add_visit(db, world, now - 86400 * 3 - i * 60, status="no_show")
            sessionlog.apply_event_sync(db, visit_id, "room_opened", None, now, {})
        visit_id, _ = add_visit(db, world, now - 86400, patient_id=evil)
        sessionlog.apply_event_sync(db, visit_id, "room_opened", None, now, {})

    write(world.settings, seed)
    await login(client, "boss")
    resp = await client.get("/admin/sessions.csv")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in resp.headers["Content-Disposition"]
    body = (await resp.read()).decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0][:3] == ["visit", "scheduled_start", "department"]
    assert len(rows) == 1 + 2501
    evil_rows = [r for r in rows if "HYPERLINK" in r[4]]
    assert evil_rows[0][4] == '\'=HYPERLINK("http://evil","x")'
    # Filtered export: the same filters as the list.
    resp = await client.get("/admin/sessions.csv?q=13700000000")
    assert len(list(csv.reader(io.StringIO((await resp.read()).decode("utf-8-sig"))))) == 2


@pytest.mark.locale("en")  # asserts English texts
async def test_overview_has_charts_and_totals(client, world, call):
    now = time.time()
    write(world.settings, lambda db: add_visit(db, world, int(now - 5 * 3600)))
    write(world.settings, lambda db: sessionlog.mark_no_shows_sync(db, now))
    await login(client, "boss")
    html = await (await client.get("/admin/sessions/overview")).text()
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == 5
    for svg in svgs:
        assert len(ET.fromstring(svg).findall("{http://www.w3.org/2000/svg}rect")) >= 1  # noqa: S314
    assert "Completed: 1" in html and "No-show: 1" in html


async def test_reads_of_session_pages_are_audited(client, world, call):
    await login(client, "boss")
    before = read(world.settings, "SELECT count(*) AS n FROM audit_log")[0]["n"]
    await client.get(f"/admin/sessions/{call[1]}")
    rows = read(world.settings, "SELECT * FROM audit_log WHERE id > ?", [before])
    assert [(r["action"], r["object_id"], r["subject_user_id"]) for r in rows] == [
        ("session.view", str(call[0]), world.patient_id)
    ]


async def test_each_list_page_is_audited_once_before_it_is_sent(client, world, call):
    """The audit entry is written while the page is read: committed when the page arrives, one
    per page, and the chain still verifies."""
    await login(client, "boss")
    before = read(world.settings, "SELECT max(id) AS n FROM audit_log")[0]["n"] or 0
    for url, detail in (
        ("/admin/sessions", {"filters": {}, "page": False}),
        (
            "/admin/sessions?outcome=completed&cursor=99999999999.1",
            {"filters": {"outcome": "completed"}, "page": True},
        ),
    ):
        resp = await client.get(url)
        assert resp.status == 200
        # Read as soon as the page arrived: the entry is there already, not on its way.
        rows = read(world.settings, "SELECT * FROM audit_log WHERE id > ?", [before])
        assert [(r["action"], r["actor_role"], json.loads(r["detail"])) for r in rows] == [
            ("session.list", "admin", detail)
        ]
        before = rows[-1]["id"]
    ok, _message = read_sync_verify(world.settings)
    assert ok


@pytest.mark.sqlite_only("a SQLite trigger makes the audit write fail")
async def test_list_page_is_not_shown_when_its_audit_entry_cannot_be_written(client, world, call):
    await login(client, "boss")
    write(
        world.settings,
        lambda db: db.execute(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ),
    )
    resp = await client.get("/admin/sessions")
    html = await resp.text()
    assert resp.status == 500
    assert "Li Lei" not in html and call[1] not in html


async def test_admin_home_links_to_sessions_and_audit(client, world):
    await login(client, "boss")
    html = await (await client.get("/admin")).text()
    assert 'href="/admin/sessions"' in html and 'href="/admin/audit"' in html
    assert 'href="/admin/payments"' in html  # refunds and marking paid, from the admin menu


def read_sync_verify(target) -> tuple[bool, str]:
    return db_helpers.read(target, chain.verify)


@pytest.mark.parametrize("count", [49, 50, 51, 100, 101])
async def test_list_pages_end_exactly_where_the_matches_do(client, world, make_user, count):
    """Keyset pages ask for one row more than they show (no COUNT over the table): a page of
    exactly 50 has no "older" link, the 51st match gets a page of its own, and rows sharing one
    scheduled time are neither repeated nor skipped across a page boundary."""
    base = int(time.time()) - 10 * 86400
    second = dataclasses.replace(world, doctor_id=make_user("doctor", login="drli", name="Dr Li"))

    def seed(db):
        db.execute("INSERT INTO doctors (user_id) VALUES (?)", [second.doctor_id])
        for i in range(count):
            # Two doctors' visits at each time: the cursor must break ties by visit id.
            starts = base + (i // 2) * 900
            visit_id, _ = add_visit(db, second if i % 2 else world, starts)
            sessionlog.apply_event_sync(db, visit_id, "room_opened", None, starts, {})

    write(world.settings, seed)
    await login(client, "boss")
    seen: list[str] = []
    sizes = []
    url: str | None = "/admin/sessions"
    while url:
        html = await (await client.get(url)).text()
        rows = re.findall(r'<tr data-visit="([^"]+)">', html)
        sizes.append(len(rows))
        seen += rows
        m = re.search(r'<a href="([^"]+)" data-testid="older">', html)
        url = m.group(1).replace("&amp;", "&") if m else None
    assert sizes == [50] * (count // 50) + ([count % 50] if count % 50 else [])
    everyone = {r["public_id"] for r in read(world.settings, "SELECT public_id FROM visits")}
    assert len(seen) == len(set(seen)) == count and set(seen) == everyone


async def test_list_filter_options_follow_the_choice_and_new_doctors(client, world, make_user):
    """The selects' options are cached by their choices and the one selected: another page
    selects another doctor or none, and a doctor added since appears on the next page."""
    await login(client, "boss")
    other = make_user("doctor", login="drli", name="Dr Li")

    def doctors(html: str) -> str:
        return re.search(r'<select name="doctor">(.*?)</select>', html, flags=re.S).group(1)

    html = await (await client.get(f"/admin/sessions?doctor={world.doctor_id}")).text()
    assert f'<option value="{world.doctor_id}" selected>Dr Wang</option>' in doctors(html)
    assert "Dr Li" not in doctors(html)  # not a doctor of the clinic yet
    write(world.settings, lambda db: db.execute("INSERT INTO doctors (user_id) VALUES (?)", [other]))
    for _ in range(2):  # the second time from the cache
        html = await (await client.get("/admin/sessions")).text()
        assert " selected" not in doctors(html)
        assert f'<option value="{other}">Dr Li</option>' in doctors(html)
        html = await (await client.get(f"/admin/sessions?doctor={other}")).text()
        assert f'<option value="{other}" selected>Dr Li</option>' in doctors(html)
        assert f'<option value="{world.doctor_id}">Dr Wang</option>' in doctors(html)
