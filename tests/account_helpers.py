"""Registering and resetting a password as a patient does: the code is read from the outbox (the
development SmsProvider), exactly where the demo's admin reads it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from consult.core import keys
from tests.conftest import csrf_of
from tests.db_helpers import read

CODE_RE = re.compile(r"(?<![0-9])([0-9]{6})(?![0-9])")


async def outbox_for(app, phone: str) -> list[dict]:
    rows = await app[keys.DB].query("SELECT * FROM outbox WHERE recipient = ? ORDER BY id", [phone])
    return [dict(r) for r in rows]


async def last_code(app, phone: str) -> str:
    messages = await outbox_for(app, phone)
    assert messages, f"no message to {phone}"
    found = CODE_RE.search(messages[-1]["body"])
    assert found, messages[-1]["body"]
    return found.group(1)


async def start_registration(
    client, phone: str, name: str = "李雷", password: str = "s3cret-pass", headers=None, expect: int = 303
):
    token = await csrf_of(client, "/register")
    resp = await client.post(
        "/register",
        data={"name": name, "phone": phone, "password": password, "password2": password, "csrf_token": token},
        headers=headers or {},
        allow_redirects=False,
    )
    assert resp.status == expect, await resp.text()
    if expect == 303:
        assert resp.headers["Location"] == "/register/verify"
    return resp


async def enter_code(client, code: str, path: str = "/register/verify", expect: int = 303, **fields):
    token = await csrf_of(client, path)
    resp = await client.post(path, data={"code": code, "csrf_token": token, **fields}, allow_redirects=False)
    assert resp.status == expect, await resp.text()
    return resp


async def register(
    client,
    phone: str = "13900000002",
    name: str = "李雷",
    password: str = "s3cret-pass",
    stored: str | None = None,
):
    """Register, read the code from the outbox, enter it: signed in (the 303 to /patient).
    ``stored``: the number as kept (default: the last 11 digits, a mainland number)."""
    await start_registration(client, phone, name, password)
    stored = stored or re.sub(r"[^0-9]", "", phone)[-11:]
    resp = await enter_code(client, await last_code(client.app, stored))
    assert resp.headers["Location"] == "/patient"
    return resp


def texted_code(target: Any, phone: str) -> str:
    """The one-time code the newest text message to ``phone`` carries (from the outbox of
    ``target``: a server, the test's settings, or a data dir holding a SQLite database)."""
    if isinstance(target, str | Path) and Path(target).is_dir():
        target = Path(target) / "consult.db"
    row = read(
        target,
        lambda d: d.execute(
            "SELECT body FROM outbox WHERE recipient = ? ORDER BY id DESC LIMIT 1", [phone]
        ).fetchone(),
    )
    assert row, "no code was texted"
    found = re.search(r"(?<![0-9])([0-9]{6})(?![0-9])", row[0])
    assert found, row[0]
    return found.group(1)
