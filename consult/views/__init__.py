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
