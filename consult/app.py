"""The composition root: the one module that knows every package.

``create_app`` builds the application for the CLI and for every test: middleware, templates,
the database and the objects shared under typed keys, every package's routes, and every
background job (each a ``cleanup_ctx`` owned by its domain package, started here and nowhere
else). Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from consult import booking, payments
from consult.accounts import admin_views
from consult.accounts import views as accounts_views
from consult.accounts.codes import CODES, PhoneCodes
from consult.accounts.passwords import Passwords
from consult.accounts.throttle import Throttle
from consult.accounts.users import Sessions
from consult.audit import views as audit_views
from consult.booking import catalogue_views, home_views
from consult.booking import views as booking_views
from consult.calls import board_views, recording_views
from consult.calls import views as call_views
from consult.calls.policy import room_sweeper, setup_calls
from consult.clinical import prescription_views, report_views, reports, uploads
from consult.clinical.signing import SIGNING_KEY, KeyHolder
from consult.core import jobs, keys, leader, live, metrics, proxy, security
from consult.core.config import Settings, ensure_secrets, for_mode
from consult.core.db import keep_statistics
from consult.core.engine import open_database
from consult.core.middleware import context_middleware, csrf_middleware, errors_middleware
from consult.core.migrations import migrate_settings
from consult.core.outbox import OutboxNotifier, OutboxSms
from consult.core.templates import setup_static, setup_templates
from consult.payments import views as payment_views
from consult.sessionlog import views as session_views
from consult.sessionlog.jobs import no_show_marker

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # uploads stream through their own handler with their own limit

# Every package's views, in the order their routes are added.
VIEWS = (
    accounts_views,
    home_views,
    admin_views,
    catalogue_views,
    booking_views,
    report_views,
    payment_views,
    call_views,
    board_views,
    metrics,
    session_views,
    audit_views,
    prescription_views,
    recording_views,
)


def create_app(settings: Settings) -> web.Application:
    # Production unless settings.demo: the payment provider follows the mode (core/config.py).
    settings = for_mode(ensure_secrets(settings))
    app = web.Application(
        # proxy first: behind a trusted reverse proxy every later step sees the client's address,
        # scheme and host (core/proxy.py).
        middlewares=[proxy.proxy_middleware, context_middleware, errors_middleware, csrf_middleware],
        client_max_size=MAX_REQUEST_BYTES,
    )
    app[keys.SETTINGS] = settings
    proxy.setup(app, settings.trusted_proxies)
    app[keys.PASSWORDS] = Passwords(settings.argon2_time_cost, settings.argon2_memory_kib)
    app[SIGNING_KEY] = KeyHolder(settings.data_dir)
    app[payments.FULFILMENT] = booking.VisitFulfilment()
    # Durable jobs: each package registers the kinds it owns; the worker runs them (below).
    runner = jobs.setup(app)
    payments.register_jobs(runner)  # "refund", and the sweep for paid payments left unrefunded
    booking.register_jobs(runner)  # "notify": confirmations, cancellations, moves, reminders
    app[uploads.IN_FLIGHT] = uploads.InFlight()
    # Pages that update themselves (the clinic board, the running-late notice); with PostgreSQL
    # their nudges also reach the other nodes (LISTEN/NOTIFY).
    live.setup(app, settings.database_url)
    leader.setup(app, settings.database_url)  # which node runs the periodic sweeps
    setup_templates(app, settings)
    app.on_response_prepare.append(security.add_security_headers)

    # Resources and background jobs, started in this order and stopped in reverse.
    app.cleanup_ctx.append(_database_ctx)
    app.cleanup_ctx.append(metrics.stall_monitor)  # event-loop lag and GC pauses, for /metrics
    app.cleanup_ctx.append(booking.hold_reaper)  # expires holds, queues reminders
    app.cleanup_ctx.append(reports.files_ctx)  # upload temp files and report files left by a crash
    app.cleanup_ctx.append(payments.payments_ctx)  # providers and payment tasks
    setup_calls(app)  # the signaling server on /ws/rooms/{id}, and its database hook-up
    app.cleanup_ctx.append(room_sweeper)  # closes rooms a dead server left open, before listening
    app.cleanup_ctx.append(no_show_marker)  # closes visits nobody joined
    # Last, so it stops first, while the database and the payment providers are still open.
    app.cleanup_ctx.append(jobs.worker_ctx)  # runs due jobs; at start-up, finishes what a crash left

    for views in VIEWS:
        views.setup(app)
    setup_static(app)
    return app


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate_settings(settings)
    db = open_database(settings)
    app[keys.DB] = db
    app[keys.SESSIONS] = Sessions(
        db,
        settings.session_idle_minutes * 60,
        settings.session_absolute_hours * 3600,
        cache_s=settings.session_cache_seconds,
    )
    app[keys.THROTTLE] = Throttle(
        db,
        secret=settings.session_key,
        per_account=settings.login_max_failures,
        per_account_total=settings.login_max_failures_account_total,
        per_address=settings.login_max_failures_per_address,
        window_s=settings.login_window_minutes * 60,
        max_delay_s=settings.login_max_delay_seconds,
        register_burst=settings.register_max_per_address,
        register_window_s=settings.register_window_minutes * 60,
    )
    app[keys.NOTIFIER] = OutboxNotifier(db)
    # One-time codes by SMS. sms_provider "outbox" (the only one so far): codes go to the outbox.
    app[CODES] = PhoneCodes(
        db,
        app[keys.THROTTLE],
        OutboxSms(app[keys.NOTIFIER]),
        secret=settings.session_key,
        hospital_name=settings.hospital_name,
        minutes=settings.sms_code_minutes,
        attempts=settings.sms_code_attempts,
        resend_s=settings.sms_code_resend_seconds,
        per_number=settings.sms_code_max_per_number,
        per_address=settings.sms_code_max_per_address,
        window_s=settings.sms_code_window_minutes * 60,
        max_pending=settings.sms_code_max_pending,
    )
    # The planner's statistics, now and every db_optimize_hours: without them SQLite may pick a
    # poor index for the session log and visit lists once tables hold millions of rows.
    stats = asyncio.create_task(keep_statistics(db, settings.db_optimize_hours * 3600), name="db-statistics")
    try:
        yield
    finally:
        stats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stats
        db.close()
