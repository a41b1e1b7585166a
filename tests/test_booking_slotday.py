"""Issue 15, the booking rush: the slot page shows one day, the date strip fetches another day's
panel on demand (``/book/<department>/doctors/<doctor>/days/<date>``), and a refused hold answers
with a short page of that day's fresh times. In process, in Chinese as patients use it."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta

import pytest

from consult.app import create_app
from consult.core.formatting import to_local
from tests.booking_helpers import free_slots, hold, make_clinic, post, signed_in, write

DAY = 86400
PANEL = re.compile(r'<section class="day-panel" data-day-panel="([0-9-]+)"')
BUTTON = re.compile(r'<button type="submit" name="starts_at" value="(\d+)" class="slot[^"]*"([^>]*)>')


@pytest.fixture
def settings(make_settings):
    return make_settings(booking_lead_minutes=20)


@pytest.fixture
def clinic(settings, make_user):
    return make_clinic(settings, make_user, doctors=2)


@pytest.fixture
async def server(aiohttp_server, settings, clinic):
    return await aiohttp_server(create_app(settings))


@pytest.fixture
async def patient(aiohttp_client, server, make_user):
    make_user("patient", login="13900000001", name="张伟")
    return await signed_in(aiohttp_client, server, "13900000001")


@pytest.fixture
async def other(aiohttp_client, server, make_user):
    make_user("patient", login="13900000002", name="李娜")
    return await signed_in(aiohttp_client, server, "13900000002")


def day_url(clinic, day, doctor: int = 0) -> str:
    return f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[doctor]}/days/{day}"


def local_day(settings, ts: float):
    return to_local(ts, settings.timezone).date()


async def a_page_with_free_times(patient, page: str) -> tuple[str, str]:
    """The slot page as it opens (``page``) if its day has a few free times left, else the next
    day's (``page?day=...``): late in the evening, today may have only one."""
    text = await (await patient.get(page)).text()
    if len([v for v, rest in BUTTON.findall(text) if "disabled" not in rest]) >= 3:
        return page, text
    shown = PANEL.findall(text)[0]
    days = re.findall(r'data-day="([0-9-]+)"', text)
    page = f"{page}?day={days[days.index(shown) + 1]}"
    return page, await (await patient.get(page)).text()


async def test_the_page_carries_one_day_and_the_strip_links_every_other(patient, clinic, settings):
    page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    text = await (await patient.get(page)).text()
    assert len(PANEL.findall(text)) == 1  # not fourteen hidden panels
    urls = re.findall(r'data-day-url="([^"]+)"', text)
    days = re.findall(r'data-day="([0-9-]+)"', text)
    assert len(urls) == len(days) >= 14
    assert urls == [day_url(clinic, d) for d in days]


async def test_a_day_fragment_is_that_days_panel_alone(patient, clinic, settings):
    third = local_day(settings, time.time()) + timedelta(days=2)
    resp = await patient.get(day_url(clinic, third))
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    text = await resp.text()
    assert "<html" not in text and "<form" not in text  # a panel for the page's form, nothing more
    assert PANEL.findall(text) == [third.isoformat()]
    assert f"{third.month}月{third.day}日" in text
    assert re.findall(r'<h3 class="slot-part">(.+?)</h3>', text) == ["上午", "下午", "晚上"]
    buttons = BUTTON.findall(text)
    assert len(buttons) == 95 and not any("disabled" in rest for _, rest in buttons)


async def test_a_day_fragment_is_fresh_and_marks_taken_times(patient, other, clinic, settings):
    slot = free_slots(settings, clinic.doctor_ids[0], 2 * DAY)[0]
    day = local_day(settings, slot.starts_at)
    before = await (await patient.get(day_url(clinic, day))).text()
    assert f'value="{slot.starts_at}" class="slot" data-testid="slot-{slot.starts_at}">' in before
    assert (await hold(other, clinic, slot.starts_at)).status == 201
    after = await (await patient.get(day_url(clinic, day))).text()
    taken = dict(BUTTON.findall(after))[str(slot.starts_at)]
    assert "disabled" in taken and "已约满" in taken  # its spoken label says taken


async def test_a_bad_day_is_refused_in_words(patient, clinic, settings):
    today = local_day(settings, time.time())
    for bad in ("not-a-day", "2001-01-01", "2026-02-30", (today + timedelta(days=30)).isoformat(), "9" * 40):
        resp = await patient.get(day_url(clinic, bad))
        assert resp.status == 400, bad
        assert "请从列表中选择日期。" in await resp.text()


async def test_a_day_fragment_has_the_pages_permissions(
    aiohttp_client, server, patient, clinic, settings, make_user
):
    day = local_day(settings, time.time()) + timedelta(days=1)
    anonymous = await aiohttp_client(server)
    resp = await anonymous.get(day_url(clinic, day), allow_redirects=False)
    assert resp.status in (401, 303)
    assert BUTTON.findall(await resp.text()) == []
    doctor = await signed_in(aiohttp_client, server, "doc0")
    resp = await doctor.get(day_url(clinic, day))
    assert resp.status == 403 and BUTTON.findall(await resp.text()) == []
    # A doctor who does not work in that department, and one who does not exist.
    resp = await patient.get(f"/book/{clinic.department_id + 1}/doctors/{clinic.doctor_ids[0]}/days/{day}")
    assert resp.status == 404
    resp = await patient.get(f"/book/{clinic.department_id}/doctors/999999/days/{day}")
    assert resp.status == 404


async def test_a_refused_hold_is_a_short_page_with_that_days_fresh_times(patient, other, clinic, settings):
    first, second = free_slots(settings, clinic.doctor_ids[0], 2 * DAY, count=2)
    assert (await hold(other, clinic, first.starts_at)).status == 201
    resp = await hold(patient, clinic, first.starts_at, json=False)
    assert resp.status == 409
    text = await resp.text()
    assert "该时间刚刚被约走了，请选择其他时间。" in text
    assert "data-day-strip" not in text  # not the whole slot page again
    day = local_day(settings, first.starts_at)
    assert PANEL.findall(text) == [day.isoformat()]
    buttons = dict(BUTTON.findall(text))
    assert "disabled" in buttons[str(first.starts_at)] and "disabled" not in buttons[str(second.starts_at)]
    slots_page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    assert f'href="{slots_page}?day={day}" data-testid="other-days"' in text
    # The page is a form: another time is one tap away.
    assert 'action="/book/hold"' in text and f'name="csrf_token" value="{patient.csrf}"' in text
    resp = await post(
        patient,
        "/book/hold",
        {
            "doctor_id": str(clinic.doctor_ids[0]),
            "department_id": str(clinic.department_id),
            "starts_at": str(second.starts_at),
        },
    )
    assert resp.status == 303 and "/visits/" in resp.headers["Location"]


async def test_a_hold_refused_for_a_time_outside_the_strip_leads_back(patient, clinic, settings):
    resp = await hold(patient, clinic, 12345, json=False)
    assert resp.status == 400
    text = await resp.text()
    assert "请" in text and PANEL.findall(text) == []
    slots_page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    assert f'href="{slots_page}" data-testid="other-days"' in text


async def test_the_kept_slot_page_changes_with_a_hold_at_once(patient, other, clinic, settings):
    """The strip and the day are rendered once for everybody and kept; a hold drops them."""
    slots_page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    page, text = await a_page_with_free_times(patient, slots_page)
    shown = PANEL.findall(text)[0]
    free = [int(v) for v, rest in BUTTON.findall(text) if "disabled" not in rest]
    assert (await hold(other, clinic, free[-1], json=False)).status == 303
    again = dict(BUTTON.findall(await (await patient.get(f"{slots_page}?day={shown}")).text()))
    assert "disabled" in again[str(free[-1])]
    again = dict(BUTTON.findall(await (await patient.get(page)).text()))
    assert "disabled" in again[str(free[-1])]
    # A time the kept page shows taken is refused at once, with the same clear answer.
    resp = await hold(patient, clinic, free[-1])
    assert resp.status == 409 and (await resp.json())["error"] == "slot_taken"
    assert (await hold(patient, clinic, free[-2])).status == 201  # and a free one is held
    # Each patient's own form token, though the rest of the page was kept.
    assert f'name="csrf_token" value="{other.csrf}"' in await (await other.get(page)).text()


async def test_a_change_made_elsewhere_shows_within_a_second_or_so(patient, clinic, settings, make_user):
    """A visit written by another process (no signal reaches this one): the kept page is at most
    a second old, and the hold itself is decided by the database whatever the page said."""
    page, text = await a_page_with_free_times(
        patient, f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    )
    target = [int(v) for v, rest in BUTTON.findall(text) if "disabled" not in rest][-1]
    elsewhere = make_user("patient", login="13900000003", name="王芳")

    def book(d):
        d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, hold_expires, fee_minor, currency, created, updated, call_nonce)"
            " VALUES ('elsewhere0000000000000', ?, ?, ?, ?, ?, 'held', ?, 5000, 'CNY', ?, ?, 'n')",
            [
                elsewhere,
                clinic.doctor_ids[0],
                clinic.department_id,
                target,
                target + 900,
                time.time() + 900,
                time.time(),
                time.time(),
            ],
        )

    write(settings, book)
    deadline = time.monotonic() + 20
    while True:
        buttons = dict(BUTTON.findall(await (await patient.get(page)).text()))
        if "disabled" in buttons[str(target)]:
            break
        assert time.monotonic() < deadline, "the kept page never showed the visit made elsewhere"
        await asyncio.sleep(0.1)
    resp = await hold(patient, clinic, target)
    assert resp.status == 409 and (await resp.json())["error"] == "slot_taken"


def _book_all(settings, clinic, slots, doctor: int = 0) -> None:
    """Every one of ``slots`` taken by a confirmed visit of another patient, written behind the
    app's back before it read anything."""
    now = time.time()

    def book(d):
        patient = d.execute(
            "INSERT INTO users (role, phone, display_name, password_hash, created,"
            " password_changed) VALUES ('patient', '13900000099', '赵六', '!', ?, ?) RETURNING id",
            [now, now],
        ).fetchone()[0]
        for i, s in enumerate(slots):
            d.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, fee_minor, currency, created, updated, call_nonce)"
                " VALUES (?, ?, ?, ?, ?, ?, 'confirmed', 5000, 'CNY', ?, ?, 'n')",
                [
                    f"full{i:018d}",
                    patient,
                    clinic.doctor_ids[doctor],
                    clinic.department_id,
                    s.starts_at,
                    s.ends_at,
                    now,
                    now,
                ],
            )

    write(settings, book)


async def test_a_hold_refused_on_a_full_day_shows_the_first_day_with_a_free_time(patient, clinic, settings):
    """In a rush the tried day fills up: the refusal shows that day (all taken) and the first day
    that still has a time, so the next try needs no trip back to the strip."""
    slots = free_slots(settings, clinic.doctor_ids[0], 2 * DAY, count=400)
    day = local_day(settings, slots[0].starts_at) + timedelta(days=1)  # a whole day
    full = [s for s in slots if local_day(settings, s.starts_at) == day]
    _book_all(settings, clinic, full)
    page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    first_free = PANEL.findall(await (await patient.get(page)).text())[0]
    assert first_free != day.isoformat()
    resp = await hold(patient, clinic, full[0].starts_at, json=False)
    assert resp.status == 409
    text = await resp.text()
    assert "该时间刚刚被约走了，请选择其他时间。" in text
    assert PANEL.findall(text) == [day.isoformat(), first_free]
    tried, shown = text.split(f'data-day-panel="{first_free}"')
    assert 'data-testid="day-full"' in tried and all("disabled" in rest for _, rest in BUTTON.findall(tried))
    free = [v for v, rest in BUTTON.findall(shown) if "disabled" not in rest]
    assert free and 'data-testid="no-slots"' not in text
    # One tap on the first day's time shown books it.
    assert (await hold(patient, clinic, int(free[0]), json=False)).status == 303


async def test_a_hold_refused_when_nothing_is_left_says_so(patient, clinic, settings):
    # free_slots looks three days ahead: every day of the strip, three days at a time.
    everything = []
    for offset in range(0, 16, 3):
        everything += free_slots(settings, clinic.doctor_ids[0], offset * DAY, count=5000)
    _book_all(settings, clinic, list({s.starts_at: s for s in everything}.values()))
    page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    text = await (await patient.get(page)).text()
    assert 'data-testid="no-slots"' in text and PANEL.findall(text) == []
    resp = await hold(patient, clinic, everything[100].starts_at, json=False)
    assert resp.status == 409
    text = await resp.text()
    assert 'data-testid="no-slots"' in text and "未来两周没有可约时间。" in text
    assert len(PANEL.findall(text)) == 1  # the tried day, every time taken


async def test_pages_kept_whole_carry_each_patients_own_token_and_settings(patient, other, clinic, settings):
    """The slot page and the refused hold's page are kept whole for everybody alike: only the
    form's token is each patient's own, and a patient reading large text gets large text."""
    page = f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"
    mine = await (await patient.get(page)).text()
    other.session.cookie_jar.update_cookies({"consult_text": "large"})
    theirs = await (await other.get(page)).text()
    assert f'value="{patient.csrf}"' in mine and patient.csrf not in theirs
    assert f'value="{other.csrf}"' in theirs and 'class="text-large"' in theirs
    assert 'class="text-large"' not in mine and "csrfmark" not in mine + theirs
    first, _second = free_slots(settings, clinic.doctor_ids[0], 2 * DAY, count=2)
    assert (await hold(patient, clinic, first.starts_at, json=False)).status == 303
    for client in (other, patient, other):
        resp = await hold(client, clinic, first.starts_at, json=False)
        assert resp.status == 409
        text = await resp.text()
        assert f'name="csrf_token" value="{client.csrf}"' in text and "csrfmark" not in text
