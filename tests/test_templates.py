"""The template environment's own helpers (consult.core.templates) against aiohttp_jinja2's."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from consult.app import create_app


def test_url_gives_what_aiohttp_jinja2_gives_for_every_named_route(settings):
    """templates._url prints a plain route's pattern instead of building a URL object: for
    every named route of the app, with and without parts and a query, the same text."""
    app = create_app(settings)
    env = aiohttp_jinja2.get_env(app)
    theirs = aiohttp_jinja2.helpers.url_for
    checked = 0
    for name, resource in app.router.named_resources().items():
        info = resource.get_info()
        parts = {key: "x1234567890" for key in _names(info.get("formatter", ""))}
        for query in (None, {"a": "b c&d"}):
            want = str(theirs({"app": app}, name, query, **parts))
            got = env.from_string("{{ url(name, query_=query, **parts) }}").render(
                app=app, name=name, query=query, parts=parts
            )
            assert got == want.replace("&", "&amp;"), name
            checked += 1
        if isinstance(resource, web.PlainResource):
            ours = env.globals["url"]({"app": app}, name)
            assert ours == resource.canonical == str(theirs({"app": app}, name))
    assert checked > 100


def _names(formatter: str) -> list[str]:
    import string

    return [field for _text, field, _spec, _conv in string.Formatter().parse(formatter) if field]
