"""Headless Debian Chromium through async Playwright, request/console logs, failure artifacts."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright

from tests.harness.programs import require_program
from tests.harness.server import BRIDGE_ADDR

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]

MOBILE_CHROME_UA = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36"
)

PATIENT_CONTEXT = {
    "viewport": {"width": 390, "height": 844},
    "screen": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "device_scale_factor": 3,
    "user_agent": MOBILE_CHROME_UA,
}
DOCTOR_CONTEXT = {"viewport": {"width": 1366, "height": 800}}
MEDIA_PERMISSIONS = ["camera", "microphone"]


def chromium_args(secure_origins: Iterable[str] = ()) -> list[str]:
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        # Belt and braces: the namespace has no route out anyway.
        f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {BRIDGE_ADDR}, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        # A proxy from the environment would swallow requests to the bridge address.
        "--no-proxy-server",
    ]
    origins = [o.rstrip("/") for o in secure_origins]
    if origins:
        args.append("--unsafely-treat-insecure-origin-as-secure=" + ",".join(origins))
    return args


async def launch_chromium(
    playwright: Playwright, secure_origins: Iterable[str] = (), extra_args: Iterable[str] = (), **kwargs
) -> Browser:
    """Debian's Chromium, headless; Playwright gives each launch a fresh temporary profile."""
    return await playwright.chromium.launch(
        executable_path=require_program("chromium"),
        headless=True,
        args=[*chromium_args(secure_origins), *extra_args],
        **kwargs,
    )


@dataclass
class PageLog:
    """What one page did: request URLs (incl. WebSockets), console messages, page errors."""

    name: str
    page: Page
    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [f"# page {self.name}: {self.page.url if not self.page.is_closed() else 'closed'}"]
        parts += ["## console", *self.console, "## page errors", *self.errors]
        parts += ["## requests", *self.requests, "## failed requests", *self.failed_requests]
        return "\n".join(parts) + "\n"


class PageRecorder:
    """Logs every page of the contexts it watches; `log(page)` gives that page's `PageLog`."""

    def __init__(self) -> None:
        self.logs: list[PageLog] = []
        self._by_page: dict[int, PageLog] = {}
        self._context_names: dict[int, str] = {}

    def watch_context(self, context: BrowserContext, name: str = "page") -> BrowserContext:
        self._context_names[id(context)] = name
        for page in context.pages:
            self.watch(page)
        context.on("page", self.watch)
        return context

    def watch(self, page: Page, name: str | None = None) -> PageLog:
        if id(page) in self._by_page:
            return self._by_page[id(page)]
        base = name or self._context_names.get(id(page.context), "page")
        taken = {log.name for log in self.logs}
        unique, n = base, 1
        while unique in taken:
            n += 1
            unique = f"{base}-{n}"
        log = PageLog(unique, page)
        self.logs.append(log)
        self._by_page[id(page)] = log
        page.on("request", lambda r: log.requests.append(r.url))
        page.on("requestfailed", lambda r: log.failed_requests.append(f"{r.url} {r.failure}"))
        page.on("websocket", lambda ws: log.requests.append(ws.url))
        page.on("console", lambda m: log.console.append(_console_line(m)))
        page.on("pageerror", lambda e: log.errors.append(f"{e.name}: {e.message}\n{e.stack}"))
        return log

    def log(self, page: Page) -> PageLog:
        return self._by_page[id(page)]

    async def new_page(self, context: BrowserContext, name: str | None = None) -> Page:
        if id(context) not in self._context_names:
            self.watch_context(context, name or "page")
        page = await context.new_page()
        log = self._by_page.get(id(page)) or self.watch(page)
        if name and log.name != name and name not in {x.name for x in self.logs}:
            log.name = name
        return page

    def for_context(self, context: BrowserContext) -> list[PageLog]:
        return [log for log in self.logs if log.page.context is context]

    async def save_artifacts(self, dest: Path, logs: Iterable[PageLog] | None = None) -> None:
        await save_page_artifacts(dest, self.logs if logs is None else logs)


def _console_line(msg: ConsoleMessage) -> str:
    loc = msg.location or {}
    where = f" ({loc.get('url')}:{loc.get('lineNumber')})" if loc.get("url") else ""
    return f"[{msg.type}] {msg.text}{where}"


def artifacts_path() -> Path:
    """`test-artifacts/` in the repository, or $CONSULT_TEST_ARTIFACTS (as the fixture's)."""
    env = os.environ.get("CONSULT_TEST_ARTIFACTS")
    return Path(env) if env else ROOT / "test-artifacts"


async def save_screenshot(page: Page, name: str) -> Path:
    """The whole page as `test-artifacts/screenshots/{name}.png` (kept whether or not the test
    fails: pictures of the pages as the phone shows them)."""
    safe = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_")[:120] or "page"
    path = artifacts_path() / "screenshots" / f"{safe}.png"
    _write(path, await page.screenshot(full_page=True, scale="css", timeout=30_000))
    return path


def artifact_dir(root: Path, nodeid: str) -> Path:
    """`root/<test name>`: the node id with anything unsafe in a file name replaced."""
    name = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", nodeid.replace("::", "__")).strip("_")
    return root / name[:200]


async def save_page_artifacts(dest: Path, logs: Iterable[PageLog]) -> list[Path]:
    """For each page: `<name>.png` (if still open) and `<name>.console.log`; return the files."""
    written: list[Path] = []
    for log in logs:
        text_path = dest / f"{log.name}.console.log"
        _write(text_path, log.text())
        written.append(text_path)
        if log.page.is_closed():
            continue
        shot = dest / f"{log.name}.png"
        try:
            _write(shot, await log.page.screenshot(full_page=True, timeout=5000))
            written.append(shot)
        except Exception as e:  # a crashed page must not hide the test's own failure
            _write(text_path, log.text() + f"## screenshot failed\n{e!r}\n")
    return written


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def _origin(url: str) -> str | None:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{parts.hostname}:{port}"


def _normal_origin(origin: str) -> str:
    normal = _origin(origin.rstrip("/") + "/")
    if normal is None:
        raise ValueError(f"not an http(s) origin: {origin!r}")
    return normal


def foreign_requests(urls: Iterable[str], allowed_origin: str | Iterable[str]) -> list[str]:
    """The URLs that went anywhere but `allowed_origin` (ws/wss count as http/https)."""
    allowed_list = [allowed_origin] if isinstance(allowed_origin, str) else list(allowed_origin)
    allowed = {_normal_origin(o) for o in allowed_list}
    bad = []
    for url in urls:
        scheme = url.split(":", 1)[0].lower()
        if scheme in ("data", "about"):
            continue
        target = url[len("blob:") :] if scheme == "blob" else url
        if _origin(target) not in allowed:
            bad.append(url)
    return bad


def assert_only_local_requests(
    page_log: PageLog | PageRecorder | Iterable[str], allowed_origin: str | Iterable[str]
) -> None:
    """Fail if any request of the page(s) went to another origin than `allowed_origin`."""
    if isinstance(page_log, PageRecorder):
        urls = [u for log in page_log.logs for u in log.requests]
    elif isinstance(page_log, PageLog):
        urls = page_log.requests
    else:
        urls = list(page_log)
    bad = foreign_requests(urls, allowed_origin)
    assert not bad, f"requests left {allowed_origin}: {bad}"
