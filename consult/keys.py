"""Typed keys for everything the application shares (never module globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from consult.accounts import Sessions, Throttle
from consult.config import Settings
from consult.db import Database
from consult.notify import Notifier
from consult.passwords import Passwords

if TYPE_CHECKING:
    from consult.accounts import User

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
SESSIONS = web.AppKey("sessions", Sessions)
THROTTLE = web.AppKey("throttle", Throttle)
PASSWORDS = web.AppKey("passwords", Passwords)
NOTIFIER = web.AppKey("notifier", Notifier)

# Per-request values (request keys are plain strings in aiohttp).
USER = "consult.user"
CSRF_COOKIE_VALUE = "consult.csrf_cookie"
LOCALE = "consult.locale"


def current_user(request: web.Request) -> User | None:
    return request.get(USER)
