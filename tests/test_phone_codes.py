"""Mobile numbers checked as mainland China numbers; registration confirmed and patients' passwords
reset by a one-time code sent by SMS (the outbox stands in for the gateway)."""

from __future__ import annotations

import re
import time

import pytest

from consult.accounts import users as accounts
from consult.accounts.codes import CODES, REGISTER, Registration, clean_code
from consult.app import create_app
from consult.core import i18n, keys, security
from consult.core.errors import BadRequest, TooManyRequests
from tests.account_helpers import enter_code, last_code, outbox_for, register, start_registration
from tests.conftest import csrf_of, login


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def addresses(monkeypatch):
    """X-Test-Address says which address a request comes from (the test client is 127.0.0.1)."""
    real = security.client_address
    monkeypatch.setattr(
        security, "client_address", lambda request: request.headers.get("X-Test-Address") or real(request)
    )


async def code_rows(client) -> list[dict]:
    return [dict(r) for r in await client.app[keys.DB].query("SELECT * FROM phone_codes")]


async def user_count(client, phone: str) -> int:
    row = await client.app[keys.DB].query_one("SELECT count(*) AS n FROM users WHERE phone = ?", [phone])
    return row["n"]


# -- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("13900000001", "13900000001"),
        ("139 0000 0001", "13900000001"),
        ("139-0000-0001", "13900000001"),
        ("+86 139 0000 0001", "13900000001"),
        ("+86-13900000001", "13900000001"),
        ("0086 139 0000 0001", "13900000001"),
        ("(+86) 199 1234 5678", "19912345678"),
        ("１３９ ００００ ０００１ ", "13900000001"),  # full-width digits from a Chinese input method
    ],
)
def test_mainland_numbers_are_normalized(typed, stored):
    assert accounts.normalize_phone(typed) == stored


@pytest.mark.parametrize(
    "typed",
    [
        "123456",
        "",
        "1390000000",
        "139000000012",
        "12900000001",
        "+8612900000001",
        "+1 139 0000 0001",
        "86139",
    ],
)
def test_other_numbers_are_refused_in_the_mainland_setting(typed):
    token = i18n.set_locale("en")
    try:
        with pytest.raises(BadRequest, match="11-digit mainland China mobile number"):
            accounts.normalize_phone(typed)
    finally:
        i18n._current.reset(token)


def test_the_international_setting_takes_the_old_rule():
    assert accounts.normalize_phone("123456", "international") == "123456"
    assert accounts.normalize_phone("+44 20 7946 0958", "international") == "+442079460958"
    with pytest.raises(BadRequest):
        accounts.normalize_phone("12345", "international")


def test_codes_are_six_digits_however_typed():
    assert clean_code(" 123 456 ") == "123456"
    assert clean_code("１２３４５６") == "123456"
    for bad in ("12345", "1234567", "abcdef", "", None, "١٢٣٤٥٦"):
        assert clean_code(bad) is None


async def test_123456_is_refused_in_chinese_and_in_english(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(default_locale="zh_CN")))
    token = await csrf_of(client, "/register")
    form = {"name": "王", "phone": "123456", "password": "long enough pw", "password2": "long enough pw"}
    resp = await client.post("/register", data={**form, "csrf_token": token})
    assert resp.status == 400
    text = await resp.text()
    assert "请输入 11 位中国大陆手机号码" in text
    assert 'value="123456"' in text  # what was typed stays in the form
    resp = await client.post(
        "/register", data={**form, "csrf_token": token}, headers={"Accept-Language": "en"}
    )
    assert resp.status == 400
    assert "Enter an 11-digit mainland China mobile number" in await resp.text()
    assert await outbox_for(client.app, "123456") == []
    assert await code_rows(client) == []


async def test_international_setting_registers_other_numbers(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(phone_region="international")))
    await register(client, "+44 20 7946 0958", stored="+442079460958")
    assert await user_count(client, "+442079460958") == 1


async def test_plus86_and_spaces_are_normalized_and_sign_in_either_way(client):
    await start_registration(client, "+86 139-0000 0005", name="韩梅梅")
    assert [m["recipient"] for m in await outbox_for(client.app, "13900000005")] == ["13900000005"]
    await enter_code(client, await last_code(client.app, "13900000005"))
    assert await user_count(client, "13900000005") == 1
    client.session.cookie_jar.clear()
    await login(client, "+86 139 0000 0005", "s3cret-pass")
    client.session.cookie_jar.clear()
    await login(client, "139-0000-0005", "s3cret-pass")


async def test_accounts_with_numbers_of_an_older_rule_still_sign_in(client, make_user):
    make_user("patient", "123456")
    make_user("patient", "+8613900000007")
    await login(client, "123456")
    client.session.cookie_jar.clear()
    await login(client, "+8613900000007")


# -- registration ---------------------------------------------------------------------------------


async def test_register_code_from_the_outbox_makes_the_account(client):
    await start_registration(client, "13900000002")
    message = (await outbox_for(client.app, "13900000002"))[-1]
    assert message["channel"] == "sms" and "10 minutes" in message["body"]
    code = await last_code(client.app, "13900000002")
    rows = await code_rows(client)
    assert len(rows) == 1 and rows[0]["purpose"] == REGISTER
    assert code not in repr(rows)  # only its HMAC is stored
    assert await user_count(client, "13900000002") == 0
    await login(client, "13900000002", "s3cret-pass", expect=401)  # nothing to sign in to yet
    await enter_code(client, code)
    assert await user_count(client, "13900000002") == 1
    assert await code_rows(client) == []
    assert (await client.get("/patient")).status == 200
    audit = await client.app[keys.DB].query("SELECT action FROM audit_log ORDER BY id")
    assert audit[0]["action"] == "account.create"


async def test_the_code_arrives_in_the_language_of_the_page(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(default_locale="zh_CN")))
    await start_registration(client, "13900000008")
    body = (await outbox_for(client.app, "13900000008"))[-1]["body"]
    assert body.startswith("【Consult Hospital】") and "10 分钟内有效" in body


async def test_wrong_code_five_times_kills_it(client):
    await start_registration(client, "13900000002")
    code = await last_code(client.app, "13900000002")
    wrong = "000000" if code != "000000" else "111111"
    resp = await enter_code(client, "12ab", expect=400)  # not a code: nothing counted
    assert "6-digit code" in await resp.text()
    for left in (4, 3, 2, 1):
        resp = await enter_code(client, wrong, expect=400)
        assert f"You can try {left} more time" in await resp.text()
    resp = await enter_code(client, wrong, expect=400)
    assert "too many times" in await resp.text()
    resp = await enter_code(client, code, expect=400)
    assert "too many times" in await resp.text()
    assert await user_count(client, "13900000002") == 0
    assert (await code_rows(client))[0]["code_hash"] is None


async def test_expired_code_is_refused(client):
    clock = Clock()
    client.app[CODES].clock = clock
    await start_registration(client, "13900000002")
    code = await last_code(client.app, "13900000002")
    clock.advance(10 * 60 + 1)
    resp = await enter_code(client, code, expect=400)
    assert "expired" in await resp.text()
    assert await user_count(client, "13900000002") == 0


async def test_resend_is_throttled_per_number(client):
    clock = Clock()
    client.app[CODES].clock = clock
    await start_registration(client, "13900000002")
    first = await last_code(client.app, "13900000002")
    page = await (await client.get("/register/verify")).text()
    assert 'data-resend-in="60"' in page or 'data-resend-in="59"' in page

    async def resend(expect: int):
        token = await csrf_of(client, "/register/verify")
        resp = await client.post("/register/resend", data={"csrf_token": token}, allow_redirects=False)
        assert resp.status == expect, await resp.text()
        return resp

    resp = await resend(429)
    assert "You can ask for a new one in 60 seconds" in await resp.text()
    assert int(resp.headers["Retry-After"]) == 60
    assert len(await outbox_for(client.app, "13900000002")) == 1
    for _ in range(4):  # five codes per number per hour
        clock.advance(61)
        resp = await resend(303)
        assert resp.headers["Location"] == "/register/verify?sent=1"
    assert len(await outbox_for(client.app, "13900000002")) == 5
    clock.advance(61)
    resp = await resend(429)
    assert "Too many codes were sent to this number. Try again in 55 minutes." in await resp.text()
    # Only the newest code works; it is entered in the same page.
    newest = await last_code(client.app, "13900000002")
    if newest != first:
        await enter_code(client, first, expect=400)
    await enter_code(client, newest)
    assert await user_count(client, "13900000002") == 1


async def test_registering_the_same_number_again_is_throttled_too(client):
    await start_registration(client, "13900000002")
    resp = await start_registration(client, "13900000002", expect=429)
    assert "a moment ago" in await resp.text()


async def test_only_the_browser_that_asked_can_answer(aiohttp_client, client):
    """Someone else registering the owner's number cannot use the owner's code, nor make the
    owner's browser finish a registration with the stranger's password."""
    clock = Clock()
    client.app[CODES].clock = clock
    await start_registration(client, "13900000002", password="owner's password")
    stranger = await aiohttp_client(client.server)
    clock.advance(61)
    await start_registration(stranger, "13900000002", name="Stranger", password="stranger's password")
    code = await last_code(client.app, "13900000002")
    resp = await enter_code(client, code, expect=400)  # the owner's flow was replaced
    assert "start again" in await resp.text()
    cookieless = await aiohttp_client(client.server)
    token = await csrf_of(cookieless, "/login")
    resp = await cookieless.post(
        "/register/verify", data={"code": code, "csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/register"
    assert await user_count(client, "13900000002") == 0


async def test_a_taken_number_is_told_before_any_code(client, make_user):
    make_user("patient", "13900000003")
    resp = await start_registration(client, "139 0000 0003", expect=409)
    assert "already exists" in await resp.text()
    assert await outbox_for(client.app, "13900000003") == []


# -- password reset -------------------------------------------------------------------------------


async def forgot(client, phone: str, headers=None):
    token = await csrf_of(client, "/password/forgot")
    return await client.post(
        "/password/forgot",
        data={"phone": phone, "csrf_token": token},
        headers=headers or {},
        allow_redirects=False,
    )


async def reset(client, code: str, password: str = "a brand new pw", expect: int = 303):
    return await enter_code(
        client, code, path="/password/reset", expect=expect, password=password, password2=password
    )


async def test_password_reset_by_code_ends_other_sessions(aiohttp_client, client, make_user):
    make_user("patient", "13900000001")
    other_device = await aiohttp_client(client.server)
    await login(other_device, "13900000001")
    assert (await other_device.get("/patient", allow_redirects=False)).status == 200

    resp = await forgot(client, "+86 139 0000 0001")
    assert resp.status == 303 and resp.headers["Location"] == "/password/reset"
    page = await (await client.get("/password/reset")).text()
    assert "If +8613900000001 belongs to an account" in page
    code = await last_code(client.app, "13900000001")
    assert "set a new password" in (await outbox_for(client.app, "13900000001"))[-1]["body"]
    resp = await reset(client, "12345", expect=400)
    assert "6-digit code" in await resp.text()
    resp = await enter_code(
        client, code, path="/password/reset", expect=400, password="a brand new pw", password2="different"
    )
    assert "do not match" in await resp.text()
    resp = await reset(client, code)
    assert resp.headers["Location"] == "/login?reset=1"
    assert "Sign in with the new one" in await (await client.get("/login?reset=1")).text()

    assert (await other_device.get("/patient", allow_redirects=False)).status == 303  # signed out
    await login(client, "13900000001", "correct horse", expect=401)
    await login(client, "13900000001", "a brand new pw")
    await reset(client, code, expect=303)  # the flow is over: back to the start
    audit = await client.app[keys.DB].query("SELECT action FROM audit_log ORDER BY id")
    assert audit[-1]["action"] == "account.reset_password_by_code"


async def test_reset_for_an_unknown_number_answers_the_same_and_sends_nothing(client, make_user):
    make_user("patient", "13900000001")
    outbox_before = await client.app[keys.DB].query_one("SELECT count(*) AS n FROM outbox")
    known = await forgot(client, "13900000001")
    known_page = await (await client.get("/password/reset")).text()
    known_wrong = await (await reset(client, "000000", expect=400)).text()
    unknown = await forgot(client, "13900000002")
    unknown_page = await (await client.get("/password/reset")).text()
    unknown_wrong = await (await reset(client, "000000", expect=400)).text()

    assert (known.status, known.headers["Location"]) == (unknown.status, unknown.headers["Location"])
    assert set(known.cookies) == set(unknown.cookies)
    assert comparable(known_page) == comparable(unknown_page)
    assert comparable(known_wrong) == comparable(unknown_wrong)
    assert await outbox_for(client.app, "13900000002") == []
    after = await client.app[keys.DB].query_one("SELECT count(*) AS n FROM outbox")
    assert after["n"] == outbox_before["n"] + 1  # the known number's code only
    assert [r["phone"] for r in await code_rows(client)] == ["13900000001"]


def comparable(page: str) -> str:
    """A page without the number typed, its CSRF token and its resend countdown, which differ
    between any two renders."""
    page = page.replace("139 0000 0001", "N").replace("139 0000 0002", "N")
    page = re.sub(r'name="csrf_token" value="[0-9a-f]+"', "", page)
    return re.sub(r'data-resend-in="\d+"', "", page)


async def test_reset_of_a_known_number_over_its_limit_still_answers_the_same(client, make_user):
    make_user("patient", "13900000001")
    assert (await forgot(client, "13900000001")).status == 303
    resp = await forgot(client, "13900000001")  # within the minute: not sent, not told
    assert resp.status == 303 and resp.headers["Location"] == "/password/reset"
    assert len(await outbox_for(client.app, "13900000001")) == 1


async def test_forgot_asks_for_a_mobile_number(client, make_user):
    make_user("doctor", "dr.q")
    resp = await forgot(client, "dr.q")
    assert resp.status == 400
    assert "mainland China mobile number" in await resp.text()


# -- bounds ---------------------------------------------------------------------------------------


async def test_storage_stays_bounded_under_a_flood_of_numbers(aiohttp_client, make_settings, addresses):
    client = await aiohttp_client(create_app(make_settings(sms_code_max_pending=50)))
    codes = client.app[CODES]
    clock = Clock()
    codes.clock = clock
    registration = Registration("Flood", "not-a-real-hash", "en")
    sent = refused = 0
    # Many addresses, each within its own allowance, each number new.
    for i in range(300):
        phone = f"1380000{i:04d}"
        try:
            await codes.start_registration(phone, codes.new_flow(), f"203.0.113.{i % 250}", registration)
            sent += 1
        except TooManyRequests:
            refused += 1
    assert sent == 50 and refused == 250
    assert len(await code_rows(client)) == 50
    messages = await client.app[keys.DB].query_one("SELECT count(*) AS n FROM outbox")
    assert messages["n"] == 50  # nothing is sent for a refused number either
    # One address alone meets its own limit long before that.
    client.app[CODES].max_pending = 10_000
    clock.advance(3600 + 600 + 1)  # every code expired and every window over
    statuses = []
    for i in range(30):
        try:
            await codes.start_registration(f"1370000{i:04d}", codes.new_flow(), "198.51.100.1", registration)
            statuses.append("sent")
        except TooManyRequests as exc:
            statuses.append(exc.status)
    assert statuses == ["sent"] * 20 + [429] * 10
    assert len(await code_rows(client)) == 20  # the expired rows were pruned by the next write


async def test_the_registration_form_is_throttled_per_address(client, addresses):
    resp = None
    for i in range(12):
        token = await csrf_of(client, "/register")
        resp = await client.post(
            "/register",
            data={
                "name": "A",
                "phone": f"1360000{i:04d}",
                "password": "long enough pw",
                "password2": "long enough pw",
                "csrf_token": token,
            },
            headers={"X-Test-Address": "192.0.2.9"},
            allow_redirects=False,
        )
        if resp.status == 429:
            break
    assert resp is not None and resp.status == 429 and "Retry-After" in resp.headers
