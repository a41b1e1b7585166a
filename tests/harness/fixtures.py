"""pytest fixtures of the harness. In tests/conftest.py: `from tests.harness.fixtures import *`.

That import also brings in the `pytest_runtest_makereport` hook which stores each phase's
report on the item (`item.rep_setup`, `item.rep_call`, `item.rep_teardown`); fixture teardowns
use it to save a screenshot and the console log of every open page into
`test-artifacts/<test name>/` when the test failed (override the folder with
$CONSULT_TEST_ARTIFACTS).

Everything is function-scoped: each test gets its own server, data dir, coturn and browser, and
the browser trusts the test's own `app_origin` as a secure context.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Playwright, async_playwright

from tests.harness.browser import (
    DOCTOR_CONTEXT,
    MEDIA_PERMISSIONS,
    PATIENT_CONTEXT,
    PageRecorder,
    artifact_dir,
    launch_chromium,
    save_page_artifacts,
)
from tests.harness.firefox import Firefox, default_route
from tests.harness.haproxy import HAProxy
from tests.harness.nginx import NginxProxy
from tests.harness.postgres import PostgresServer
from tests.harness.server import BRIDGE_ADDR, ConsultServer, free_port
from tests.harness.turn import TurnServer

__all__ = [
    "app_origin",
    "artifacts_root",
    "browser",
    "chromium_extra_args",
    "consult_demo",
    "consult_env",
    "consult_server",
    "consult_server_factory",
    "coturn",
    "doctor_context",
    "doctor_page",
    "failure_artifacts",
    "firefox",
    "haproxy",
    "nginx_proxy",
    "pages",
    "patient_context",
    "patient_page",
    "playwright",
    "postgres_server",
    "postgres_url",
    "pytest_runtest_makereport",
    "server_port",
    "zh_desktop",
    "zh_phone",
]

DEFAULT_TIMEOUT_MS = 15_000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def node_failed(node: pytest.Item) -> bool:
    """True once the setup or call phase of `node` failed (read in fixture teardown)."""
    return any(getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))


class FailureArtifacts:
    """The failure-artifact folder of one test, created on first use."""

    __test__ = False

    def __init__(self, root: Path, node: pytest.Item) -> None:
        self.node = node
        self.dir = artifact_dir(root, node.nodeid)

    @property
    def failed(self) -> bool:
        return node_failed(self.node)

    def copy(self, path: Path, name: str | None = None) -> None:
        if path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.dir / (name or path.name))


@pytest.fixture(scope="session")
def artifacts_root(pytestconfig: pytest.Config) -> Path:
    env = os.environ.get("CONSULT_TEST_ARTIFACTS")
    return Path(env) if env else pytestconfig.rootpath / "test-artifacts"


@pytest.fixture
def failure_artifacts(artifacts_root: Path, request: pytest.FixtureRequest) -> FailureArtifacts:
    return FailureArtifacts(artifacts_root, request.node)


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the whole session (tests/harness/postgres.py), on 127.0.0.1
    and a unix socket; started when the first test asks for it, gone when the session ends."""
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, failure_artifacts: FailureArtifacts) -> Iterator[str]:
    """`postgresql://postgres@127.0.0.1:PORT/test_<random>`: this test's own fresh database,
    dropped afterwards; the server's log goes to the test's artifacts when it failed."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)
    if failure_artifacts.failed:
        failure_artifacts.copy(postgres_server.log_path)


@pytest.fixture
def server_port() -> int:
    """The port of this test's (first) server; the browser trusts it as a secure origin."""
    return free_port(BRIDGE_ADDR)


@pytest.fixture
def app_origin(server_port: int) -> str:
    return f"http://{BRIDGE_ADDR}:{server_port}"


@pytest.fixture
def consult_env() -> Mapping[str, str]:
    """Extra CONSULT_* env vars for `consult_server`; override it (fixture or parametrize)."""
    return {}


@pytest.fixture
def consult_demo() -> bool:
    """Whether `consult_server` runs `consult demo` after `init`; override to change."""
    return True


ConsultFactory = Callable[..., Awaitable[ConsultServer]]


@pytest.fixture
async def consult_server_factory(
    tmp_path: Path,
    server_port: int,
    failure_artifacts: FailureArtifacts,
    make_database_url: Callable[[], str],
) -> AsyncIterator[ConsultFactory]:
    """`await make(env={...}, demo=True, name="consult", port=None, host=BRIDGE_ADDR) -> ConsultServer`.

    The first server on the bridge gets `server_port` (= `app_origin`), later ones a fresh port. Each gets
    its own data dir `tmp_path/<name>-data`; logs in `tmp_path/<name>.*.log`. `demo=True` seeds it
    with `consult demo`, so it is served in demo mode; `serve_args=["--demo"]` serves an unseeded
    one in demo mode (the payment simulator); otherwise it is a production server.
    """
    servers: list[ConsultServer] = []

    async def make(
        *,
        env: Mapping[str, str] | None = None,
        demo: bool = True,
        name: str = "consult",
        port: int | None = None,
        host: str = BRIDGE_ADDR,
        serve_args: Sequence[str] = (),
    ) -> ConsultServer:
        if port is None and not servers and host == BRIDGE_ADDR:
            port = server_port
        if any(s.name == name for s in servers):
            name = f"{name}{len(servers) + 1}"
        url = make_database_url()  # on PostgreSQL each server its own database, as its own data dir
        if url:
            env = {"CONSULT_DATABASE_URL": url, **(env or {})}
        server = ConsultServer(
            tmp_path / f"{name}-data",
            log_dir=tmp_path,
            port=port,
            host=host,
            env=env,
            name=name,
            serve_args=serve_args,
        )
        servers.append(server)
        await asyncio.to_thread(server.init, demo=demo)
        await server.astart()
        return server

    yield make
    for server in servers:
        server.stop()
    if failure_artifacts.failed:
        for server in servers:
            for path in (server.stdout_path, server.stderr_path, tmp_path / f"{server.name}.cli.log"):
                failure_artifacts.copy(path)


@pytest.fixture
async def consult_server(
    consult_server_factory: ConsultFactory, consult_env: Mapping[str, str], consult_demo: bool
) -> ConsultServer:
    """The real Consult server on `app_origin`, fresh data dir, `init` (+ `demo`)."""
    return await consult_server_factory(env=consult_env, demo=consult_demo)


NginxFactory = Callable[[ConsultServer], Awaitable[NginxProxy]]


@pytest.fixture
async def nginx_proxy(tmp_path: Path, failure_artifacts: FailureArtifacts) -> AsyncIterator[NginxFactory]:
    """`await nginx_proxy(upstream) -> NginxProxy`: nginx with docs/install.md's site block on
    https://10.99.0.1:<port> (`.origin`, `.url(path)`), TLS with a development certificate,
    in front of `upstream` (a ConsultServer, normally on 127.0.0.1 with trusted_proxies set).
    Stopped in teardown; its logs join the failure artifacts."""
    proxies: list[NginxProxy] = []

    async def make(upstream: ConsultServer) -> NginxProxy:
        proxy = NginxProxy(tmp_path / f"nginx{len(proxies) + 1}", upstream.origin)
        proxies.append(proxy)
        return await proxy.astart()

    yield make
    for proxy in proxies:
        proxy.stop()
    if failure_artifacts.failed:
        for proxy in proxies:
            for path in (proxy.error_log, proxy.access_log, proxy.site_path):
                failure_artifacts.copy(path, f"{proxy.directory.name}-{path.name}")


HAProxyFactory = Callable[..., Awaitable[HAProxy]]


@pytest.fixture
async def haproxy(tmp_path: Path, failure_artifacts: FailureArtifacts) -> AsyncIterator[HAProxyFactory]:
    """`await haproxy([(host, port), ...], host=BRIDGE_ADDR) -> HAProxy`: deploy/haproxy.cfg as
    shipped on https://<host>:<port> (`.origin`, `.url(path)`) in front of those nodes (Consult
    servers with trusted_proxies set, or `StandInNode`s). Stopped in teardown; its config and
    log join the failure artifacts."""
    proxies: list[HAProxy] = []

    async def make(nodes: Sequence[tuple[str, int]], *, host: str = BRIDGE_ADDR) -> HAProxy:
        proxy = HAProxy(tmp_path / f"haproxy{len(proxies) + 1}", nodes, host=host)
        proxies.append(proxy)
        await proxy.astart()
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
    if failure_artifacts.failed:
        for proxy in proxies:
            for path in (proxy.conf_path, proxy.stdout_path, proxy.stderr_path):
                failure_artifacts.copy(path, f"{proxy.directory.name}-{path.name}")


@pytest.fixture
def coturn(tmp_path: Path, failure_artifacts: FailureArtifacts) -> Iterator[TurnServer]:
    """A started coturn on 10.99.0.1 (`.url`, `.secret`, `.realm`, `.ice_server(user)`)."""
    server = TurnServer(tmp_path)
    server.start()
    yield server
    server.stop()
    if failure_artifacts.failed:
        failure_artifacts.copy(server.log_path)


# -- browser ---------------------------------------------------------------------------------


@pytest.fixture
async def playwright() -> AsyncIterator[Playwright]:
    async with async_playwright() as pw:
        yield pw


@pytest.fixture
def pages() -> PageRecorder:
    """Records request URLs, console messages and errors of every page of the fixtures'
    contexts: `pages.log(page)` -> `PageLog`; `await pages.new_page(context, "name")`."""
    return PageRecorder()


@pytest.fixture
def chromium_extra_args() -> list[str]:
    """More Chromium flags for `browser`; override it (e.g. ["--ignore-certificate-errors"])."""
    return []


@pytest.fixture
async def browser(
    playwright: Playwright,
    app_origin: str,
    pages: PageRecorder,
    failure_artifacts: FailureArtifacts,
    chromium_extra_args: list[str],
) -> AsyncIterator[Browser]:
    """Headless Debian Chromium (fresh profile) that treats `app_origin` as secure."""
    browser = await launch_chromium(playwright, [app_origin], extra_args=chromium_extra_args)
    yield browser
    try:
        if failure_artifacts.failed:
            # Pages of contexts the test opened itself (the context fixtures saved theirs).
            open_logs = [log for log in pages.logs if not log.page.is_closed()]
            await save_page_artifacts(failure_artifacts.dir, open_logs)
    finally:
        await browser.close()


@contextlib.asynccontextmanager
async def _context(
    browser: Browser, pages: PageRecorder, artifacts: FailureArtifacts, name: str, options: dict
) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context(permissions=MEDIA_PERMISSIONS, **options)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    pages.watch_context(context, name)
    yield context
    try:
        if artifacts.failed:
            await save_page_artifacts(artifacts.dir, pages.for_context(context))
    finally:
        await context.close()


@pytest.fixture
async def patient_context(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[BrowserContext]:
    """Phone: 390x844, mobile, touch, DPR 3, mobile Chrome UA; camera + microphone granted."""
    async with _context(browser, pages, failure_artifacts, "patient", PATIENT_CONTEXT) as context:
        yield context


@pytest.fixture
async def doctor_context(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[BrowserContext]:
    """Desktop 1366x800; camera + microphone granted."""
    async with _context(browser, pages, failure_artifacts, "doctor", DOCTOR_CONTEXT) as context:
        yield context


@pytest.fixture
async def zh_phone(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[BrowserContext]:
    """The patient's phone as `patient_context`, its browser asking for Chinese."""
    async with _context(
        browser, pages, failure_artifacts, "patient", {**PATIENT_CONTEXT, "locale": "zh-CN"}
    ) as context:
        yield context


@pytest.fixture
async def zh_desktop(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[BrowserContext]:
    """The doctor's PC as `doctor_context`, its browser asking for Chinese."""
    async with _context(
        browser, pages, failure_artifacts, "doctor", {**DOCTOR_CONTEXT, "locale": "zh-CN"}
    ) as context:
        yield context


@pytest.fixture
async def patient_page(patient_context: BrowserContext, pages: PageRecorder) -> Page:
    return await pages.new_page(patient_context, "patient")


@pytest.fixture
async def doctor_page(doctor_context: BrowserContext, pages: PageRecorder) -> Page:
    return await pages.new_page(doctor_context, "doctor")


@pytest.fixture
async def firefox(
    tmp_path: Path, app_origin: str, failure_artifacts: FailureArtifacts
) -> AsyncIterator[Firefox]:
    """Headless Firefox ESR (fresh profile, fake camera and microphone, `app_origin` trusted as
    a secure context), driven over WebDriver BiDi; a default route in the namespace meanwhile."""
    with default_route():
        browser = Firefox(tmp_path / "firefox-profile", secure_origins=[app_origin])
        try:
            await browser.start()
            yield browser
        finally:
            try:
                if failure_artifacts.failed:
                    failure_artifacts.dir.mkdir(parents=True, exist_ok=True)
                    (failure_artifacts.dir / "firefox.console.log").write_text(browser.log_text())
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(browser.screenshot(failure_artifacts.dir / "firefox.png"), 10)
            finally:
                await browser.close()
