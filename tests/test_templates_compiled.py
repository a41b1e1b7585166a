"""`consult serve` compiles every template before it listens (outside demo mode), so no page's
first visitor after a restart waits for Jinja to compile it (5-25 ms each, with the event loop
held): see consult.core.templates.compile_templates."""

from __future__ import annotations

import aiohttp_jinja2

from consult.app import create_app
from consult.core.templates import WEB_DIR, compile_templates


async def test_every_template_is_compiled_before_the_first_request(aiohttp_client, settings) -> None:
    app = create_app(settings)
    env = aiohttp_jinja2.get_env(app)
    pages = sorted(
        p.relative_to(WEB_DIR / "templates").as_posix() for p in (WEB_DIR / "templates").rglob("*.html")
    )
    assert compile_templates(app) == len(pages) > 50
    compiled = {name for (_loader, name) in env.cache.keys()}
    assert compiled == set(pages)
    before = {key: env.cache[key] for key in env.cache.keys()}
    client = await aiohttp_client(app)
    assert (await client.get("/login")).status == 200
    assert (await client.get("/no-such-page")).status == 404
    # The pages were rendered from the templates compiled above, not compiled again.
    assert all(env.cache[key] is template for key, template in before.items())
    assert len(env.cache) == len(before)
