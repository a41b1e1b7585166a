from __future__ import annotations

import time
from datetime import date, timedelta

import pytest

from consult.accounts.passwords import Passwords
from consult.app import create_app
from consult.booking import catalogue, schedules
from consult.core.engine import open_database
from consult.core.migrations import migrate_settings
from consult.ops import demo
from tests.booking_helpers import make_clinic, post, read, signed_in, write

TZ = "Asia/Shanghai"


def _doctor(settings, make_user, sessions):
    doc = make_user("doctor", login="doc0")

    def setup(d):
        dep = catalogue.save_department_sync(d, department_id=None, code="x", name_zh="甲", name_en="X")
        catalogue.save_doctor_sync(
            d, doc, fee_minor=100, currency="CNY", visit_minutes=30, department_ids=[dep], tz=TZ
        )
        for weekday, start, end in sessions:
            schedules.add_template_sync(d, doc, weekday, start, end, tz=TZ)

    write(settings, setup)
    return doc


def test_slots_follow_templates_exceptions_and_the_clock(settings, make_user):
    doc = _doctor(settings, make_user, [(0, "09:00", "11:00"), (0, "10:00", "10:45")])
    monday = date(2030, 1, 7)  # a Monday
    assert monday.weekday() == 0
    start = schedules.local_ts(monday, "00:00", TZ)
    day = 86400

    def slots(now=0.0, **kw):
        return read(settings, lambda d: schedules.slots(d, doc, start, start + 7 * day, TZ, now=now, **kw))

    got = slots()
    # 09:00-11:00 in 30-minute slots; the overlapping session adds nothing new off the grid but 10:00.
    assert [time.strftime("%H:%M", time.gmtime(s.starts_at + 8 * 3600)) for s in got] == [
        "09:00",
        "09:30",
        "10:00",
        "10:30",
    ]
    assert got[0].starts_at == schedules.local_ts(monday, "09:00", TZ)  # 01:00 UTC
    assert got[0].starts_at % 86400 == 3600
    # No slot before now + lead.
    assert len(slots(now=got[1].starts_at, lead_s=60)) == 2
    # Partial leave removes overlapping slots; an extra session adds some; whole-day leave removes all.
    write(
        settings,
        lambda d: schedules.add_exception_sync(d, doc, "2030-01-07", "leave", "09:15", "10:00", tz=TZ),
    )
    assert len(slots()) == 2
    write(
        settings,
        lambda d: schedules.add_exception_sync(d, doc, "2030-01-09", "extra", "14:00", "15:00", tz=TZ),
    )
    assert len(slots()) == 4
    write(settings, lambda d: schedules.add_exception_sync(d, doc, "2030-01-07", "leave", tz=TZ))
    assert len(slots()) == 2
    assert read(settings, lambda d: schedules.find_slot(d, doc, got[0].starts_at, TZ)) is None


def test_templates_respect_their_validity_dates(settings, make_user):
    doc = _doctor(settings, make_user, [])
    write(
        settings,
        lambda d: schedules.add_template_sync(
            d, doc, 2, "09:00", "10:00", tz=TZ, valid_from="2030-01-10", valid_until="2030-01-20"
        ),
    )
    start = schedules.local_ts(date(2030, 1, 1), "00:00", TZ)
    got = read(settings, lambda d: schedules.slots(d, doc, start, start + 40 * 86400, TZ, now=0))
    days = sorted({schedules.local_date(s.starts_at, TZ).isoformat() for s in got})
    assert days == ["2030-01-16"]


def test_bad_schedule_input_is_refused(settings, make_user):
    doc = _doctor(settings, make_user, [])
    import pytest

    from consult.core.errors import BadRequest

    for args in [(7, "09:00", "10:00"), (1, "9am", "10:00"), (1, "10:00", "09:00"), (1, "25:00", "26:00")]:
        with pytest.raises(BadRequest):
            write(settings, lambda d, a=args: schedules.add_template_sync(d, doc, *a, tz=TZ))
    with pytest.raises(BadRequest):
        write(settings, lambda d: schedules.add_exception_sync(d, doc, "2030-02-30", "leave", tz=TZ))
    with pytest.raises(BadRequest):
        write(settings, lambda d: schedules.add_exception_sync(d, doc, "2030-02-01", "extra", tz=TZ))


def test_localized_names_fall_back():
    row = {"name_zh": "内科", "name_en": "", "title_zh": "", "title_en": "Physician"}
    assert catalogue.localized(row, "name", "en") == "内科"
    assert catalogue.localized(row, "title", "zh_CN") == "Physician"


def test_demo_seed_is_idempotent_and_has_slots_for_two_weeks(settings):
    migrate_settings(settings)
    db = open_database(settings)
    passwords = Passwords(1, 1024)
    try:
        first = demo.seed(db, passwords)
        assert first
        counts = lambda: db.read_sync(  # noqa: E731
            lambda d: [
                d.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608
                for t in ("users", "departments", "doctors", "doctor_departments", "schedule_templates")
            ]
        )
        before = counts()
        assert before[1] >= 3 and before[2] == 3
        assert demo.seed(db, passwords) == []
        assert counts() == before
        now = time.time()
        today = schedules.local_date(now, settings.timezone)
        for doc in db.read_sync(lambda d: [r[0] for r in d.execute("SELECT user_id FROM doctors")]):
            got = db.read_sync(
                lambda d, doc=doc: schedules.slots(d, doc, now, now + 14 * 86400, settings.timezone, now=now)
            )
            days = {schedules.local_date(s.starts_at, settings.timezone) for s in got}
            # Every doctor works in each of the two coming weeks.
            for week in (0, 1):
                lo = today + timedelta(days=7 * week + 1)
                assert any(lo <= d < lo + timedelta(days=7) for d in days), (doc, week)
            assert len(got) > 20
    finally:
        db.close()


@pytest.mark.locale("en")  # asserts English texts
async def test_admin_manages_departments_doctors_and_schedules(
    aiohttp_server, aiohttp_client, settings, make_user
):
    clinic = make_clinic(settings, make_user)
    new_doc = make_user("doctor", login="newdoc", name="New Doctor")
    make_user("patient", login="13900000001")
    server = await aiohttp_server(create_app(settings))
    admin = await signed_in(aiohttp_client, server, "boss")
    home = await (await admin.get("/admin")).text()
    assert "/admin/catalogue" in home and "/admin/reschedule" in home
    page = await (await admin.get("/admin/catalogue")).text()
    assert "Internal medicine" in page and "New Doctor" in page and "No profile yet" in page
    resp = await post(
        admin,
        "/admin/catalogue/departments",
        {"code": "cardio", "name_zh": "心内科", "name_en": "Cardiology"},
    )
    assert resp.status == 303
    resp = await post(
        admin, "/admin/catalogue/departments", {"code": "cardio", "name_zh": "x", "name_en": "y"}
    )
    assert resp.status == 409 and "already uses this code" in await resp.text()
    dep = read(
        settings, lambda d: d.execute("SELECT id FROM departments WHERE code = 'cardio'").fetchone()[0]
    )
    resp = await post(
        admin,
        f"/admin/catalogue/departments/{dep}",
        {"code": "cardio", "name_zh": "心血管内科", "name_en": "Cardiology", "active": "1"},
    )
    assert resp.status == 303
    assert "心血管内科" in await (await admin.get(f"/admin/catalogue/departments/{dep}")).text()
    # A profile for the new doctor: fee typed in yuan, stored in fen.
    resp = await post(
        admin,
        f"/admin/catalogue/doctors/{new_doc}",
        {
            "departments": str(dep),
            "fee": "65.50",
            "visit_minutes": "20",
            "title_en": "Cardiologist",
            "active": "1",
        },
    )
    assert resp.status == 303, await resp.text()
    row = read(
        settings, lambda d: dict(d.execute("SELECT * FROM doctors WHERE user_id = ?", [new_doc]).fetchone())
    )
    assert row["fee_minor"] == 6550 and row["visit_minutes"] == 20 and row["title_en"] == "Cardiologist"
    resp = await post(
        admin,
        f"/admin/catalogue/doctors/{new_doc}",
        {"departments": str(dep), "fee": "abc", "visit_minutes": "20"},
    )
    assert resp.status == 400 and "Enter the fee as a number" in await resp.text()
    resp = await post(
        admin,
        f"/admin/catalogue/doctors/{new_doc}/templates",
        {"weekday": "2", "start_local": "09:00", "end_local": "11:00"},
    )
    assert resp.status == 303
    page = await (await admin.get(f"/admin/catalogue/doctors/{new_doc}")).text()
    assert "09:00" in page and "11:00" in page
    resp = await post(
        admin,
        f"/admin/catalogue/doctors/{new_doc}/templates",
        {"weekday": "2", "start_local": "x", "end_local": "y"},
    )
    assert resp.status == 400 and "HH:MM" in await resp.text()
    # The patient sees the new department and doctor.
    patient = await signed_in(aiohttp_client, server, "13900000001")
    assert "Cardiology" in await (await patient.get("/book")).text()
    assert "New Doctor" in await (await patient.get(f"/book/{dep}")).text()
    # Hiding a department takes it off the patient's list.
    await post(
        admin,
        f"/admin/catalogue/departments/{dep}",
        {"code": "cardio", "name_zh": "心", "name_en": "Cardiology"},
    )
    assert "Cardiology" not in await (await patient.get("/book")).text()
    assert (await patient.get(f"/book/{dep}")).status == 404
    assert clinic.department_id


async def test_catalogue_admin_is_for_admins_only(aiohttp_server, aiohttp_client, settings, make_user):
    clinic = make_clinic(settings, make_user)
    make_user("patient", login="13900000001")
    server = await aiohttp_server(create_app(settings))
    for who in ("13900000001", "doc0"):
        c = await signed_in(aiohttp_client, server, who)
        for path in (
            "/admin/catalogue",
            f"/admin/catalogue/doctors/{clinic.doctor_ids[0]}",
            "/admin/reschedule",
        ):
            assert (await c.get(path)).status == 403
        resp = await post(c, "/admin/catalogue/departments", {"code": "z", "name_zh": "z", "name_en": "z"})
        assert resp.status == 403
    assert read(settings, lambda d: d.execute("SELECT count(*) FROM departments").fetchone()[0]) == 1


def test_taking_a_doctor_off_flags_upcoming_visits(settings, make_user):
    doc = _doctor(settings, make_user, [(d, "09:00", "12:00") for d in range(7)])
    patient = make_user("patient", login="13900000001")
    now = time.time()
    slot = read(settings, lambda d: schedules.slots(d, doc, now + 86400, now + 3 * 86400, TZ, now=now))[0]
    dep = read(settings, lambda d: d.execute("SELECT id FROM departments").fetchone()[0])
    write(
        settings,
        lambda d: d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " fee_minor, currency, created, updated, call_nonce) VALUES ('p123456789', ?, ?, ?, ?, ?,"
            " 'confirmed', 100, 'CNY', 0, 0, 'n')",
            [patient, doc, dep, slot.starts_at, slot.ends_at],
        ),
    )
    flagged = write(
        settings,
        lambda d: catalogue.save_doctor_sync(
            d, doc, fee_minor=100, currency="CNY", visit_minutes=30, department_ids=[dep], tz=TZ, active=False
        ),
    )
    assert len(flagged) == 1
    row = read(settings, lambda d: d.execute("SELECT status, needs_reschedule FROM visits").fetchone())
    assert tuple(row) == ("confirmed", 1)
