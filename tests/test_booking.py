from __future__ import annotations

import asyncio
import html
import json
import time

import pytest

from consult import booking, payments
from consult.app import create_app
from consult.booking import schedules
from consult.core import jobs, metrics
from consult.core.errors import BadRequest, Conflict, Forbidden
from consult.core.formatting import to_local
from tests.booking_helpers import free_slots, hold, make_clinic, post, read, signed_in, visit_row, write


@pytest.fixture
def settings(make_settings):
    # A lead time longer than one 15-minute slot: the next slot is always too soon to book.
    return make_settings(booking_lead_minutes=20)


@pytest.fixture
def clinic(settings, make_user):
    return make_clinic(settings, make_user, doctors=2)


@pytest.fixture
async def server(aiohttp_server, settings, clinic):
    return await aiohttp_server(create_app(settings))


def count_active(settings, doctor_id: int, starts_at: int) -> int:
    return read(
        settings,
        lambda d: d.execute(
            "SELECT count(*) FROM visits WHERE doctor_id = ? AND starts_at = ?"
            " AND status IN ('held', 'confirmed', 'completed')",
            [doctor_id, starts_at],
        ).fetchone()[0],
    )


def confirm(settings, public_id: str) -> None:
    vid = visit_row(settings, public_id)["id"]
    write(settings, lambda d: booking.confirm_paid_sync(d, vid, time.time()))


@pytest.mark.locale("en")  # asserts English texts
async def test_booking_journey_pages(aiohttp_client, server, clinic, settings, make_user):
    make_user("patient", login="13900000001", name="Zhang Wei")
    c = await signed_in(aiohttp_client, server, "13900000001")
    home = await (await c.get("/patient")).text()
    assert 'href="/book"' in home
    deps = await (await c.get("/book")).text()
    assert "Internal medicine" in deps
    doctors = await (await c.get(f"/book/{clinic.department_id}")).text()
    assert "Doctor 0" in doctors and "Next free times" in doctors and "¥50.00" in doctors
    doctor_page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    page = await c.get(doctor_page)
    assert page.status == 200
    slot = free_slots(settings, clinic.doctor_ids[0], 3600)[0]
    # The page opens on the first day with a free time; late in the evening the slot an hour
    # ahead is tomorrow's, which the patient reaches by tapping its day in the strip.
    day = to_local(slot.starts_at, settings.timezone).date().isoformat()
    text = await page.text()
    assert f'href="{doctor_page}?day={day}"' in text
    if f'value="{slot.starts_at}"' not in text:
        text = await (await c.get(f"{doctor_page}?day={day}")).text()
    assert f'value="{slot.starts_at}"' in text
    resp = await hold(c, clinic, slot.starts_at, json=False)
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith("/visits/")
    visit_page = await (await c.get(location)).text()
    assert 'data-testid="countdown"' in visit_page and "Awaiting payment" in visit_page
    assert "<script>" not in visit_page and "style=" not in visit_page
    row = visit_row(settings, location.rsplit("/", 1)[1])
    assert row["status"] == "held" and row["fee_minor"] == 5000 and row["currency"] == "CNY"
    assert settings.hold_minutes * 60 - 5 < row["hold_expires"] - time.time() <= settings.hold_minutes * 60
    home = await (await c.get("/patient")).text()
    assert location in home and "Awaiting payment" in home
    # The taken slot shows as taken to the next patient.
    make_user("patient", login="13900000002")
    other = await signed_in(aiohttp_client, server, "13900000002")
    page = await (await other.get(f"{doctor_page}?day={day}")).text()
    assert f'data-testid="slot-{slot.starts_at}" disabled' in page


async def test_chinese_pages_show_chinese_names(aiohttp_client, server, clinic, make_user):
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, server, "13900000001")
    await c.post("/lang", data={"locale": "zh_CN", "next": "/", "csrf_token": c.csrf})
    text = await (await c.get("/book")).text()
    assert "内科" in text and "Internal medicine" not in text
    text = await (await c.get(f"/book/{clinic.department_id}")).text()
    assert "医师" in text and "下一个可约时间" in text


@pytest.mark.locale("en")  # asserts English texts
async def test_fifty_concurrent_holds_on_one_slot_give_exactly_one_visit(
    aiohttp_client, server, clinic, settings, make_user
):
    phones = [f"1370000{i:04d}" for i in range(50)]
    for phone in phones:
        make_user("patient", login=phone)
    clients = [await signed_in(aiohttp_client, server, phone) for phone in phones]
    slot = free_slots(settings, clinic.doctor_ids[0], 7200)[0]
    responses = await asyncio.gather(*(hold(c, clinic, slot.starts_at) for c in clients))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 49
    for r in responses:
        body = await r.json()
        if r.status == 409:
            assert body["error"] == "slot_taken"
            assert body["message"] == "This time was just taken; please pick another."
    assert count_active(settings, clinic.doctor_ids[0], slot.starts_at) == 1
    total = read(settings, lambda d: d.execute("SELECT count(*) FROM visits").fetchone()[0])
    assert total == 1
    # Only the hold that succeeded is counted as a booking.
    assert server.app[metrics.METRICS].registry.get_sample_value("consult_bookings_total") == 1


async def test_the_database_refuses_a_second_active_visit_for_a_slot(settings, clinic, make_user):
    from consult.core.db import IntegrityError

    p = make_user("patient", login="13900000001")
    slot = free_slots(settings, clinic.doctor_ids[0], 7200)[0]

    def insert(d, public_id: str) -> None:
        d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?,?,?,?,?,?,'confirmed',0,'CNY',0,0,'n')",
            [public_id, p, clinic.doctor_ids[0], clinic.department_id, slot.starts_at, slot.ends_at],
        )

    write(settings, lambda d: insert(d, "aaaaaaaaaaaa"))
    with pytest.raises(IntegrityError):
        write(settings, lambda d: insert(d, "bbbbbbbbbbbb"))


@pytest.mark.locale("en")  # asserts English texts
async def test_hold_expiry_frees_the_slot(aiohttp_server, aiohttp_client, make_settings, make_user):
    settings = make_settings(hold_minutes=0.002)  # 0.12 s
    clinic = make_clinic(settings, make_user)
    make_user("patient", login="13900000001")
    make_user("patient", login="13900000002")
    server = await aiohttp_server(create_app(settings))
    a = await signed_in(aiohttp_client, server, "13900000001")
    b = await signed_in(aiohttp_client, server, "13900000002")
    slot = free_slots(settings, clinic.doctor_ids[0], 7200)[0]
    first = await hold(a, clinic, slot.starts_at)
    assert first.status == 201
    first_id = (await first.json())["public_id"]
    await asyncio.sleep(0.2)
    # Before any reaper ran, the slot already shows as free.
    page = await (await b.get(f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}")).text()
    assert f'data-testid="slot-{slot.starts_at}" disabled' not in page
    second = await hold(b, clinic, slot.starts_at)
    assert second.status == 201, await second.text()
    # Paid at once: under load the second 0.12 s hold could otherwise expire too, and free the slot.
    confirm(settings, (await second.json())["public_id"])
    assert visit_row(settings, first_id)["status"] == "expired"
    assert "Hold expired" in await (await a.get(f"/visits/{first_id}")).text()
    # A payment arriving late for the lost hold cannot confirm it.
    with pytest.raises(Conflict):
        confirm(settings, first_id)
    assert count_active(settings, clinic.doctor_ids[0], slot.starts_at) == 1


async def test_late_payment_confirms_an_expired_hold_while_the_slot_is_free(settings, clinic, make_user):
    from consult.accounts.users import User

    pid = make_user("patient", login="13900000001")
    patient = User(pid, "patient", "P", None, "13900000001", None)
    slot = free_slots(settings, clinic.doctor_ids[0], 7200)[0]
    now = time.time()
    visit = write(
        settings,
        lambda d: booking.hold_sync(
            d,
            patient=patient,
            doctor_id=clinic.doctor_ids[0],
            department_id=None,
            starts_at=slot.starts_at,
            tz=settings.timezone,
            hold_s=60,
            lead_s=0,
            now=now,
        ),
    )
    later = now + 120
    assert write(settings, lambda d: booking.expire_holds_sync(d, later)) == 1
    write(settings, lambda d: booking.confirm_paid_sync(d, visit["id"], later))
    assert visit_row(settings, visit["public_id"])["status"] == "confirmed"
    write(settings, lambda d: booking.confirm_paid_sync(d, visit["id"], later))  # idempotent


@pytest.mark.locale("en")  # asserts English texts
async def test_background_housekeeping_expires_holds_and_sends_reminders(
    aiohttp_server, aiohttp_client, make_settings, make_user
):
    settings = make_settings(hold_minutes=0.001, reaper_interval_seconds=0.05)
    clinic = make_clinic(settings, make_user)
    make_user("patient", login="13900000001")
    server = await aiohttp_server(create_app(settings))
    c = await signed_in(aiohttp_client, server, "13900000001")
    # 30-45 minutes ahead, whatever the clock says (the next free slot may be after midnight).
    slot = free_slots(settings, clinic.doctor_ids[0], 1800)[0]
    held = await (await hold(c, clinic, slot.starts_at)).json()
    await asyncio.sleep(0.3)
    assert visit_row(settings, held["public_id"])["status"] == "expired"
    # The expired hold gave the slot back. Confirmed, a visit within the hour gets its reminder
    # from the loop.
    other = await (await hold(c, clinic, slot.starts_at)).json()
    confirm(settings, other["public_id"])
    await asyncio.sleep(0.3)
    outbox = read(settings, lambda d: d.execute("SELECT recipient, subject, body FROM outbox").fetchall())
    assert any(r[0] == "13900000001" and r[1] == "Visit reminder" for r in outbox), outbox
    assert visit_row(settings, other["public_id"])["reminder_sent"] == booking.REMINDER_HOUR


@pytest.mark.locale("en")  # asserts English texts
async def test_one_patient_cannot_hold_overlapping_visits(
    aiohttp_client, server, clinic, settings, make_user
):
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, server, "13900000001")
    slot = free_slots(settings, clinic.doctor_ids[0], 7200)[0]
    assert (await hold(c, clinic, slot.starts_at, doctor=0)).status == 201
    resp = await hold(c, clinic, slot.starts_at, doctor=1)
    assert resp.status == 409
    assert "already have a visit at this time" in (await resp.json())["message"]
    # The HTML form shows the same message on the slot page.
    resp = await hold(c, clinic, slot.starts_at, doctor=1, json=False)
    assert resp.status == 409
    assert "already have a visit at this time" in await resp.text()


@pytest.mark.parametrize(
    "shift, message",
    [
        (60, "not one of the doctor's bookable times"),
        (-86400 * 2, "already passed"),
    ],
)
@pytest.mark.locale("en")  # asserts English texts
async def test_invalid_slots_are_refused_with_a_clear_message(
    aiohttp_client, server, clinic, settings, make_user, shift, message
):
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, server, "13900000001")
    starts = free_slots(settings, clinic.doctor_ids[0], 7200)[0].starts_at + shift
    await refused_with(c, clinic, settings, starts, message)


@pytest.mark.locale("en")  # asserts English texts
async def test_a_real_slot_within_the_lead_time_is_refused(
    aiohttp_server, aiohttp_client, make_settings, make_user
):
    # An hour's lead: the next slot (at most half an hour away, whatever the clock says; the
    # clinic's last 15-minute visit ends at 23:45) is always inside it.
    settings = make_settings(booking_lead_minutes=60)
    clinic = make_clinic(settings, make_user)
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, await aiohttp_server(create_app(settings)), "13900000001")
    now = time.time()
    starts = read(
        settings,
        lambda d: schedules.slots(d, clinic.doctor_ids[0], now, now + 3600, settings.timezone, now=now),
    )[0].starts_at
    assert now < starts < now + settings.booking_lead_minutes * 60
    await refused_with(c, clinic, settings, starts, "already passed")


async def refused_with(c, clinic, settings, starts: int, message: str) -> None:
    """Holding `starts` is refused with `message` (JSON and the HTML form), and nothing is written."""
    resp = await hold(c, clinic, starts)
    assert resp.status == 400
    assert message in (await resp.json())["message"]
    resp = await hold(c, clinic, starts, json=False)
    assert resp.status == 400 and message in html.unescape(await resp.text())
    assert read(settings, lambda d: d.execute("SELECT count(*) FROM visits").fetchone()[0]) == 0


async def test_doctors_and_admins_cannot_book(aiohttp_client, server, clinic, settings):
    c = await signed_in(aiohttp_client, server, "doc0")
    slot = free_slots(settings, clinic.doctor_ids[0], 7200)[0]
    assert (await hold(c, clinic, slot.starts_at)).status == 403
    assert (await c.get("/book")).status == 403


@pytest.mark.locale("en")  # asserts English texts
async def test_schedule_change_flags_a_booked_visit_instead_of_dropping_it(
    aiohttp_client, server, clinic, settings, make_user
):
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, server, "13900000001")
    slot = free_slots(settings, clinic.doctor_ids[0], 3 * 86400)[0]
    public_id = (await (await hold(c, clinic, slot.starts_at)).json())["public_id"]
    confirm(settings, public_id)
    admin = await signed_in(aiohttp_client, server, "boss")
    day = schedules.local_date(slot.starts_at, settings.timezone).isoformat()
    doc = clinic.doctor_ids[0]
    resp = await post(admin, f"/admin/catalogue/doctors/{doc}/exceptions", {"day": day, "kind": "leave"})
    assert resp.status == 303 and resp.headers["Location"].endswith("?flagged=1")
    row = visit_row(settings, public_id)
    assert row["status"] == "confirmed" and row["needs_reschedule"] == 1
    listing = await (await admin.get("/admin/reschedule")).text()
    assert public_id in listing
    assert "1 visits no longer fit" in await (await admin.get("/admin/catalogue")).text()
    # The slot is gone from the patient's choices while the leave stands.
    page = await (await c.get(f"/book/{clinic.department_id}/doctors/{doc}")).text()
    assert f"slot-{slot.starts_at}" not in page
    # Undoing the leave clears the flag; a shorter visit length flags it again.
    exc_id = read(settings, lambda d: d.execute("SELECT id FROM schedule_exceptions").fetchone()[0])
    resp = await post(admin, f"/admin/catalogue/doctors/{doc}/exceptions/{exc_id}/delete", {})
    assert resp.status == 303
    assert visit_row(settings, public_id)["needs_reschedule"] == 0
    resp = await post(
        admin,
        f"/admin/catalogue/doctors/{doc}",
        {"departments": str(clinic.department_id), "fee": "50", "visit_minutes": "20", "active": "1"},
    )
    assert resp.status == 303
    assert visit_row(settings, public_id)["needs_reschedule"] == 1
    # The admin moves it to a slot of the new schedule; the flag goes away.
    new = free_slots(settings, doc, 4 * 86400)[0]
    resp = await post(admin, f"/visits/{public_id}/reschedule", {"starts_at": str(new.starts_at)})
    assert resp.status == 303, await resp.text()
    row = visit_row(settings, public_id)
    assert row["needs_reschedule"] == 0 and row["starts_at"] == new.starts_at and row["status"] == "confirmed"
    assert new.ends_at - new.starts_at == 20 * 60


def pay(settings, public_id: str) -> None:
    """The patient's payment arrives: the visit is confirmed through payments, as in production."""
    vid = visit_row(settings, public_id)["id"]

    def write_payment(d) -> None:
        now = time.time()
        payment = payments.create_payment_sync(d, vid, "simulator", now=now, default_currency="CNY")
        payments.mark_paid_sync(d, payment.id, now=now, fulfilment=booking.VisitFulfilment())

    write(settings, write_payment)


def refunds(settings) -> list[tuple[int, str, str | None]]:
    """Refunds done: (visit id, reason, role of who asked), from the payments' events and audit."""
    rows = read(
        settings,
        lambda d: d.execute(
            "SELECT p.visit_id, e.detail, a.actor_role FROM payment_events e JOIN payments p"
            " ON p.id = e.payment_id LEFT JOIN audit_log a ON a.action = 'payment.refund'"
            " AND a.object_id = p.order_id WHERE e.kind = 'refunded' ORDER BY e.id"
        ).fetchall(),
    )
    return [(r[0], json.loads(r[1])["reason"], r[2]) for r in rows]


def refund_jobs(settings) -> list[tuple[str, str]]:
    sql = "SELECT key, status FROM jobs WHERE kind = 'refund'"
    return read(settings, lambda d: [tuple(r) for r in d.execute(sql)])


@pytest.mark.locale("en")  # asserts English texts
async def test_cancel_rules_and_refunds(aiohttp_client, server, clinic, settings, make_user):
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, server, "13900000001")
    far = free_slots(settings, clinic.doctor_ids[0], 2 * 86400)[0]
    near = free_slots(settings, clinic.doctor_ids[0], 3 * 3600)[0]
    far_id = (await (await hold(c, clinic, far.starts_at)).json())["public_id"]
    near_id = (await (await hold(c, clinic, near.starts_at)).json())["public_id"]
    pay(settings, far_id)
    pay(settings, near_id)
    # More than 24 h ahead: the patient cancels, the payment is refunded (and said so only once done).
    resp = await post(c, f"/visits/{far_id}/cancel", {"confirm": "yes"})
    assert resp.status == 303 and resp.headers["Location"].endswith("m=cancelled_refunded")
    assert visit_row(settings, far_id)["status"] == "cancelled"
    assert refunds(settings) == [(visit_row(settings, far_id)["id"], "cancelled by patient", "patient")]
    assert count_active(settings, clinic.doctor_ids[0], far.starts_at) == 0
    # Within 24 h: refused, with the rule in the message; nothing changes.
    text = await (await c.get(f"/visits/{near_id}")).text()
    assert 'data-testid="cancel"' not in text and "less than 24 hours" in text
    resp = await post(c, f"/visits/{near_id}/cancel", {"confirm": "yes"})
    assert resp.status == 403
    assert "until 24 hours before" in await resp.text()
    assert visit_row(settings, near_id)["status"] == "confirmed"
    # The doctor may always cancel, and that always refunds.
    doctor = await signed_in(aiohttp_client, server, "doc0")
    resp = await post(doctor, f"/visits/{near_id}/cancel", {"confirm": "yes", "reason": "Doctor unwell"})
    assert resp.status == 303
    row = visit_row(settings, near_id)
    assert (
        row["status"] == "cancelled"
        and row["cancelled_by"] == "doctor"
        and row["cancel_reason"] == "Doctor unwell"
    )
    assert refunds(settings)[-1] == (row["id"], "Doctor unwell", "doctor")
    # Cancelling twice is refused; every cancellation is in the audit log.
    assert (await post(doctor, f"/visits/{near_id}/cancel", {"confirm": "yes"})).status == 409
    actions = read(
        settings,
        lambda d: [r[0] for r in d.execute("SELECT action FROM audit_log WHERE object_type = 'visit'")],
    )
    assert actions.count("visit.cancel") == 2
    await jobs.drain(server.app)  # the patient's messages are jobs, sent by the worker
    outbox = read(settings, lambda d: d.execute("SELECT subject FROM outbox").fetchall())
    assert sum(1 for r in outbox if r[0] == "Visit cancelled") == 2


async def test_a_patient_may_cancel_an_unpaid_hold_without_refund(
    aiohttp_client, server, clinic, settings, make_user
):
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, server, "13900000001")
    near = free_slots(settings, clinic.doctor_ids[0], 3600)[0]
    public_id = (await (await hold(c, clinic, near.starts_at)).json())["public_id"]
    resp = await post(c, f"/visits/{public_id}/cancel", {"confirm": "yes"})
    assert resp.status == 303 and resp.headers["Location"].endswith("m=cancelled")
    assert refunds(settings) == [] and refund_jobs(settings) == []


async def test_cancel_in_the_domain_uses_the_clock_it_is_given(server, clinic, settings, make_user):
    from consult.accounts.users import User

    pid = make_user("patient", login="13900000001")
    patient = User(pid, "patient", "P", None, "13900000001", None)
    slot = free_slots(settings, clinic.doctor_ids[0], 3 * 86400)[0]
    now = time.time()
    v = write(
        settings,
        lambda d: booking.hold_sync(
            d,
            patient=patient,
            doctor_id=clinic.doctor_ids[0],
            department_id=clinic.department_id,
            starts_at=slot.starts_at,
            tz=settings.timezone,
            hold_s=900,
            lead_s=0,
            now=now,
        ),
    )
    write(settings, lambda d: booking.confirm_paid_sync(d, v["id"], now))
    late = slot.starts_at - 23 * 3600
    with pytest.raises(Forbidden):
        write(
            settings,
            lambda d: booking.cancel_sync(d, visit_id=v["id"], actor=patient, now=late, free_s=86400),
        )
    early = slot.starts_at - 25 * 3600
    out = write(
        settings, lambda d: booking.cancel_sync(d, visit_id=v["id"], actor=patient, now=early, free_s=86400)
    )
    assert out["refund"] is True


@pytest.mark.locale("en")  # asserts English texts
async def test_patient_reschedules_a_confirmed_visit(aiohttp_client, server, clinic, settings, make_user):
    make_user("patient", login="13900000001")
    make_user("patient", login="13900000002")
    c = await signed_in(aiohttp_client, server, "13900000001")
    other = await signed_in(aiohttp_client, server, "13900000002")
    first, taken, target = free_slots(settings, clinic.doctor_ids[0], 2 * 86400, count=3)
    public_id = (await (await hold(c, clinic, first.starts_at)).json())["public_id"]
    confirm(settings, public_id)
    assert (await hold(other, clinic, taken.starts_at)).status == 201
    before = visit_row(settings, public_id)
    page = await (await c.get(f"/visits/{public_id}/reschedule")).text()
    assert f"slot-{target.starts_at}" in page and f"slot-{taken.starts_at}" not in page
    # A taken slot is refused and nothing moves.
    resp = await post(c, f"/visits/{public_id}/reschedule", {"starts_at": str(taken.starts_at)})
    assert resp.status == 409 and "just taken" in await resp.text()
    assert visit_row(settings, public_id)["starts_at"] == first.starts_at
    # Not a slot at all.
    resp = await post(c, f"/visits/{public_id}/reschedule", {"starts_at": str(target.starts_at + 7)})
    assert resp.status == 400
    resp = await post(c, f"/visits/{public_id}/reschedule", {"starts_at": str(target.starts_at)})
    assert resp.status == 303 and resp.headers["Location"].endswith("m=moved")
    after = visit_row(settings, public_id)
    assert after["starts_at"] == target.starts_at and after["status"] == "confirmed"
    assert after["call_nonce"] != before["call_nonce"]  # old call links stop working
    assert count_active(settings, clinic.doctor_ids[0], first.starts_at) == 0
    assert "moved to the new time" in await (await c.get(f"/visits/{public_id}?m=moved")).text()
    # The other patient cannot move someone else's visit (404, not 403).
    resp = await post(other, f"/visits/{public_id}/reschedule", {"starts_at": str(first.starts_at)})
    assert resp.status == 404


async def test_patient_cannot_reschedule_within_24_hours(server, clinic, settings, make_user):
    from consult.accounts.users import User

    pid = make_user("patient", login="13900000001")
    patient = User(pid, "patient", "P", None, "13900000001", None)
    a, b = free_slots(settings, clinic.doctor_ids[0], 3600, count=2)
    now = time.time()
    v = write(
        settings,
        lambda d: booking.hold_sync(
            d,
            patient=patient,
            doctor_id=clinic.doctor_ids[0],
            department_id=None,
            starts_at=a.starts_at,
            tz=settings.timezone,
            hold_s=900,
            lead_s=0,
            now=now,
        ),
    )
    write(settings, lambda d: booking.confirm_paid_sync(d, v["id"], now))
    with pytest.raises(Forbidden):
        write(
            settings,
            lambda d: booking.reschedule_sync(
                d,
                visit_id=v["id"],
                actor=patient,
                new_starts_at=b.starts_at,
                tz=settings.timezone,
                now=now,
                free_s=86400,
                lead_s=0,
            ),
        )
    with pytest.raises(BadRequest):
        write(
            settings,
            lambda d: booking.reschedule_sync(
                d,
                visit_id=v["id"],
                actor=patient,
                new_starts_at=b.starts_at,
                tz=settings.timezone,
                now=now,
                free_s=0,
                lead_s=86400,
            ),
        )


async def test_visit_pages_are_only_for_the_patient_the_doctor_and_admins(
    aiohttp_client, server, clinic, settings, make_user
):
    make_user("patient", login="13900000001")
    make_user("patient", login="13900000002")
    owner = await signed_in(aiohttp_client, server, "13900000001")
    slot = free_slots(settings, clinic.doctor_ids[0], 2 * 86400)[0]
    public_id = (await (await hold(owner, clinic, slot.starts_at)).json())["public_id"]
    confirm(settings, public_id)
    paths = [f"/visits/{public_id}", f"/visits/{public_id}/qr.svg", f"/visits/{public_id}/visit.ics"]
    for who, expected in [("13900000002", 404), ("doc1", 404), ("doc0", 200), ("boss", 200)]:
        c = await signed_in(aiohttp_client, server, who)
        for path in paths:
            if who in ("boss", "doc0") and path.endswith("qr.svg"):
                # Staff have no call link of their own: the doctor enters the consult room.
                assert (await c.get(path)).status == 404, (who, path)
                continue
            assert (await c.get(path)).status == expected, (who, path)
        if expected == 404:
            assert (await post(c, f"/visits/{public_id}/cancel", {"confirm": "yes"})).status == 404
            assert visit_row(settings, public_id)["status"] == "confirmed"
    anon = await aiohttp_client(server)
    resp = await anon.get(f"/visits/{public_id}", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/login")
    assert (await owner.get("/visits/nonexistent-visit-id")).status == 404


async def test_confirmed_visit_shows_call_link_qr_and_ics(
    aiohttp_client, server, clinic, settings, make_user
):
    make_user("patient", login="13900000001")
    c = await signed_in(aiohttp_client, server, "13900000001")
    slot = free_slots(settings, clinic.doctor_ids[0], 2 * 86400)[0]
    public_id = (await (await hold(c, clinic, slot.starts_at)).json())["public_id"]
    assert (await c.get(f"/visits/{public_id}/qr.svg")).status == 404  # not confirmed yet
    confirm(settings, public_id)
    page = await (await c.get(f"/visits/{public_id}")).text()
    assert 'data-testid="call-link"' in page and "/call/" in page and f"/visits/{public_id}/qr.svg" in page
    qr = await c.get(f"/visits/{public_id}/qr.svg")
    assert qr.status == 200 and qr.content_type == "image/svg+xml"
    body = await qr.text()
    assert body.lstrip().startswith("<svg") and "<script" not in body
    resp = await c.get(f"/visits/{public_id}/visit.ics")
    assert resp.status == 200 and resp.content_type == "text/calendar"
    assert "attachment" in resp.headers["Content-Disposition"]
    raw = await resp.read()
    assert b"\r\n" in raw and all(len(line) <= 75 for line in raw.split(b"\r\n"))
    event = parse_ics(raw.decode())
    assert event["DTSTART"] == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(slot.starts_at))
    assert event["DTEND"] == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(slot.ends_at))
    assert event["UID"].startswith(public_id) and "Doctor 0" in event["SUMMARY"]
    assert event["URL"].endswith(f"/visits/{public_id}") and event["STATUS"] == "CONFIRMED"
    # The doctor sees the patient's visit, with the reports and payment panels.
    doctor = await signed_in(aiohttp_client, server, "doc0")
    text = await (await doctor.get(f"/visits/{public_id}")).text()
    assert 'data-testid="patient-name"' in text and 'data-testid="reports-panel"' in text


def parse_ics(text: str) -> dict[str, str]:
    """Unfold (RFC 5545 3.1) and read the VEVENT's properties; checks the structure on the way."""
    assert text.endswith("\r\n")
    lines: list[str] = []
    for line in text.split("\r\n")[:-1]:
        if line.startswith((" ", "\t")):
            lines[-1] += line[1:]
        else:
            lines.append(line)
    assert lines[0] == "BEGIN:VCALENDAR" and lines[-1] == "END:VCALENDAR"
    assert "VERSION:2.0" in lines and any(x.startswith("PRODID:") for x in lines)
    begin, end = lines.index("BEGIN:VEVENT"), lines.index("END:VEVENT")
    props: dict[str, str] = {}
    depth = 0
    for line in lines[begin + 1 : end]:
        if line.startswith("BEGIN:"):
            depth += 1
        elif line.startswith("END:"):
            depth -= 1
        elif depth == 0:
            name, _, value = line.partition(":")
            props[name.split(";")[0]] = value
    for required in ("UID", "DTSTAMP", "DTSTART", "DTEND", "SUMMARY"):
        assert required in props
    return props


async def test_ics_escapes_and_folds_long_text():
    from consult.booking import ics

    text = ics.event(uid="x@y", starts_at=0, ends_at=900, summary="医生, 张; 复诊 " * 10, now=0)
    event = parse_ics(text)
    assert event["SUMMARY"].startswith("医生\\, 张\\; 复诊")
    assert all(len(line.encode()) <= 75 for line in text.split("\r\n"))


async def test_after_confirmed_sends_an_sms_with_the_visit_page(server, clinic, settings, make_user):
    from consult.core import keys

    make_user("patient", login="13900000001")
    app = server.app
    pid = read(
        settings, lambda d: d.execute("SELECT id FROM users WHERE phone = '13900000001'").fetchone()[0]
    )
    from consult.accounts.users import User

    patient = User(pid, "patient", "P", None, "13900000001", "zh_CN")
    slot = free_slots(settings, clinic.doctor_ids[0], 2 * 86400)[0]
    visit = await booking.hold(
        app, patient, doctor_id=clinic.doctor_ids[0], department_id=None, starts_at=slot.starts_at
    )
    write(settings, lambda d: d.execute("UPDATE users SET locale = 'zh_CN' WHERE id = ?", [pid]))
    await app[keys.DB].execute_write_fn(lambda d: booking.confirm_paid_sync(d, visit["id"], time.time()))
    await booking.after_confirmed(app, visit["id"], base_url="https://clinic.example")
    row = read(settings, lambda d: d.execute("SELECT * FROM outbox ORDER BY id DESC").fetchone())
    assert row["channel"] == "sms" and row["recipient"] == "13900000001"
    assert f"https://clinic.example/visits/{visit['public_id']}" in row["body"]
    assert "已确认" in row["body"]  # the patient's language


@pytest.mark.locale("en")  # asserts English texts
async def test_homes_list_visits(aiohttp_client, server, clinic, settings, make_user):
    make_user("patient", login="13900000001", name="Li Lei")
    c = await signed_in(aiohttp_client, server, "13900000001")
    slot = free_slots(settings, clinic.doctor_ids[0], 3600)[0]
    public_id = (await (await hold(c, clinic, slot.starts_at)).json())["public_id"]
    confirm(settings, public_id)
    text = await (await c.get("/patient")).text()
    assert f"/visits/{public_id}" in text and "Confirmed" in text
    doctor = await signed_in(aiohttp_client, server, "doc0")
    text = await (await doctor.get("/doctor")).text()
    assert "Li Lei" in text and f"/visits/{public_id}" in text
    other = await signed_in(aiohttp_client, server, "doc1")
    assert "Li Lei" not in await (await other.get("/doctor")).text()


def test_slot_marking_sweep_agrees_with_pairwise_check():
    """The one-pass overlap sweep marks exactly the slots a visit overlaps (random visits, odd lengths)."""
    import random

    from consult.booking.schedules import Slot, _overlapped

    rng = random.Random(7)
    for _ in range(200):
        start = rng.randrange(0, 1000)
        slots = [Slot(start + 15 * k, start + 15 * k + 15) for k in range(rng.randrange(0, 40))]
        busy = []
        for _v in range(rng.randrange(0, 30)):
            b = rng.randrange(start - 60, start + 700)
            busy.append((b, b + rng.choice((5, 15, 20, 30, 45))))
        expected = [any(s.starts_at < e and s.ends_at > b for b, e in busy) for s in slots]
        assert _overlapped(slots, busy) == expected
