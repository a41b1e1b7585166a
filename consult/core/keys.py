"""Typed keys for everything the application shares (never module globals).

The account types are named for type checkers only: core sits below every domain package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from consult.core.config import Settings
from consult.core.db import Database
from consult.core.outbox import Notifier

if TYPE_CHECKING:
    from consult.accounts.passwords import Passwords
    from consult.accounts.throttle import Throttle
    from consult.accounts.users import Sessions, User
    from consult.core.templates import StaticFiles

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions")
THROTTLE: web.AppKey[Throttle] = web.AppKey("throttle")
PASSWORDS: web.AppKey[Passwords] = web.AppKey("passwords")
NOTIFIER = web.AppKey("notifier", Notifier)
STATIC: web.AppKey[StaticFiles] = web.AppKey("static")

# Per-request values.
USER = web.RequestKey("user", object)  # consult.accounts.users.User | None
CSRF_COOKIE_VALUE = web.RequestKey("csrf_cookie", str)
CSRF_NEW = web.RequestKey("csrf_new", bool)
SESSION_TOKEN = web.RequestKey("session_token", str)  # the session cookie in effect; CSRF binds to it
LOCALE = web.RequestKey("locale", str)


def current_user(request: web.Request) -> User | None:
    return request.get(USER)
