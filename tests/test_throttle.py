"""Sign-in and registration throttling: not raceable, never a lock-out, bounded storage."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from consult import booking
from consult.accounts.throttle import Throttle, address_key, delay_after
from consult.app import create_app
from consult.calls import links as calllinks
from consult.core import keys, security
from consult.core.errors import TooManyRequests
from tests.booking_helpers import free_slots, make_clinic, signed_in, visit_row, write
from tests.conftest import csrf_of


class Clock:
    """The throttle's clock, moved by hand: delays are waited out without sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def addresses(monkeypatch):
    """Requests say which address they come from (X-Test-Address): the test client is always
    127.0.0.1, and views take the address from ``security.client_address`` only."""
    real = security.client_address

    def client_address(request):
        return request.headers.get("X-Test-Address") or real(request)

    monkeypatch.setattr(security, "client_address", client_address)


async def start(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    clock = Clock()
    client.app[keys.THROTTLE].clock = clock
    client.csrf = await csrf_of(client)
    return client, clock


async def new_browser(aiohttp_client, client):
    other = await aiohttp_client(client.server)
    other.csrf = await csrf_of(other)
    return other


async def sign_in(client, identifier, password="correct horse", address=None, lang="en"):
    headers = {"Accept-Language": lang}
    if address:
        headers["X-Test-Address"] = address
    resp = await client.post(
        "/login",
        data={"identifier": identifier, "password": password, "csrf_token": client.csrf},
        headers=headers,
        allow_redirects=False,
    )
    if resp.status == 303:  # signing in renews the CSRF token, as the next page would show
        client.csrf = await csrf_of(client)
    return resp


async def throttle_row(client, key):
    return await client.app[keys.DB].query_one("SELECT * FROM login_throttle WHERE key = ?", [key])


def test_delays_grow_and_are_capped():
    assert [delay_after(n, 5, 300) for n in range(4, 16)] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert delay_after(10_000, 5, 300) == 300


def test_addresses_are_counted_by_ipv4_or_ipv6_64():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("203.0.113.0/24") == "203.0.113.0/24"  # masked by settings: as given
    assert address_key(None) is None


async def test_parallel_wrong_passwords_are_counted_each(aiohttp_client, settings, make_user, monkeypatch):
    uid = make_user("doctor", "dr.p")
    client, clock = await start(aiohttp_client, settings)
    passwords = client.app[keys.PASSWORDS]
    checked = []
    verify = passwords.verify_async

    async def counting_verify(stored, password):
        checked.append(password)
        return await verify(stored, password)

    monkeypatch.setattr(passwords, "verify_async", counting_verify)
    responses = await asyncio.gather(*(sign_in(client, "dr.p", f"wrong {i}") for i in range(20)))
    statuses = Counter(r.status for r in responses)
    # The allowance is 5: five guesses reached argon2, the fifteen others were turned away.
    assert statuses == {401: 5, 429: 15}, statuses
    assert len(checked) == 5
    pair = await throttle_row(client, f"p:127.0.0.1|{uid}")
    assert pair["failures"] + pair["refused"] == 20
    assert pair["failures"] == 5
    assert all(int(r.headers["Retry-After"]) == 1 for r in responses if r.status == 429)
    # Even the right password waits its turn; then it works and the pair starts afresh.
    assert (await sign_in(client, "dr.p")).status == 429
    clock.advance(1)
    resp = await sign_in(client, "dr.p")
    assert resp.status == 303 and resp.headers["Location"] == "/doctor"
    assert await throttle_row(client, f"p:127.0.0.1|{uid}") is None
    assert (await throttle_row(client, f"u:{uid}"))["failures"] == 5  # the success gave its own back


async def test_owner_is_delayed_never_locked(aiohttp_client, settings, make_user, addresses):
    make_user("patient", "13900000001")
    owner, clock = await start(aiohttp_client, settings)
    assert (await sign_in(owner, "13900000001", address="10.0.0.2")).status == 303  # device cookie

    attacker = await new_browser(aiohttp_client, owner)
    waits = []
    failures = 0
    while failures < 40:
        resp = await sign_in(attacker, "13900000001", "guess", address="10.0.0.66")
        if resp.status == 429:
            waits.append(int(resp.headers["Retry-After"]))
            clock.advance(waits[-1])
        else:
            assert resp.status == 401
            failures += 1
    # 1 s, 2 s, 4 s … never more than the cap of 300 s.
    assert waits[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert set(waits[9:]) == {300}

    # The owner's browser that signed in before is not held back by anybody else's failures.
    assert (await sign_in(owner, "13900000001", address="10.0.0.2")).status == 303
    # A new phone of the owner is slowed by the attack on the account, told when, in Chinese by
    # default, and gets in when that time has come.
    phone = await new_browser(aiohttp_client, owner)
    resp = await sign_in(phone, "13900000001", address="10.0.0.3", lang="zh-CN")
    assert resp.status == 429
    wait = int(resp.headers["Retry-After"])
    assert 0 < wait <= 300
    assert "登录失败次数过多" in await resp.text()
    clock.advance(wait)
    resp = await sign_in(phone, "13900000001", address="10.0.0.3")
    assert resp.status == 303 and resp.headers["Location"] == "/patient"


async def test_a_busy_address_does_not_stop_others_behind_it(aiohttp_client, settings, make_user):
    make_user("patient", "13900000001")
    make_user("doctor", "dr.fresh")
    for i in range(10):
        make_user("doctor", f"dr.{i}")
    attacker, _clock = await start(aiohttp_client, settings)
    # 100 failures from one address (a hospital NAT): 50 made-up names, 5 guesses on each of 10 staff.
    names = [f"nobody{i}" for i in range(50)] + [f"dr.{i}" for i in range(10) for _ in range(5)]
    for name in names:
        assert (await sign_in(attacker, name, "guess")).status == 401
    # The address is now slowed on every account it has failed on, and on made-up names ...
    for name in ["nobody-else", "dr.0", "dr.9"]:
        resp = await sign_in(attacker, name, "guess")
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    # ... but a patient and a doctor with no failures, behind the same address, sign in at once.
    patient = await new_browser(aiohttp_client, attacker)
    assert (await sign_in(patient, "13900000001")).status == 303
    doctor = await new_browser(aiohttp_client, attacker)
    assert (await sign_in(doctor, "dr.fresh")).status == 303


async def test_registration_flood_gets_429(aiohttp_client, make_settings, addresses, monkeypatch):
    settings = make_settings(register_max_per_address=3, register_window_minutes=60)
    client, clock = await start(aiohttp_client, settings)
    passwords = client.app[keys.PASSWORDS]
    hashed = []
    hash_async = passwords.hash_async

    async def counting_hash(password):
        hashed.append(password)
        return await hash_async(password)

    monkeypatch.setattr(passwords, "hash_async", counting_hash)

    async def register(phone, address="198.51.100.7", lang="en", browser=client):
        browser.csrf = await csrf_of(browser)  # a registration signs in and renews the token
        return await browser.post(
            "/register",
            data={
                "name": "Flood",
                "phone": phone,
                "password": "long enough pw",
                "password2": "long enough pw",
                "csrf_token": browser.csrf,
            },
            headers={"X-Test-Address": address, "Accept-Language": lang},
            allow_redirects=False,
        )

    for i in range(3):
        assert (await register(f"1390000010{i}")).status == 303
    resp = await register("13900000199")
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(20 * 60)  # one more every 60 / 3 minutes
    assert "Too many accounts were created from your network. Try again in 20 minutes." in await resp.text()
    # A newcomer (no account, so no language chosen yet) reads it in Chinese.
    newcomer = await new_browser(aiohttp_client, client)
    resp = await register("13900000199", lang="zh-CN", browser=newcomer)
    assert resp.status == 429 and "注册的账户过多" in await resp.text()
    assert len(hashed) == 3  # refused before the expensive hash
    count = await client.app[keys.DB].query_one("SELECT count(*) AS n FROM users WHERE phone = '13900000199'")
    assert count["n"] == 0
    # Another address is not affected; the flooding one gets one more when the allowance refills.
    assert (await register("13900000200", address="198.51.100.8")).status == 303
    clock.advance(20 * 60)
    assert (await register("13900000199")).status == 303
    assert (await register("13900000201")).status == 429


async def test_throttle_rows_stay_bounded(database):
    clock = Clock()
    throttle = Throttle(
        database,
        secret="k",
        per_account=5,
        per_account_total=20,
        per_address=100,
        window_s=900,
        max_delay_s=300,
        register_burst=10,
        register_window_s=3600,
        clock=clock,
    )

    async def rows():
        return (await database.query_one("SELECT count(*) AS n FROM login_throttle"))["n"]

    async def keys_():
        return {r["key"] for r in await database.query("SELECT key FROM login_throttle")}

    async def try_(identifier, address):
        try:
            await throttle.reserve(identifier, address)
        except TooManyRequests as exc:
            clock.advance(exc.retry_after)

    # Made-up names create no rows of their own, whatever their number: only the address counts.
    for i in range(1000):
        await try_(f"made-up-{i}", "203.0.113.9")
    assert await keys_() == {"a:203.0.113.9"}
    # Every address of one IPv6 /64 is one address.
    for i in range(200):
        await try_("made-up", f"2001:db8:0:1::{i:x}")
    v6 = {k for k in await keys_() if ":2001" in k}
    assert v6 == {"a:2001:db8:0:1::/64"}
    # Registration floods: one bucket per address.
    for _ in range(50):
        await database.execute_write_fn(lambda db: throttle.reserve_registration_sync(db, "203.0.113.9"))
    assert "r:203.0.113.9" in await keys_()
    assert await rows() <= 3
    # Everything is forgotten once quiet for the window (and past any delay): pruned on the next try.
    clock.advance(3600 + 1)
    await try_("made-up", "192.0.2.1")
    assert await rows() == 1


async def test_throttled_patient_call_link_still_opens(
    aiohttp_server, aiohttp_client, make_settings, make_user
):
    settings = make_settings(booking_lead_minutes=0)
    clinic = make_clinic(settings, make_user, minutes=5)
    make_user("patient", login="13900000001")
    server = await aiohttp_server(create_app(settings))
    patient = await signed_in(aiohttp_client, server, "13900000001")
    slot = free_slots(settings, clinic.doctor_ids[0], 60)[0]
    resp = await patient.post(
        "/book/hold",
        data={
            "doctor_id": clinic.doctor_ids[0],
            "department_id": clinic.department_id,
            "starts_at": slot.starts_at,
            "csrf_token": patient.csrf,
        },
        headers={"Accept": "application/json"},
    )
    public_id = (await resp.json())["public_id"]
    row = visit_row(settings, public_id)
    write(settings, lambda d: booking.confirm_paid_sync(d, row["id"], time.time()))
    token = calllinks.make_token(
        server.app[keys.SETTINGS], public_id, "patient", row["call_nonce"], slot.starts_at, slot.ends_at
    )
    # Somebody who knows the mobile number hammers the patient's sign-in until it is throttled.
    attacker = await aiohttp_client(server)
    attacker.csrf = await csrf_of(attacker)
    statuses = [(await sign_in(attacker, "13900000001", "guess")).status for _ in range(8)]
    assert statuses[-1] == 429
    phone = await aiohttp_client(server)
    phone.csrf = await csrf_of(phone)
    assert (await sign_in(phone, "13900000001")).status == 429
    # The call link does not go through sign-in: it opens all the same.
    resp = await phone.get(f"/call/{token}")
    assert resp.status == 200
    assert "Your visit starts at" in await resp.text()
