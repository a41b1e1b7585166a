from __future__ import annotations

from consult.app import create_app


async def test_security_headers_on_pages_errors_and_static(client):
    for path in ["/", "/login", "/does-not-exist", "/static/app.css"]:
        resp = await client.get(path)
        h = resp.headers
        assert "script-src 'self'" in h["Content-Security-Policy"], path
        assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
        assert "unsafe-inline" not in h["Content-Security-Policy"]
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "no-referrer"
        assert "Strict-Transport-Security" not in h  # plain HTTP in tests


async def test_hsts_under_tls(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(tls=True)))
    resp = await client.get("/login")
    assert resp.headers["Strict-Transport-Security"].startswith("max-age=")


async def test_pages_have_no_inline_script_and_no_external_assets(client):
    for path in ["/", "/login", "/register"]:
        text = await (await client.get(path)).text()
        assert "<script>" not in text and "onclick=" not in text
        assert "http://" not in text and "https://" not in text, path


async def test_not_found_is_a_page_and_api_errors_are_json(client):
    resp = await client.get("/nowhere")
    assert resp.status == 404
    assert resp.content_type == "text/html"
    resp = await client.get("/api/nowhere")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] and body["message"]


async def test_healthz(client):
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["ok"] is True
