"""/metrics: Prometheus text, admins or allowed addresses only; JSON access log lines."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from consult.app import create_app
from consult.core import metrics
from consult.core.config import ConfigError
from consult.core.logs import JsonFormatter, RedactingAccessLogger
from signaling.server import SignalingServer
from signaling.testing import InMemoryPolicy
from tests.conftest import login

SERVER = web.AppKey("test_signaling", SignalingServer)
EXPECTED = [
    "consult_http_request_duration_seconds_bucket",
    "consult_http_request_duration_seconds_count",
    "consult_active_rooms",
    "consult_connected_participants",
    "consult_websocket_connections",
    "consult_bookings_total",
    "consult_payments_total",
    "consult_uploads_total",
    "consult_recording_bytes_total",
]


async def test_metrics_text_has_the_expected_names(client, make_user):
    make_user("admin", login="boss")
    await login(client, "boss")
    app = client.server.app
    metrics.count(app, "bookings")
    metrics.count(app, "recording_bytes", 4096)
    await client.get("/healthz")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    text = await resp.text()
    for name in EXPECTED:
        assert f"\n{name}" in text, name
    assert "consult_bookings_total 1.0" in text
    assert "consult_recording_bytes_total 4096.0" in text
    # Latency by route name, never by raw path.
    assert 'route="healthz"' in text and 'route="login"' in text
    assert "/healthz" not in text


async def test_live_gauges_read_the_signaling_server_at_scrape_time(aiohttp_client, settings, make_user):
    make_user("admin", login="boss")
    app = create_app(settings)
    # The call module's own server when it is wired in, else one of ours kept in the app.
    server = metrics._find_signaling(app)
    own = server is None
    if server is None:
        server = SignalingServer(InMemoryPolicy())
        app[SERVER] = server
    client = await aiohttp_client(app)
    await login(client, "boss")
    server.rooms["a"] = SimpleNamespace(slots={"host": object(), "guest": object()})  # type: ignore[assignment]
    server.rooms["b"] = SimpleNamespace(slots={"host": object(), "guest": None})  # type: ignore[assignment]
    server.connections.update({object(), object(), object(), object()})  # type: ignore[arg-type]
    text = await (await client.get("/metrics")).text()
    assert "consult_active_rooms 2.0" in text
    assert "consult_connected_participants 3.0" in text
    assert "consult_websocket_connections 4.0" in text
    metrics.provide(app, "active_rooms", lambda: 7)
    text = await (await client.get("/metrics")).text()
    assert "consult_active_rooms 7.0" in text
    server.rooms.clear()
    server.connections.clear()
    if own:
        await server.aclose()


def test_count_rejects_unknown_names(settings):
    app = create_app(settings)
    with pytest.raises(KeyError):
        metrics.count(app, "bookingz")
    metrics.count(web.Application(), "uploads")  # an app without metrics: a no-op
    with pytest.raises(KeyError):
        metrics.count(web.Application(), "nope")


async def test_allowed_addresses_scrape_without_signing_in(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(metrics_allow=("127.0.0.0/8", "::1"))))
    resp = await client.get("/metrics", allow_redirects=False)
    assert resp.status == 200
    assert "consult_active_rooms" in await resp.text()


async def test_other_addresses_must_sign_in_as_admin(aiohttp_client, make_settings, make_user):
    make_user("doctor", login="drwho")
    client = await aiohttp_client(create_app(make_settings(metrics_allow=("10.0.0.0/8",))))
    resp = await client.get("/metrics", allow_redirects=False)
    assert resp.status == 303
    await login(client, "drwho")
    assert (await client.get("/metrics")).status == 403


def test_bad_metrics_allow_is_a_config_error(make_settings):
    with pytest.raises(ConfigError, match="metrics_allow"):
        create_app(make_settings(metrics_allow=("10.0.0.0/33",)))


def test_access_log_lines_are_json_with_fields_and_no_tokens(settings):
    app = create_app(settings)
    request = make_mocked_request("GET", "/call/abcdefghijklmnopqrstuvwxyz?t=secret123", app=app)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.access")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    RedactingAccessLogger(logger, "").log(request, web.Response(status=200), 0.0123)
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["logger"] == "test.access"
    assert line["http"]["method"] == "GET" and line["http"]["status"] == 200
    assert line["http"]["ms"] == 12.3
    assert "abcdefghijklmnop" not in line["http"]["path"] and "secret123" not in line["http"]["path"]
    assert "secret123" not in line["msg"]


async def test_event_loop_lag_and_gc_pauses_are_measured(aiohttp_client, make_settings):
    """A loop blocked for 150 ms shows in the lag histogram and its max; a collection in the GC's."""
    import asyncio
    import gc
    import re
    import time

    client = await aiohttp_client(create_app(make_settings(metrics_allow=("127.0.0.0/8", "::1"))))
    await asyncio.sleep(0.1)  # the monitor's first samples
    time.sleep(0.15)  # noqa: ASYNC251 - the loop is stuck, as a slow handler would leave it
    gc.collect()
    await asyncio.sleep(0.1)
    text = await (await client.get("/metrics")).text()
    lag_max = float(re.search(r"^consult_event_loop_lag_max_seconds (\S+)$", text, re.M).group(1))
    assert 0.12 <= lag_max < 5, lag_max
    over_100ms = float(
        re.search(r'^consult_event_loop_lag_seconds_bucket\{le="0.1"\} (\S+)$', text, re.M).group(1)
    )
    total = float(re.search(r"^consult_event_loop_lag_seconds_count (\S+)$", text, re.M).group(1))
    assert total - over_100ms >= 1  # at least one sample above 100 ms
    # Fine enough below 50 ms to tell a 45 ms stall (under a 50 ms target) from a 50 ms one.
    bounds = re.findall(r'^consult_event_loop_lag_seconds_bucket\{le="([^"]+)"\}', text, re.M)
    assert {"0.02", "0.03", "0.04", "0.05"} <= set(bounds), bounds
    assert re.search(r'^consult_gc_pause_seconds_count\{generation="2"\} [1-9]', text, re.M), text[-2000:]
    assert float(re.search(r"^consult_gc_pause_max_seconds (\S+)$", text, re.M).group(1)) > 0
