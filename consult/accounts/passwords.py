"""Argon2 password hashing, kept off the event loop (a hash costs tens of milliseconds)."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 8


class Passwords:
    def __init__(self, time_cost: int = 3, memory_kib: int = 65536) -> None:
        self.hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)
        # A fixed hash to verify against when the account does not exist, so timing does not
        # tell whether an account exists.
        self._dummy = self.hasher.hash("not-a-real-password")

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def verify(self, stored: str | None, password: str) -> bool:
        try:
            return self.hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def hash_async(self, password: str) -> str:
        return await asyncio.to_thread(self.hash, password)

    async def verify_async(self, stored: str | None, password: str) -> bool:
        return await asyncio.to_thread(self.verify, stored, password)


def check_strength(password: str) -> str | None:
    """Return a reason the password is refused, or None."""
    from consult.core.i18n import _

    if len(password) < MIN_LENGTH:
        return _("The password must have at least 8 characters.")
    if len(password) > 256:
        return _("The password is too long.")
    if password.isdigit() or password.lower() in {"password", "12345678", "qwertyui"}:
        return _("The password is too easy to guess.")
    return None
