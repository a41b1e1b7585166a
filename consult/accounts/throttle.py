"""Sign-in and registration throttling that cannot be raced or turned into a lock-out.

Every sign-in reserves its attempt in one write transaction *before* the password is checked: the
reservation counts as a failure until a correct password releases it, so N parallel guesses are
counted as N and at most the free allowance of them ever reach argon2.

Counters are keyed rows in ``login_throttle`` (one per key, forgotten after the window without a
failure), never one row per attempt, and a made-up account name creates no row of its own:

``p:<address>|<user id>``  one account from one address. After ``per_account`` failures each
                           further try waits 1 s, 2 s, 4 s … up to ``max_delay_s``: slowed, never
                           locked. The owner's own typos mostly land here.
``d:<device>``             the same for a browser that signed in to the account before (a signed
                           ``consult_device`` cookie). It replaces the pair and is exempt from the
                           two counters below, so nobody else's failures hold the owner back.
``u:<user id>``            one account from every address together (a spread-out attack); a higher
                           allowance, then the same growing delay, for untrusted tries only.
``a:<address>``            one address (an IPv6 /64) over all accounts; a much higher allowance,
                           then a growing delay for tries on accounts that already have failures
                           and on names that are no account. An account with no failures is never
                           held back by it: behind one NAT or proxy, a flood of failures does not
                           stop anybody else signing in correctly.
``r:<address>``            registrations: a token bucket of ``register_burst`` refilling over
                           ``register_window_s``.
``c:<address>``            one-time codes sent by SMS (``consult.accounts.codes``): the same kind
                           of bucket, ``sms_code_max_per_address`` over ``sms_code_window_minutes``.

A refused try is not a guess (no password is checked) and does not lengthen any delay; it is only
counted in ``refused``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlite_utils

from consult.accounts.users import find_active_by_login
from consult.core.db import Database
from consult.core.errors import TooManyRequests
from consult.core.i18n import _, ngettext

DEVICE_COOKIE = "consult_device"
DEVICE_DAYS = 180


def delay_after(failures: int, free: int, cap: float) -> float:
    """Seconds the next try must wait after ``failures``: none within the free allowance, then
    1, 2, 4 … seconds, never more than ``cap``."""
    if failures < free:
        return 0.0
    return float(min(cap, 2 ** min(failures - free, 30)))


def address_key(address: str | None) -> str | None:
    """What an address is counted as: IPv4 as is, IPv6 by its /64 (one subscriber holds a whole
    /64, so counting single addresses would let one attacker spread over 2^64 rows)."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # already masked (a network) or something odd: counted as given
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def wait_message(kind: str, seconds: int) -> str:
    if kind == "register":
        if seconds <= 90:
            return ngettext(
                "Too many accounts were created from your network. Try again in %(n)d second.",
                "Too many accounts were created from your network. Try again in %(n)d seconds.",
                seconds,
            ) % {"n": seconds}
        return _("Too many accounts were created from your network. Try again in %(minutes)d minutes.") % {
            "minutes": math.ceil(seconds / 60)
        }
    if seconds <= 90:
        return ngettext(
            "Too many failed sign-in attempts. Try again in %(n)d second.",
            "Too many failed sign-in attempts. Try again in %(n)d seconds.",
            seconds,
        ) % {"n": seconds}
    return _("Too many failed sign-in attempts. Try again in %(minutes)d minutes.") % {
        "minutes": math.ceil(seconds / 60)
    }


@dataclass(frozen=True)
class Attempt:
    """A reserved sign-in: the active account it names (None: no such account) and the counters
    it was added to."""

    user: sqlite3.Row | None
    pair_key: str | None
    shared_keys: tuple[str, ...]


class Throttle:
    def __init__(
        self,
        db: Database,
        *,
        secret: str,
        per_account: int,
        per_account_total: int,
        per_address: int,
        window_s: float,
        max_delay_s: float,
        register_burst: int,
        register_window_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self._secret = secret.encode()
        self.per_account = per_account
        self.per_account_total = per_account_total
        self.per_address = per_address
        self.window_s = window_s
        self.max_delay_s = max_delay_s
        self.register_burst = register_burst
        self.register_window_s = register_window_s
        self.clock = clock

    # -- trusted devices -----------------------------------------------------------------
    def _device_mac(self, payload: str) -> str:
        return hmac.new(self._secret, b"device:" + payload.encode(), hashlib.sha256).hexdigest()[:32]

    def device_token(self, user_id: int) -> str:
        payload = f"{user_id}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._device_mac(payload)}"

    def device_of(self, token: str | None) -> tuple[int, str] | None:
        """(user id, device id) of a genuine device cookie, else None."""
        if not token or len(token) > 100 or not token.isascii():
            return None
        payload, _sep, mac = token.rpartition(".")
        user, _sep, device = payload.partition(".")
        if not user.isdigit() or not device or not hmac.compare_digest(mac, self._device_mac(payload)):
            return None
        return int(user), device

    # -- sign-in -------------------------------------------------------------------------
    def _free(self, key: str) -> int:
        return {"p": self.per_account, "d": self.per_account, "u": self.per_account_total}.get(
            key[0], self.per_address
        )

    def reserve_sync(
        self, db: sqlite_utils.Database, identifier: str, address: str | None, device: tuple[int, str] | None
    ) -> Attempt | float:
        """In the caller's write transaction: the Attempt, counted as a failure until released;
        or the seconds to wait, with nothing counted but the refusal."""
        now = self.clock()
        db.execute("DELETE FROM login_throttle WHERE expires < ?", [now])
        user = find_active_by_login(db, identifier)
        addr = address_key(address)
        addr_key = f"a:{addr}" if addr else None
        if user is None:
            pair_key = None
            account_key = None
            gates = [addr_key]
        else:
            account_key = f"u:{user['id']}"
            if device is not None and device[0] == user["id"]:
                pair_key = f"d:{device[1]}"
                gates = [pair_key]
            else:
                pair_key = f"p:{addr}|{user['id']}"
                gates = [pair_key, account_key]
                account = _row(db, account_key)
                if account is not None and account["failures"] > 0:
                    gates.append(addr_key)
        rows = {key: _row(db, key) for key in gates if key}
        blocked = [key for key, row in rows.items() if row is not None and row["next_at"] > now]
        if blocked:
            for key in blocked:
                db.execute("UPDATE login_throttle SET refused = refused + 1 WHERE key = ?", [key])
            return max(rows[key]["next_at"] for key in blocked) - now
        shared = tuple(k for k in (account_key, addr_key) if k)
        for key in (pair_key, *shared):
            if key:
                self._count_failure(db, key, now)
        return Attempt(user, pair_key, shared)

    def _count_failure(self, db: sqlite_utils.Database, key: str, now: float) -> None:
        row = _row(db, key)
        failures = (row["failures"] if row else 0) + 1
        next_at = max(
            row["next_at"] if row else 0.0, now + delay_after(failures, self._free(key), self.max_delay_s)
        )
        db.execute(
            "INSERT INTO login_throttle (key, failures, last_at, next_at, expires) VALUES (?,?,?,?,?)"
            " ON CONFLICT (key) DO UPDATE SET failures = excluded.failures, last_at = excluded.last_at,"
            " next_at = excluded.next_at, expires = excluded.expires",
            [key, failures, now, next_at, max(next_at, now + self.window_s)],
        )

    async def reserve(
        self, identifier: str, address: str | None, device: tuple[int, str] | None = None
    ) -> Attempt:
        """Reserve a sign-in attempt before its password is checked; TooManyRequests says how long
        to wait."""
        result = await self.db.execute_write_fn(lambda db: self.reserve_sync(db, identifier, address, device))
        if isinstance(result, Attempt):
            return result
        wait = max(1, math.ceil(result))
        raise TooManyRequests(wait_message("login", wait), retry_after=wait)

    async def succeeded(self, attempt: Attempt) -> None:
        """The password was right: this account-and-address (or device) starts afresh, and the
        shared counters give back the one failure this attempt had reserved."""

        def write(db: sqlite_utils.Database) -> None:
            if attempt.pair_key:
                db.execute("DELETE FROM login_throttle WHERE key = ?", [attempt.pair_key])
            for key in attempt.shared_keys:
                db.execute("UPDATE login_throttle SET failures = max(failures - 1, 0) WHERE key = ?", [key])

        await self.db.execute_write_fn(write)

    # -- registration --------------------------------------------------------------------
    def reserve_registration_sync(self, db: sqlite_utils.Database, address: str | None) -> float:
        """Take one registration from the address's bucket: 0, or the seconds until one refills."""
        return self.take_token_sync(db, "r", address, self.register_burst, self.register_window_s)

    def take_token_sync(
        self, db: sqlite_utils.Database, kind: str, address: str | None, burst: int, window_s: float
    ) -> float:
        """Take one from the address's ``kind`` bucket (``burst`` of them, refilling evenly over
        ``window_s``), in the caller's write transaction: 0, or the seconds until one refills."""
        addr = address_key(address)
        if not addr:
            return 0.0
        now = self.clock()
        db.execute("DELETE FROM login_throttle WHERE expires < ?", [now])
        key = f"{kind}:{addr}"
        row = _row(db, key)
        rate = burst / window_s
        tokens = float(burst)
        if row is not None:
            tokens = min(tokens, row["tokens"] + (now - row["last_at"]) * rate)
        if tokens < 1:
            db.execute("UPDATE login_throttle SET refused = refused + 1 WHERE key = ?", [key])
            return (1 - tokens) / rate
        db.execute(
            "INSERT INTO login_throttle (key, failures, tokens, last_at, next_at, expires)"
            " VALUES (?,1,?,?,0,?)"
            " ON CONFLICT (key) DO UPDATE SET failures = login_throttle.failures + 1,"
            " tokens = excluded.tokens, last_at = excluded.last_at, expires = excluded.expires",
            [key, tokens - 1, now, now + window_s],
        )
        return 0.0

    async def reserve_registration(self, address: str | None) -> None:
        """Before a registration hashes its password; TooManyRequests when the address is over."""
        wait = await self.db.execute_write_fn(lambda db: self.reserve_registration_sync(db, address))
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise TooManyRequests(wait_message("register", seconds), retry_after=seconds)


def _row(db: sqlite_utils.Database, key: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM login_throttle WHERE key = ?", [key]).fetchone()
