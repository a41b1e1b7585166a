"""Prometheus metrics: request latency by route, live call gauges, and domain counters.

One registry per application (never the process-global one), so that every test app starts at
zero. Gauges of live state are read when Prometheus scrapes; counters are fed by
``count(app, name, n)`` from the code where the thing happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from consult.core import keys, security
from consult.core.config import ConfigError

log = logging.getLogger(__name__)

# name given to count() -> (metric name, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "bookings": ("consult_bookings", "Visits booked (slot held)."),
    "payments": ("consult_payments", "Payments completed."),
    "uploads": ("consult_uploads", "Test-report files uploaded."),
    "recording_bytes": ("consult_recording_bytes", "Bytes of visit recordings written."),
    "room_events_dropped": (
        "consult_room_events_dropped",
        "Room events not stored: their seat's storage budget for the visit was used up.",
    ),
    "report_files_quarantined": (
        "consult_report_files_quarantined",
        "Stored report files without a row, moved to the quarantine folder.",
    ),
    "payment_callbacks_rejected": (
        "consult_payment_callbacks_rejected",
        "Payment gateway notifications refused (bad signature, malformed body), stored or not.",
    ),
    "jobs_done": ("consult_jobs_done", "Background jobs (refunds, messages) completed."),
    "jobs_failed": ("consult_jobs_failed", "Background job attempts that failed (retried or dead)."),
    "jobs_died": ("consult_jobs_died", "Background jobs given up after their last attempt."),
}
LIVE = {
    "active_rooms": "Visit rooms open on this server.",
    "connected_participants": "People connected to a visit room (at most two per room).",
    "websocket_connections": "Open signaling WebSocket connections, joined or not.",
    "report_files_missing": "Test-report rows whose file is missing (at the last files sweep).",
    "jobs_queued": "Background jobs waiting or running (as of the worker's last sweep).",
    "jobs_dead": "Background jobs given up on, waiting for an admin (as of the last sweep).",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Event-loop lag and garbage-collector pauses: a stalled loop delays every call's signaling at once.
# Fine up to 50 ms (30 and 40 too), so that a lag under a 50 ms target shows as such: a 45 ms stall
# counted in a bucket of 20-50 ms would read as "50 ms".
STALL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
LAG_SAMPLE_S = 0.02


class _LiveCollector(Collector):
    def __init__(self, app: web.Application, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        values = self._metrics.live_values(self._app)
        for name, help_text in LIVE.items():
            yield GaugeMetricFamily(f"consult_{name}", help_text, value=values.get(name, 0))
        server = _find_signaling(self._app)
        dropped = CounterMetricFamily(
            "consult_signaling_messages_dropped",
            "Client messages the signaling server did not record, by reason (over_budget,"
            " throttled, repeated_error, waiting_room).",
            labels=["reason"],
        )
        if server is not None:
            for reason, n in sorted(server.seats.dropped.items()):
                dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily(
            "consult_event_loop_lag_max_seconds",
            "The longest event-loop lag seen since the server started.",
            value=self._metrics.loop_lag_max,
        )
        yield GaugeMetricFamily(
            "consult_gc_pause_max_seconds",
            "The longest garbage-collector pause seen since the server started.",
            value=self._metrics.gc_pause_max,
        )


class Metrics:
    def __init__(self, app: web.Application, allow: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "consult_http_request_duration_seconds",
            "Time to answer an HTTP request, by route name.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.counters = {
            key: Counter(name, help_text, registry=self.registry)
            for key, (name, help_text) in COUNTERS.items()
        }
        self.loop_lag = Histogram(
            "consult_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LAG_SAMPLE_S * 1000:g} ms (sampled"
            " continuously): every request and signaling message waits this long too.",
            buckets=STALL_BUCKETS,
            registry=self.registry,
        )
        self.gc_pause = Histogram(
            "consult_gc_pause_seconds",
            "Time the garbage collector stopped the process, by generation collected.",
            ["generation"],
            buckets=STALL_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag_max = 0.0
        self.gc_pause_max = 0.0
        # latency.labels(route, method, status) looked up once per combination, not per request
        self.latency_children: dict[tuple[str, str, int], Any] = {}
        self.providers: dict[str, Callable[[], float]] = {}
        self.registry.register(_LiveCollector(app, self))
        try:
            self.allow = tuple(ipaddress.ip_network(a, strict=False) for a in allow)
        except ValueError as exc:
            raise ConfigError(f"setting 'metrics_allow': {exc}") from None

    def live_values(self, app: web.Application) -> dict[str, float]:
        values: dict[str, float] = {}
        server = _find_signaling(app)
        if server is not None:
            values["active_rooms"] = len(server.rooms)
            values["connected_participants"] = sum(
                1 for room in list(server.rooms.values()) for c in room.slots.values() if c is not None
            )
            values["websocket_connections"] = len(server.connections)
        for name, provider in self.providers.items():
            try:
                values[name] = float(provider())
            except Exception:  # a broken gauge must not break the scrape
                log.exception("metrics provider %s failed", name)
        return values

    def allowed_address(self, remote: str | None) -> bool:
        if not remote or not self.allow:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in net for net in self.allow)


METRICS = web.AppKey("metrics", Metrics)
MAX_LATENCY_CHILDREN = 1000


def _find_signaling(app: web.Application):  # -> signaling.server.SignalingServer | None
    """The signaling server, wherever the call module keeps it (consult never imports it by key)."""
    from signaling.server import SignalingServer

    for key in list(app):
        value = app[key]
        if isinstance(value, SignalingServer):
            return value
    return None


def count(app: web.Application, name: str, n: float = 1) -> None:
    """Add ``n`` to one of ``COUNTERS`` (bookings, payments, uploads, recording_bytes, jobs_*, ...).

    A no-op in an app built without metrics; an unknown name is a bug and raises KeyError.
    """
    metrics = app.get(METRICS)
    if metrics is None:
        if name not in COUNTERS:
            raise KeyError(name)
        return
    metrics.counters[name].inc(n)


def provide(app: web.Application, name: str, fn: Callable[[], float]) -> None:
    """Override a live gauge (``LIVE``) with a function read at scrape time."""
    if name not in LIVE:
        raise KeyError(name)
    app[METRICS].providers[name] = fn


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    if route.name:
        return route.name
    resource = route.resource
    if resource is None:
        return "unmatched"  # never the raw path: it would make one series per URL
    return getattr(resource, "canonical", None) or "unnamed"


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # defensive: Consult's context middleware returns them all
        status = exc.status
        raise
    finally:
        # A WebSocket "request" lasts as long as the call: it is not a latency.
        if status != 101:
            metrics = request.app[METRICS]
            key = (_route_name(request), request.method, status)
            child = metrics.latency_children.get(key)
            if child is None:
                child = metrics.latency.labels(key[0], key[1], str(status))
                if len(metrics.latency_children) < MAX_LATENCY_CHILDREN:  # methods come from clients
                    metrics.latency_children[key] = child
            child.observe(time.perf_counter() - start)


async def metrics_view(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if not metrics.allowed_address(request.remote):
        security.require(request, "admin")
    body = generate_latest(metrics.registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def stall_monitor(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: measures event-loop lag (a timer every LAG_SAMPLE_S) and GC pauses."""
    metrics = app.get(METRICS)
    if metrics is None:
        yield
        return
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            pause = time.perf_counter() - started.pop()
            metrics.gc_pause.labels(str(info.get("generation", "?"))).observe(pause)
            metrics.gc_pause_max = max(metrics.gc_pause_max, pause)

    async def sample() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_SAMPLE_S
            await asyncio.sleep(LAG_SAMPLE_S)
            lag = max(0.0, loop.time() - due)
            metrics.loop_lag.observe(lag)
            metrics.loop_lag_max = max(metrics.loop_lag_max, lag)

    gc.callbacks.append(on_gc)
    task = asyncio.create_task(sample(), name="stall-monitor")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(on_gc)


def setup(app: web.Application) -> None:
    settings = app[keys.SETTINGS]
    app[METRICS] = Metrics(app, settings.metrics_allow)
    # Outermost, so that the time includes sessions, error pages and CSRF checks.
    app.middlewares.insert(0, metrics_middleware)
    app.router.add_get("/metrics", metrics_view, name="metrics")
