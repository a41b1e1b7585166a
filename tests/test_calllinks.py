from __future__ import annotations

import dataclasses
import time

import pytest

from consult import booking
from consult.app import create_app
from consult.calls import links as calllinks
from consult.core import keys
from consult.core.config import ensure_secrets
from consult.core.logs import redact
from tests.booking_helpers import free_slots, make_clinic, read, signed_in, visit_row, write

START, END = 1_900_000_000, 1_900_000_900


@pytest.fixture
def keyed(settings):
    return ensure_secrets(settings)


def test_valid_token_round_trips(keyed):
    token = calllinks.make_token(keyed, "pub-123456789", "patient", "nonce", START, END)
    assert calllinks.verify(keyed, token, START) == ("pub-123456789", "patient")
    assert calllinks.verify(keyed, token, START - 15 * 60) == ("pub-123456789", "patient")
    assert calllinks.verify(keyed, token, END + 15 * 60) == ("pub-123456789", "patient")
    assert calllinks.decode(keyed, token, START).nonce == "nonce"


def test_expired_and_early_tokens(keyed):
    token = calllinks.make_token(keyed, "pub-123456789", "patient", "nonce", START, END)
    with pytest.raises(calllinks.CallLinkExpired, match="expired"):
        calllinks.verify(keyed, token, END + 15 * 60 + 1)
    with pytest.raises(calllinks.CallLinkNotYetValid, match="15 minutes before") as err:
        calllinks.verify(keyed, token, START - 15 * 60 - 1)
    assert err.value.opens_at == START - 15 * 60


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature changed
        lambda t: calllinks._b64(b"pub-123456789|patient|nonce|0|9999999999") + "." + t.split(".")[1],
        lambda t: t.replace(".", ""),
        lambda t: t + ".x",
        lambda t: "",
        lambda t: "!!!.???",
        lambda t: "a" * 500,
    ],
)
def test_tampered_tokens_are_invalid(keyed, mangle):
    token = calllinks.make_token(keyed, "pub-123456789", "patient", "nonce", START, END)
    with pytest.raises(calllinks.CallLinkInvalid):
        calllinks.verify(keyed, mangle(token), START)


def test_another_key_or_a_widened_window_is_invalid(keyed):
    token = calllinks.make_token(keyed, "pub-123456789", "patient", "nonce", START, END)
    other = dataclasses.replace(keyed, session_key="another key")
    with pytest.raises(calllinks.CallLinkInvalid):
        calllinks.verify(other, token, START)
    forged_payload = calllinks._b64(b"pub-123456789|doctor|nonce|0|9999999999")
    with pytest.raises(calllinks.CallLinkInvalid):
        calllinks.verify(keyed, forged_payload + "." + token.split(".")[1], START)


def test_tokens_are_redacted_from_access_logs(keyed):
    token = calllinks.make_token(keyed, "pub-123456789", "patient", "nonce", START, END)
    assert token[10:] not in redact(calllinks.call_path(token))


@pytest.mark.locale("en")  # asserts English texts
async def test_call_route(aiohttp_server, aiohttp_client, make_settings, make_user):
    # 5-minute visits and no lead time: the next slot starts within the link's early window.
    settings = make_settings(booking_lead_minutes=0)
    clinic = make_clinic(settings, make_user, minutes=5)
    make_user("patient", login="13900000001")
    server = await aiohttp_server(create_app(settings))
    keyed = server.app[keys.SETTINGS]
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
    vid = row["id"]
    write(settings, lambda d: booking.confirm_paid_sync(d, vid, time.time()))
    page = await (await patient.get(f"/visits/{public_id}")).text()
    token = calllinks.make_token(keyed, public_id, "patient", row["call_nonce"], slot.starts_at, slot.ends_at)
    assert f"/call/{token}" in page
    anon = await aiohttp_client(server)  # another device, not signed in
    resp = await anon.get(f"/call/{token}")
    assert resp.status == 200
    assert "Your visit starts at" in await resp.text()
    # Tampered, and a link replaced by a reschedule (new nonce), are refused clearly.
    resp = await anon.get(f"/call/{token[:-3]}xyz")
    assert resp.status == 403 and "not valid" in await resp.text()
    write(settings, lambda d: d.execute("UPDATE visits SET call_nonce = 'rotated' WHERE id = ?", [vid]))
    resp = await anon.get(f"/call/{token}")
    assert resp.status == 403 and "replaced" in await resp.text()
    # Too early: a page that says when the link opens.
    starts = time.time() + 86400
    later = calllinks.make_token(keyed, public_id, "patient", "rotated", starts, starts + 600)
    resp = await anon.get(f"/call/{later}")
    page = await resp.text()
    # Too early is a page, not an error: the visit, a countdown to the opening (which the page
    # follows by itself: call-early.js), a local device test; no signaling, nothing cached.
    assert resp.status == 200 and 'data-testid="call-early"' in page
    assert f'data-opens-at="{int(starts) - calllinks.EARLY_S}"' in page
    assert "opens 15 minutes before the visit" in page and 'data-action="test-devices"' in page
    assert "Today at" in page or "Tomorrow at" in page  # the visit's start, in words
    assert "call-early.js" in page and "call.js" not in page and "signaling-client.js" not in page
    assert "Asia/" not in page and "UTC" not in page  # no time-zone names for patients
    assert resp.headers["Cache-Control"] == "no-store"
    # The doctor's early link leads to the consult room (whose own window is earlier).
    doctor_early = calllinks.make_token(
        keyed, public_id, "doctor", "rotated", time.time() + 86400, time.time() + 87000
    )
    resp = await anon.get(f"/call/{doctor_early}", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/doctor/visits/{public_id}/room"
    # An early link of a moved visit is refused like any replaced link.
    moved = calllinks.make_token(keyed, public_id, "patient", "old", time.time() + 86400, time.time() + 87000)
    resp = await anon.get(f"/call/{moved}")
    assert resp.status == 403 and "replaced" in await resp.text()
    # Over: gone.
    old = calllinks.make_token(keyed, public_id, "patient", "rotated", time.time() - 7200, time.time() - 6000)
    resp = await anon.get(f"/call/{old}")
    assert resp.status == 410 and "expired" in await resp.text()
    # Cancelled visits' links stop working.
    fresh = calllinks.make_token(keyed, public_id, "patient", "rotated", slot.starts_at, slot.ends_at)
    assert (await anon.get(f"/call/{fresh}")).status == 200
    write(settings, lambda d: d.execute("UPDATE visits SET status = 'cancelled' WHERE id = ?", [vid]))
    assert (await anon.get(f"/call/{fresh}")).status == 403
    assert read(settings, lambda d: d.execute("SELECT count(*) FROM visits").fetchone()[0]) == 1
