"""One-time codes sent by SMS: a new patient confirms their number, a patient resets a password.

A code is 6 digits. It is stored only as an HMAC (keyed by the session key, bound to the number
and the purpose), works for ``sms_code_minutes`` and for ``sms_code_attempts`` wrong tries, and
only from the browser that asked for it: a random flow token in a cookie, stored hashed. Somebody
else asking for a code to the same number replaces the code, and can never answer the owner's
(nor make the owner's browser finish *their* registration, with their password).

There is one row per number with a code outstanding (``phone_codes``), holding its send counters
and, for a registration, the account to create (name, argon2 hash, language): no account exists
until the code is right. Every limit is checked in the write that issues the code:

- the address: a token bucket in ``login_throttle`` (``c:<address>``, see ``throttle.py``);
- the number: ``sms_code_resend_seconds`` between two codes, ``sms_code_max_per_number`` within
  ``sms_code_window_minutes`` (the row, and so its counters, is kept until that window ends);
- the table: at most ``sms_code_max_pending`` rows, each deleted once its code has expired and its
  window has passed. A flood of numbers is refused rather than stored.

A password reset never says whether a number has an account: for an unknown number (or a known
one over its limits) the answer is the same, and nothing is sent or stored.

Codes and messages are sent on the event loop (``SmsProvider.send_sms``), never on the writer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace

import sqlite_utils
from aiohttp import web

from consult.accounts import users
from consult.accounts.throttle import Throttle
from consult.core.db import Database
from consult.core.errors import Conflict, ConsultError, TooManyRequests
from consult.core.i18n import _, ngettext
from consult.core.outbox import SmsError, SmsProvider

log = logging.getLogger(__name__)

REGISTER = "register"
RESET = "reset"
CODE_DIGITS = 6


class SmsNotSent(ConsultError):
    status = 503
    code = "sms_not_sent"


@dataclass(frozen=True)
class Registration:
    """The account a registration creates once its code is right."""

    display_name: str
    password_hash: str
    locale: str | None


@dataclass(frozen=True)
class Issued:
    """What asking for a code did. ``status``: sent; wait_address, wait_number (``wait`` seconds);
    full (too many codes outstanding); taken (register: the number has an account); unknown
    (reset: no such patient); gone (a resend with nothing pending from this browser)."""

    status: str
    wait: float = 0.0
    phone: str = ""  # sent: the number the code goes to


@dataclass(frozen=True)
class Checked:
    """What entering a code did. ``status``: ok (``user_id`` set); malformed (not 6 digits,
    nothing counted); wrong (``left`` tries remain); dead (tried too often); expired; none
    (nothing pending for this number from this browser)."""

    status: str
    left: int = 0
    user_id: int | None = None


def clean_code(raw: str | None) -> str | None:
    """The 6 digits typed (full-width digits and spaces allowed), or None."""
    code = "".join(unicodedata.normalize("NFKC", raw or "").split())
    if len(code) == CODE_DIGITS and code.isascii() and code.isdigit():
        return code
    return None


class PhoneCodes:
    def __init__(
        self,
        db: Database,
        throttle: Throttle,
        sms: SmsProvider,
        *,
        secret: str,
        hospital_name: str,
        minutes: int,
        attempts: int,
        resend_s: float,
        per_number: int,
        per_address: int,
        window_s: float,
        max_pending: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.throttle = throttle
        self.sms = sms
        self._secret = secret.encode()
        self.hospital_name = hospital_name
        self.minutes = minutes
        self.ttl_s = minutes * 60.0
        self.attempts = attempts
        self.resend_s = resend_s
        self.per_number = per_number
        self.per_address = per_address
        self.window_s = window_s
        self.max_pending = max_pending
        self.clock = clock
        self._full_logged = 0.0

    # -- hashing -------------------------------------------------------------------------
    def _code_hash(self, purpose: str, phone: str, code: str) -> str:
        message = f"code:{purpose}:{phone}:{code}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    @staticmethod
    def _flow_hash(flow: str) -> str:
        return hashlib.sha256(b"flow:" + flow.encode("utf-8", "replace")).hexdigest()

    @staticmethod
    def new_flow() -> str:
        return secrets.token_urlsafe(18)

    # -- issuing -------------------------------------------------------------------------
    def issue_sync(
        self,
        db: sqlite_utils.Database,
        purpose: str,
        phone: str,
        flow: str,
        address: str | None,
        code: str,
        registration: Registration | None = None,
        resend: bool = False,
    ) -> Issued:
        """In the caller's write transaction: store ``code`` for ``phone`` if every limit allows."""
        now = self.clock()
        db.execute("DELETE FROM phone_codes WHERE keep_until < ?", [now])
        row = db.execute("SELECT * FROM phone_codes WHERE phone = ?", [phone]).fetchone()
        if resend and (
            row is None
            or row["purpose"] != purpose
            or not hmac.compare_digest(row["flow_hash"], self._flow_hash(flow))
        ):
            return Issued("gone")
        # The address first, known number or not: a reset answers the same for both.
        wait = self.throttle.take_token_sync(db, "c", address, self.per_address, self.window_s)
        if wait > 0:
            return Issued("wait_address", wait)
        if purpose == REGISTER and users.phone_taken(db, phone):
            return Issued("taken")
        if purpose == RESET:
            # ``phone`` is what was typed: the account's number as stored may differ (+86, or a
            # number kept from before the current format rule).
            user = users.find_active_patient_by_typed_phone(db, phone)
            if user is None:
                return Issued("unknown")
            phone = user["phone"]
            row = db.execute("SELECT * FROM phone_codes WHERE phone = ?", [phone]).fetchone()
        if row is not None:
            window_start, sends = row["window_start"], row["sends"]
            if now >= window_start + self.window_s:
                window_start, sends = now, 0
            if now < row["last_sent"] + self.resend_s:
                return Issued("wait_number", row["last_sent"] + self.resend_s - now)
            if sends >= self.per_number:
                return Issued("wait_number", window_start + self.window_s - now)
        else:
            window_start, sends = now, 0
            pending = db.execute("SELECT count(*) FROM phone_codes").fetchone()[0]
            if pending >= self.max_pending:
                if now - self._full_logged > 60:  # once a minute, not once per refusal
                    self._full_logged = now
                    log.warning("one-time codes: %d outstanding, new ones refused until some expire", pending)
                return Issued("full", self.ttl_s)
        if resend:
            assert row is not None
            registration = Registration(row["display_name"], row["password_hash"], row["locale"])
        name, password_hash, locale = (
            (registration.display_name, registration.password_hash, registration.locale)
            if purpose == REGISTER and registration is not None
            else (None, None, None)
        )
        expires = now + self.ttl_s
        db.execute(
            "INSERT INTO phone_codes (phone, purpose, flow_hash, code_hash, expires, attempts,"
            " sends, window_start, last_sent, keep_until, display_name, password_hash, locale)"
            " VALUES (?,?,?,?,?,0,?,?,?,?,?,?,?) ON CONFLICT(phone) DO UPDATE SET"
            " purpose = excluded.purpose, flow_hash = excluded.flow_hash, code_hash = excluded.code_hash,"
            " expires = excluded.expires, attempts = excluded.attempts, sends = excluded.sends,"
            " window_start = excluded.window_start, last_sent = excluded.last_sent,"
            " keep_until = excluded.keep_until, display_name = excluded.display_name,"
            " password_hash = excluded.password_hash, locale = excluded.locale",
            [
                phone,
                purpose,
                self._flow_hash(flow),
                self._code_hash(purpose, phone, code),
                expires,
                sends + 1,
                window_start,
                now,
                max(expires, window_start + self.window_s),
                name,
                password_hash,
                locale,
            ],
        )
        return Issued("sent", phone=phone)

    def _text(self, purpose: str, code: str) -> tuple[str, str]:
        params = {"hospital": self.hospital_name, "code": code, "minutes": self.minutes}
        if purpose == REGISTER:
            text = _(
                "[%(hospital)s] Your code to confirm your mobile number is %(code)s. It works for"
                " %(minutes)d minutes. Never tell it to anyone, not even hospital staff."
            )
        else:
            text = _(
                "[%(hospital)s] Your code to set a new password is %(code)s. It works for"
                " %(minutes)d minutes. Never tell it to anyone, not even hospital staff. If you"
                " did not ask for it, ignore this message."
            )
        return _("Verification code"), text % params

    async def _issue(
        self,
        purpose: str,
        phone: str,
        flow: str,
        address: str | None,
        registration: Registration | None = None,
        resend: bool = False,
    ) -> Issued:
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        issued = await self.db.execute_write_fn(
            lambda db: self.issue_sync(db, purpose, phone, flow, address, code, registration, resend)
        )
        if issued.status == "sent":
            subject, text = self._text(purpose, code)  # in the asking page's language
            try:
                await self.sms.send_sms(issued.phone, subject, text)
            except SmsError:
                log.exception("one-time code to a %s number not sent", purpose)
                if purpose == REGISTER:  # a reset must not tell a known number by a failure
                    raise SmsNotSent(
                        _("The text message could not be sent. Try again in a minute.")
                    ) from None
        return issued

    async def start_registration(
        self, phone: str, flow: str, address: str | None, registration: Registration
    ) -> None:
        """Send a code to a new patient's number; the account is created by ``confirm_registration``.
        Conflict if the number has an account, TooManyRequests over a limit."""
        issued = await self._issue(REGISTER, phone, flow, address, registration)
        _raise_for(issued)

    async def resend_registration(self, phone: str, flow: str, address: str | None) -> bool:
        """A new code for this browser's pending registration; False: nothing pending (start again)."""
        issued = await self._issue(REGISTER, phone, flow, address, resend=True)
        if issued.status == "gone":
            return False
        _raise_for(issued)
        return True

    async def start_reset(self, phone: str, flow: str, address: str | None) -> None:
        """Send a password-reset code if ``phone`` (as typed, without separators) is an active
        patient's and its limits allow.
        Answers the same either way; only the address's own limit is told (TooManyRequests)."""
        issued = await self._issue(RESET, phone, flow, address)
        if issued.status == "wait_address":
            _raise_for(issued)

    # -- checking ------------------------------------------------------------------------
    def check_sync(
        self,
        db: sqlite_utils.Database,
        purpose: str,
        phone: str,
        flow: str,
        code: str,
        remote: str | None = None,
    ) -> Checked:
        """In the caller's write transaction: count the try; on the right code delete the row and,
        for a registration, create the account (Conflict if the number was taken meanwhile)."""
        now = self.clock()
        user = None
        if purpose == RESET:
            user = users.find_active_patient_by_typed_phone(db, phone)
            if user is None:  # unknown, or deactivated since the code was sent
                return Checked("none")
            phone = user["phone"]
        row = db.execute("SELECT * FROM phone_codes WHERE phone = ?", [phone]).fetchone()
        if (
            row is None
            or row["purpose"] != purpose
            or not hmac.compare_digest(row["flow_hash"], self._flow_hash(flow))
        ):
            return Checked("none")
        if row["code_hash"] is None or row["attempts"] >= self.attempts:
            return Checked("dead")
        if now >= row["expires"]:
            return Checked("expired")
        if not hmac.compare_digest(row["code_hash"], self._code_hash(purpose, phone, code)):
            attempts = row["attempts"] + 1
            dead = attempts >= self.attempts
            db.execute(
                "UPDATE phone_codes SET attempts = ?, code_hash = CASE WHEN ? THEN NULL ELSE code_hash END"
                " WHERE phone = ?",
                [attempts, dead, phone],
            )
            return Checked("dead") if dead else Checked("wrong", left=self.attempts - attempts)
        db.execute("DELETE FROM phone_codes WHERE phone = ?", [phone])
        if purpose == REGISTER:
            user_id = users.create_user_sync(
                db,
                role="patient",
                display_name=row["display_name"],
                password_hash=row["password_hash"],
                phone=phone,
                locale=row["locale"],
                remote=remote,
            )
            return Checked("ok", user_id=user_id)
        assert user is not None
        return Checked("ok", user_id=user["id"])

    async def confirm_registration(
        self, phone: str, flow: str, raw_code: str | None, remote: str | None
    ) -> Checked:
        """The new patient's code: the account's id once it is right, else why not."""
        code = clean_code(raw_code)
        if code is None:
            return Checked("malformed")
        try:
            return await self.db.execute_write_fn(
                lambda db: self.check_sync(db, REGISTER, phone, flow, code, remote)
            )
        except Conflict:  # raised on the writer thread, which speaks no request's language
            raise Conflict(_("An account with this mobile number already exists.")) from None

    async def reset_password(
        self,
        phone: str,
        flow: str,
        raw_code: str | None,
        new_hash: Callable[[], Awaitable[str]],
        remote: str | None,
    ) -> Checked:
        """The patient's code, then the new password (hashed by ``new_hash`` only once the code
        was right: a guess costs no argon2). Setting it ends every session of the account."""
        code = clean_code(raw_code)
        if code is None:
            return Checked("malformed")
        checked = await self.db.execute_write_fn(lambda db: self.check_sync(db, RESET, phone, flow, code))
        if checked.status != "ok":
            return checked
        password_hash = await new_hash()
        user_id = checked.user_id
        assert user_id is not None
        await self.db.execute_write_fn(
            lambda db: users.set_password_sync(
                db,
                user_id,
                password_hash,
                action="account.reset_password_by_code",
                actor=SimpleNamespace(id=user_id, role="patient"),
                remote=remote,
            )
        )
        return checked


def _raise_for(issued: Issued) -> None:
    """Turn a refused code into the error the person reads (on the event loop: translated)."""
    if issued.status in ("sent", "unknown", "gone"):
        return
    if issued.status == "taken":
        raise Conflict(_("An account with this mobile number already exists."))
    seconds = max(1, math.ceil(issued.wait))
    minutes = {"minutes": math.ceil(seconds / 60)}
    if issued.status == "wait_address":
        if seconds <= 90:
            message = ngettext(
                "Too many codes were asked for from your network. Try again in %(n)d second.",
                "Too many codes were asked for from your network. Try again in %(n)d seconds.",
                seconds,
            ) % {"n": seconds}
        else:
            message = (
                _("Too many codes were asked for from your network. Try again in %(minutes)d minutes.")
                % minutes
            )
    elif issued.status == "wait_number":
        if seconds <= 90:
            message = ngettext(
                "A code was sent to this number a moment ago. You can ask for a new one in %(n)d second.",
                "A code was sent to this number a moment ago. You can ask for a new one in %(n)d seconds.",
                seconds,
            ) % {"n": seconds}
        else:
            message = (
                _("Too many codes were sent to this number. Try again in %(minutes)d minutes.") % minutes
            )
    else:
        message = _("Too many people are signing up just now. Try again in a few minutes.")
    raise TooManyRequests(message, retry_after=seconds)


CODES: web.AppKey[PhoneCodes] = web.AppKey("phone_codes")
