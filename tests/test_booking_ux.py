"""Issue 12, booking on the patient's phone (in process, in Chinese as patients use it): the
confirmation before a cancellation with the refund amount, the slots inside the no-change window
marked, the date strip and its days, and no time-zone name on any patient page."""

from __future__ import annotations

import re
import time
from datetime import date, timedelta

import pytest

from consult.app import create_app
from consult.booking import schedules
from consult.core.formatting import to_local
from tests.booking_helpers import free_slots, hold, make_clinic, post, signed_in, visit_row, write
from tests.test_booking import pay

DAY = 86400
BUTTON = re.compile(r'<button type="submit" name="starts_at" value="(\d+)" class="slot( late)?"([^>]*)>')
PANEL = re.compile(r'<section class="day-panel" data-day-panel="([0-9-]+)"[^>]*?( hidden)?>')


@pytest.fixture
def settings(make_settings):
    return make_settings(booking_lead_minutes=20)


@pytest.fixture
def clinic(settings, make_user):
    return make_clinic(settings, make_user)


@pytest.fixture
async def server(aiohttp_server, settings, clinic):
    return await aiohttp_server(create_app(settings))


@pytest.fixture
async def patient(aiohttp_client, server, make_user):
    make_user("patient", login="13900000001", name="张伟")
    return await signed_in(aiohttp_client, server, "13900000001")


def slots_path(clinic) -> str:
    return f"/book/{clinic.department_id}/doctors/{clinic.doctor_ids[0]}"


async def test_cancelling_a_paid_visit_asks_first_and_says_the_refund(patient, clinic, settings):
    far = free_slots(settings, clinic.doctor_ids[0], 2 * DAY)[0]
    public_id = (await (await hold(patient, clinic, far.starts_at)).json())["public_id"]
    pay(settings, public_id)
    page = await (await patient.get(f"/visits/{public_id}")).text()
    # The visit page only leads to the confirmation; it has no form that cancels in one tap.
    assert f'href="/visits/{public_id}/cancel" data-testid="cancel"' in page
    assert f'action="/visits/{public_id}/cancel"' not in page

    confirm = await patient.get(f"/visits/{public_id}/cancel")
    assert confirm.status == 200
    text = await confirm.text()
    assert "取消后将退款 ¥50.00 到原支付方式。" in text
    assert 'name="csrf_token"' in text and 'name="confirm" value="yes"' in text

    # A POST that did not come from the confirmation's button cancels nothing: back to the question.
    resp = await post(patient, f"/visits/{public_id}/cancel", {})
    assert resp.status == 303 and resp.headers["Location"] == f"/visits/{public_id}/cancel"
    # Without the CSRF token, nothing either.
    resp = await patient.post(f"/visits/{public_id}/cancel", data={"confirm": "yes"}, allow_redirects=False)
    assert resp.status == 403
    assert visit_row(settings, public_id)["status"] == "confirmed"

    resp = await post(patient, f"/visits/{public_id}/cancel", {"confirm": "yes"})
    assert resp.status == 303 and resp.headers["Location"].endswith("?m=cancelled_refunded")
    assert visit_row(settings, public_id)["status"] == "cancelled"
    done = await (await patient.get(resp.headers["Location"])).text()
    assert "就诊已取消，¥50.00 已退回原支付方式。" in done
    # Asking again about a cancelled visit: a clear refusal.
    again = await patient.get(f"/visits/{public_id}/cancel")
    assert again.status == 409 and "无法取消" in await again.text()


async def test_cancelling_an_unpaid_hold_asks_without_refund_words(
    aiohttp_client, server, patient, clinic, settings, make_user
):
    slot = free_slots(settings, clinic.doctor_ids[0], 3600)[0]
    public_id = (await (await hold(patient, clinic, slot.starts_at)).json())["public_id"]
    text = await (await patient.get(f"/visits/{public_id}/cancel")).text()
    assert 'data-testid="cancel-no-refund"' in text and "退款" not in text
    make_user("patient", login="13900000002")
    stranger = await signed_in(aiohttp_client, server, "13900000002")
    assert (await stranger.get(f"/visits/{public_id}/cancel")).status == 404
    resp = await post(patient, f"/visits/{public_id}/cancel", {"confirm": "yes"})
    assert resp.status == 303 and resp.headers["Location"].endswith("?m=cancelled")
    assert visit_row(settings, public_id)["status"] == "cancelled"


async def test_a_paid_visit_inside_the_window_has_no_cancel_step(patient, clinic, settings):
    near = free_slots(settings, clinic.doctor_ids[0], 3 * 3600)[0]
    public_id = (await (await hold(patient, clinic, near.starts_at)).json())["public_id"]
    pay(settings, public_id)
    assert 'data-testid="cancel"' not in await (await patient.get(f"/visits/{public_id}")).text()
    resp = await patient.get(f"/visits/{public_id}/cancel")
    assert resp.status == 403 and "24 小时" in await resp.text()


async def test_slots_inside_the_no_change_window_are_marked(patient, clinic, settings):
    before = time.time()
    text = await (await patient.get(slots_path(clinic))).text()
    # The page shows one day; the strip fetches the others: three days' times (late in the
    # evening, today has only a few left).
    for url in re.findall(r'data-day-url="([^"]+)"', text)[:3]:
        text += await (await patient.get(url)).text()
    after = time.time()
    buttons = BUTTON.findall(text)
    free = [(int(v), bool(late)) for v, late, rest in buttons if "disabled" not in rest]
    assert len(free) > 100
    window = settings.cancel_free_hours * 3600
    for starts_at, late in free:
        if late:
            assert starts_at - before < window, starts_at
        else:
            assert starts_at - after >= window, starts_at
    assert any(late for _, late in free) and not all(late for _, late in free)
    # Each marked time says so in words, and points at the explanation.
    assert "不可改退" in text and 'data-testid="late-note"' in text
    assert "距现在不到 24 小时：付款后无法在网上改约或取消" in text
    assert re.search(r'class="slot late"[^>]*aria-describedby="late-note-[0-9-]+"', text)

    # Booking a marked time: its confirmation says the same; a time further out does not.
    late = next(s for s, is_late in free if is_late)
    public_id = (await (await hold(patient, clinic, late)).json())["public_id"]
    held = await (await patient.get(f"/visits/{public_id}")).text()
    assert 'data-testid="no-change-warning"' in held and "付款后无法在网上改约或取消" in held
    # (Well outside the window: the first time past it may slip inside while the test runs.)
    later = next(s for s, is_late in free if not is_late and s > late + 3600 and s - after > window + 600)
    public_id = (await (await hold(patient, clinic, later)).json())["public_id"]
    assert 'data-testid="no-change-warning"' not in await (await patient.get(f"/visits/{public_id}")).text()


async def test_the_date_strip_shows_one_day_at_a_time(patient, clinic, settings):
    today = to_local(time.time(), settings.timezone).date()
    leave_day = today + timedelta(days=4)
    write(
        settings,
        lambda d: schedules.add_exception_sync(
            d, clinic.doctor_ids[0], leave_day.isoformat(), "leave", tz=settings.timezone
        ),
    )
    text = await (await patient.get(slots_path(clinic))).text()
    days = re.findall(r'data-testid="day-([0-9-]+)"', text)
    assert days[0] == today.isoformat() and len(days) >= 14
    assert days == sorted(days) and len(set(days)) == len(days)
    # Every day with a free time is a link that works without script; a day off is not.
    links = re.findall(rf'href="{slots_path(clinic)}\?day=([0-9-]+)"', text)
    expected = set(days) - {leave_day.isoformat()}
    if today.isoformat() not in links:
        # Only late in the evening (the clinic's last time is 23:30): today may have none left.
        assert to_local(time.time(), settings.timezone).hour >= 22
        assert re.search(rf'<span class="day disabled" data-testid="day-{today}">', text)
        expected.discard(today.isoformat())
    assert leave_day.isoformat() not in links and set(links) == expected
    assert re.search(rf'<span class="day disabled" data-testid="day-{leave_day}">', text)
    assert "无门诊" in text and "明天" in text
    panels = PANEL.findall(text)
    shown = [d for d, hidden in panels if not hidden]
    assert len(shown) == 1 and shown[0] in links[:2]  # today, or tomorrow late at night
    assert f'data-day="{shown[0]}" data-testid="day-{shown[0]}" aria-current="true"' in text

    # ?day= shows that day, grouped by part of the day, with how many times are free.
    third = date.fromisoformat(links[2])
    text = await (await patient.get(f"{slots_path(clinic)}?day={third}")).text()
    assert [d for d, hidden in PANEL.findall(text) if not hidden] == [third.isoformat()]
    assert f'data-testid="day-{third}" aria-current="true"' in text
    panel = text.split(f'data-day-panel="{third}"')[1].split("</section>")[0]
    assert f"{third.month}月{third.day}日" in panel
    assert [h for h in re.findall(r'<h3 class="slot-part">(.+?)</h3>', panel)] == ["上午", "下午", "晚上"]
    assert len(BUTTON.findall(panel)) == 95  # from 00:00 to 23:30, the last to end by 23:59
    assert "余 95 个" in text.split(f'data-testid="day-{third}"')[1].split("</a>")[0]

    # A day off, a day out of range or nonsense: the first day with a free time.
    for bad in (leave_day.isoformat(), "2001-01-01", "not-a-day", "9" * 40):
        text = await (await patient.get(f"{slots_path(clinic)}?day={bad}")).text()
        assert [d for d, hidden in PANEL.findall(text) if not hidden] == shown


async def test_a_refused_time_comes_back_on_its_own_day(patient, clinic, settings):
    slot = free_slots(settings, clinic.doctor_ids[0], 3 * DAY)[0]
    assert (await hold(patient, clinic, slot.starts_at)).status == 201
    resp = await hold(patient, clinic, slot.starts_at, json=False)
    assert resp.status == 409
    text = await resp.text()
    day = to_local(slot.starts_at, settings.timezone).date().isoformat()
    assert [d for d, hidden in PANEL.findall(text) if not hidden] == [day]


async def test_no_time_zone_name_on_any_patient_page(patient, clinic, settings):
    near = free_slots(settings, clinic.doctor_ids[0], 3600)[0]
    far = free_slots(settings, clinic.doctor_ids[0], 2 * DAY)[0]
    held = (await (await hold(patient, clinic, near.starts_at)).json())["public_id"]
    paid = (await (await hold(patient, clinic, far.starts_at)).json())["public_id"]
    pay(settings, paid)
    paths = [
        "/patient",
        "/account",
        "/book",
        f"/book/{clinic.department_id}",
        slots_path(clinic),
        f"/visits/{held}",
        f"/visits/{held}/cancel",
        f"/visits/{paid}",
        f"/visits/{paid}/cancel",
        f"/visits/{paid}/reschedule",
    ]
    zone = settings.timezone
    assert "/" in zone  # an Area/City name, as a hospital's setting is
    for path in paths:
        resp = await patient.get(path)
        text = await resp.text()
        assert resp.status == 200, path
        assert zone not in text and "Asia/" not in text and "UTC" not in text, path


@pytest.mark.locale("en")  # asserts English texts
async def test_the_same_pages_in_english(patient, clinic, settings):
    # Tomorrow's page: a whole day (today's shows only what is left of it, perhaps no morning),
    # and at any hour some of it within the no-change window.
    tomorrow = to_local(time.time(), settings.timezone).date() + timedelta(days=1)
    text = await (await patient.get(f"{slots_path(clinic)}?day={tomorrow.isoformat()}")).text()
    assert "Today" in text and "Tomorrow" in text and "no changes" in text and "Morning" in text
    assert re.search(r'<span class="day-free">\d+ free</span>', text)
    far = free_slots(settings, clinic.doctor_ids[0], 2 * DAY)[0]
    public_id = (await (await hold(patient, clinic, far.starts_at)).json())["public_id"]
    pay(settings, public_id)
    text = await (await patient.get(f"/visits/{public_id}/cancel")).text()
    assert "If you cancel, ¥50.00 will be refunded to the original payment method." in text
    resp = await post(patient, f"/visits/{public_id}/cancel", {"confirm": "yes"})
    done = await (await patient.get(resp.headers["Location"])).text()
    assert "The visit was cancelled and ¥50.00 was refunded to the original payment method." in done
