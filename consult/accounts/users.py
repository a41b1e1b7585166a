"""Accounts and server-side sessions (sign-in throttling: ``consult.accounts.throttle``)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import sqlite3
import time
import unicodedata
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import sqlite_utils

from consult.audit import chain as audit
from consult.core.db import Database, IntegrityError
from consult.core.errors import BadRequest, Conflict
from consult.core.i18n import _

ROLES = ("patient", "doctor", "admin", "pharmacist")
HOME_BY_ROLE = {"patient": "/patient", "doctor": "/doctor", "admin": "/admin", "pharmacist": "/pharmacy"}
# Which mobile numbers a new account may use (the ``phone_region`` setting). Numbers already
# stored are never checked again: an account made under another rule still signs in.
PHONE_REGIONS = ("CN", "international")
PHONE_RE = re.compile(r"^\+?[0-9]{6,15}$")  # international: an optional '+' and 6 to 15 digits
CN_MOBILE_RE = re.compile(r"^1[3-9][0-9]{9}$")  # mainland China mobile numbers, without +86
CN_PREFIX_RE = re.compile(r"^(?:\+86|0086)(?=1[0-9]{10}$)")
PHONE_SEPARATORS_RE = re.compile(r"[\s().-]")
USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{2,31}$")


@dataclass(frozen=True)
class User:
    id: int
    role: str
    display_name: str
    username: str | None
    phone: str | None
    locale: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> User:
        return cls(
            id=row["id"],
            role=row["role"],
            display_name=row["display_name"],
            username=row["username"],
            phone=row["phone"],
            locale=row["locale"],
        )


def compact_phone(raw: str) -> str:
    """What was typed, without spaces, dashes, dots or brackets; full-width digits and '+' (a
    Chinese input method's) made ASCII."""
    return PHONE_SEPARATORS_RE.sub("", unicodedata.normalize("NFKC", raw or ""))


def normalize_phone(raw: str, region: str = "CN") -> str:
    """A new mobile number in the one form it is stored in, or BadRequest saying what is wanted.

    ``CN``: 11 digits starting 13 to 19; a +86 or 0086 in front is dropped ("+86 139-0000-0001"
    is stored as 13900000001). ``international``: an optional '+' and 6 to 15 digits.
    """
    phone = compact_phone(raw)
    if region == "CN":
        phone = CN_PREFIX_RE.sub("", phone)
        if not CN_MOBILE_RE.match(phone):
            raise BadRequest(_("Enter an 11-digit mainland China mobile number, for example 139 0000 0001."))
        return phone
    if not PHONE_RE.match(phone):
        raise BadRequest(_("Enter a valid mobile number (digits only, 6 to 15 of them)."))
    return phone


def phone_lookups(identifier: str) -> list[str]:
    """The stored numbers a typed sign-in identifier may mean, most literal first: as typed
    (without separators), then as a mainland number without +86. Empty: not a number."""
    compact = compact_phone(identifier)
    if not re.fullmatch(r"\+?[0-9]+", compact):
        return []
    found = [compact]
    mainland = CN_PREFIX_RE.sub("", compact)
    if mainland != compact and CN_MOBILE_RE.match(mainland):
        found.append(mainland)
    return found


def normalize_username(raw: str) -> str:
    name = (raw or "").strip().lower()
    if not USERNAME_RE.match(name):
        raise BadRequest(_("A username has 3 to 32 characters: lowercase letters, digits, '.', '_' or '-'."))
    return name


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user_sync(
    db: sqlite_utils.Database,
    *,
    role: str,
    display_name: str,
    password_hash: str,
    username: str | None = None,
    phone: str | None = None,
    locale: str | None = None,
    actor: User | None = None,
    remote: str | None = None,
) -> int:
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}")
    if not display_name.strip() or len(display_name) > 100:
        raise BadRequest(_("Enter a name (up to 100 characters)."))
    now = time.time()
    try:
        cur = db.execute(
            "INSERT INTO users (role, username, phone, display_name, password_hash, locale, created,"
            " password_changed) VALUES (?,?,?,?,?,?,?,?) RETURNING id",
            [role, username, phone, display_name.strip(), password_hash, locale, now, now],
        )
    except IntegrityError:
        if phone:
            raise Conflict(_("An account with this mobile number already exists.")) from None
        raise Conflict(_("This username is taken.")) from None
    user_id = cur.fetchone()[0]
    assert user_id is not None
    audit.record(
        db,
        "account.create",
        "user",
        user_id,
        # Without an actor the new user is registering themselves: they act for themselves.
        actor=actor or SimpleNamespace(id=user_id, role=role),
        remote=remote,
        subject_user_id=user_id,
        detail={"role": role},
    )
    return user_id


def find_active_by_login(db: sqlite_utils.Database, identifier: str) -> sqlite3.Row | None:
    """The active account a sign-in names: digits (with an optional '+', spaces or dashes) are a
    mobile number, tried as typed and then without +86/0086; then a username (compared in
    lowercase)."""
    for phone in phone_lookups(identifier):
        row = db.execute("SELECT * FROM users WHERE phone = ? AND active = 1", [phone]).fetchone()
        if row is not None:
            return row
    return db.execute(
        "SELECT * FROM users WHERE username = ? AND active = 1", [identifier.lower()]
    ).fetchone()


def find_active_patient_by_typed_phone(db: sqlite_utils.Database, typed: str) -> sqlite3.Row | None:
    """The active patient a typed mobile number means (as ``find_active_by_login`` reads it)."""
    for phone in phone_lookups(typed):
        row = db.execute(
            "SELECT * FROM users WHERE phone = ? AND role = 'patient' AND active = 1", [phone]
        ).fetchone()
        if row is not None:
            return row
    return None


def phone_taken(db: sqlite_utils.Database, phone: str) -> bool:
    return db.execute("SELECT 1 FROM users WHERE phone = ?", [phone]).fetchone() is not None


def password_hash_of(db: sqlite_utils.Database, user_id: int) -> str | None:
    row = db.execute("SELECT password_hash FROM users WHERE id = ?", [user_id]).fetchone()
    return row["password_hash"] if row else None


def set_locale_sync(db: sqlite_utils.Database, user_id: int, locale: str) -> None:
    db.execute("UPDATE users SET locale = ? WHERE id = ?", [locale, user_id])


def set_password_sync(
    db: sqlite_utils.Database,
    user_id: int,
    password_hash: str,
    *,
    action: str | None = None,
    actor: Any = None,
    role: str | None = None,
    remote: str | None = None,
) -> None:
    """The one rule for a new password, inside the caller's write transaction.

    Store the hash and when it changed, then end every session of the account: each device signs
    in again with the new password. ``action`` (e.g. ``"account.reset_password"``) writes an audit
    entry by ``actor`` (``role`` overrides, e.g. ``"cli"``); without it nothing is audited.
    """
    db.execute(
        "UPDATE users SET password_hash = ?, password_changed = ? WHERE id = ?",
        [password_hash, time.time(), user_id],
    )
    db.execute("DELETE FROM sessions WHERE user_id = ?", [user_id])
    if action is not None:
        audit.record(
            db, action, "user", user_id, actor=actor, role=role, subject_user_id=user_id, remote=remote
        )


@dataclass(frozen=True)
class _Kept:
    """A session as last read from (or written to) the database by this process."""

    user: User
    created: float
    last_seen: float
    read_at: float  # time.monotonic() of the read: kept for at most ``cache_s`` after it


class Sessions:
    """Server-side sessions: a random token in a cookie, its SHA-256 in the ``sessions`` table.

    Every request looks its session up. A session read from the database is kept in memory for
    ``cache_s`` seconds (the ``session_cache_seconds`` setting), so a page or a hold does not
    wait for a reader thread to ask again what it asked a moment ago; the expiry rules are checked
    on every request all the same. What this process changes drops what it keeps at once:
    `revoke`, `revoke_all`, and `forget_user` (called after a password change, a deactivation or a
    new language). What another node (or the CLI) changes is seen within ``cache_s``. A lookup
    that read the database while something was forgotten does not keep what it read (it may be
    from before the change). At most ``MAX_KEPT`` sessions are kept; only real, live sessions are.
    """

    MAX_KEPT = 20_000

    def __init__(self, db: Database, idle_s: float, absolute_s: float, cache_s: float = 0.0) -> None:
        self.db = db
        self.idle_s = idle_s
        self.absolute_s = absolute_s
        self.cache_s = max(0.0, cache_s)
        self._kept: dict[str, _Kept] = {}  # token hash -> what was read
        self._forgotten = 0  # bumped by every forget: a read begun before it is not kept

    async def create(self, user_id: int, remote: str | None, user_agent: str | None) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()

        def write(db: sqlite_utils.Database) -> None:
            db.execute(
                "INSERT INTO sessions (token_hash, user_id, created, last_seen, remote, user_agent)"
                " VALUES (?,?,?,?,?,?)",
                [token_hash(token), user_id, now, now, remote, (user_agent or "")[:300]],
            )

        await self.db.execute_write_fn(write)
        return token

    async def lookup(self, token: str | None) -> User | None:
        if not token or len(token) > 100:
            return None
        h = token_hash(token)
        kept = self._kept.get(h)
        if kept is not None and time.monotonic() - kept.read_at > self.cache_s:
            kept = None
            self._kept.pop(h, None)
        if kept is None:
            forgotten = self._forgotten
            row = await self.db.query_one(
                "SELECT s.created AS s_created, s.last_seen, u.* FROM sessions s"
                " JOIN users u ON u.id = s.user_id WHERE s.token_hash = ? AND u.active = 1",
                [h],
            )
            if row is None:
                return None
            kept = _Kept(User.from_row(row), row["s_created"], row["last_seen"], time.monotonic())
            if self.cache_s > 0 and forgotten == self._forgotten:
                if len(self._kept) >= self.MAX_KEPT:
                    self._kept.pop(next(iter(self._kept)))  # the oldest read
                self._kept[h] = kept
        now = time.time()
        if now - kept.last_seen > self.idle_s or now - kept.created > self.absolute_s:
            await self.revoke(token)
            return None
        if now - kept.last_seen > 30:  # bound the write rate; idle expiry stays accurate to 30 s

            def touch(db: sqlite_utils.Database) -> None:
                db.execute("UPDATE sessions SET last_seen = ? WHERE token_hash = ?", [now, h])

            await self.db.execute_write_fn(touch)
            if self._kept.get(h) is kept:
                self._kept[h] = dataclasses.replace(kept, last_seen=now)
        return kept.user

    def forget_user(self, user_id: int) -> None:
        """Drop every kept session of ``user_id``: call it after a write that ended its sessions or
        changed what a session carries (password, deactivation, language)."""
        self._forgotten += 1
        for h in [h for h, kept in self._kept.items() if kept.user.id == user_id]:
            del self._kept[h]

    async def revoke(self, token: str) -> None:
        h = token_hash(token)
        try:
            await self.db.execute_write_fn(
                lambda db: db.execute("DELETE FROM sessions WHERE token_hash = ?", [h])
            )
        finally:
            self._forgotten += 1
            self._kept.pop(h, None)

    async def revoke_all(self, user_id: int) -> None:
        try:
            await self.db.execute_write_fn(
                lambda db: db.execute("DELETE FROM sessions WHERE user_id = ?", [user_id])
            )
        finally:
            self.forget_user(user_id)
