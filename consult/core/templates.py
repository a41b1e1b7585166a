"""Jinja2 pages: the environment, and the context every page (error pages included) gets."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

import web as web_assets
from consult.core import formatting, i18n, keys, security
from consult.core.config import Settings

WEB_DIR = Path(web_assets.__file__).parent


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


def setup_templates(app: web.Application, settings: Settings) -> None:
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


def setup_static(app: web.Application) -> None:
    app.router.add_static("/static", WEB_DIR / "static", name="static", append_version=True)
