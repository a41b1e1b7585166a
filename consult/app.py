"""The application factory: the CLI and every test build the app through ``create_app``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

import web as web_assets
from consult.accounts import admin_views
from consult.accounts import views as accounts_views
from consult.accounts.passwords import Passwords
from consult.accounts.users import Sessions, Throttle
from consult.audit import views as audit_views
from consult.booking import catalogue_views, home_views
from consult.booking import views as booking_views
from consult.calls import recording_views
from consult.calls import views as call_views
from consult.clinical import prescription_views, report_views
from consult.core import formatting, i18n, keys, metrics, security
from consult.core.config import Settings, ensure_secrets
from consult.core.db import Database
from consult.core.middleware import context_middleware, csrf_middleware, errors_middleware
from consult.core.migrations import migrate
from consult.core.outbox import OutboxNotifier
from consult.payments import views as payment_views
from consult.sessionlog import views as session_views

log = logging.getLogger(__name__)
WEB_DIR = Path(web_assets.__file__).parent
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # uploads stream through their own handler with their own limit


def template_context(request: web.Request) -> dict:
    user = request.get(keys.USER)
    return {
        "request": request,
        "user": user,
        "csrf_token": security.csrf_token(request),
        "locale": request.get(keys.LOCALE, "en"),
        "locale_names": i18n.LOCALE_NAMES,
        "settings": request.app[keys.SETTINGS],
    }


async def _template_processor(request: web.Request) -> dict:
    return template_context(request)


def create_app(settings: Settings) -> web.Application:
    settings = ensure_secrets(settings)
    app = web.Application(
        middlewares=[context_middleware, errors_middleware, csrf_middleware],
        client_max_size=MAX_REQUEST_BYTES,
    )
    app[keys.SETTINGS] = settings
    passwords = Passwords(settings.argon2_time_cost, settings.argon2_memory_kib)
    app[keys.PASSWORDS] = passwords

    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(WEB_DIR / "templates")),
        autoescape=jinja2.select_autoescape(default=True),
        extensions=["jinja2.ext.i18n"],
        context_processors=[aiohttp_jinja2.request_processor, _template_processor],
    )
    env.install_gettext_callables(i18n.gettext, i18n.ngettext, newstyle=True)  # type: ignore[attr-defined]
    env.filters.update(formatting.filters(settings))
    app[aiohttp_jinja2.static_root_key] = "/static"

    app.cleanup_ctx.append(_database_ctx)
    app.on_response_prepare.append(security.add_security_headers)

    setup_routes(app)
    app.router.add_static("/static", WEB_DIR / "static", name="static", append_version=True)
    return app


def setup_routes(app: web.Application) -> None:
    """Every package's views add their own routes; this is the one place that knows them all."""
    for views in (
        accounts_views,
        home_views,
        admin_views,
        catalogue_views,
        booking_views,
        report_views,
        payment_views,
        call_views,  # the call pages and the signaling WebSocket (consult.calls.policy)
        metrics,
        session_views,
        audit_views,
        prescription_views,
        recording_views,
    ):
        views.setup(app)


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "consult.db"
    migrate(path)
    db = Database(path)
    app[keys.DB] = db
    app[keys.SESSIONS] = Sessions(
        db, settings.session_idle_minutes * 60, settings.session_absolute_hours * 3600
    )
    app[keys.THROTTLE] = Throttle(
        db,
        settings.login_max_failures,
        settings.login_max_failures_per_address,
        settings.login_window_minutes * 60,
    )
    app[keys.NOTIFIER] = OutboxNotifier(db)
    try:
        yield
    finally:
        db.close()
