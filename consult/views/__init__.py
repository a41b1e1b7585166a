"""HTTP views: thin handlers that parse, call the domain, and render."""

from __future__ import annotations

from aiohttp import web


def setup_routes(app: web.Application) -> None:
    from consult.views import admin, auth, booking, catalogue_admin, home, payments, reports

    auth.setup(app)
    home.setup(app)
    admin.setup(app)
    catalogue_admin.setup(app)
    booking.setup(app)
    reports.setup(app)
    payments.setup(app)
    from consult.views import call

    call.setup(app)  # the call pages and the signaling WebSocket (consult.calls)
    from consult import metrics
    from consult.views import audit_views, sessions_admin

    metrics.setup(app)
    sessions_admin.setup(app)
    audit_views.setup(app)
    from consult.views import prescriptions

    prescriptions.setup(app)
    from consult.views import recordings

    recordings.setup(app)
