"""Benchmark: bytes on the wire of the patient's pages, loaded cold on a phone.

Setup: a real Consult server process (`init` + `demo` in a temporary data dir, served with
`python -m consult serve --no-tls` on the private namespace bridge 10.99.0.1) and headless
Debian Chromium (/usr/bin/chromium through Playwright), everything inside a private network
namespace that this script enters itself (bench/common.py; needs root). Nothing can reach a
real network.

Each page is loaded once in a fresh browser context (empty HTTP cache; the signed-in pages get
only the session cookie) with a phone viewport and user agent, waiting for the `load` event and
then until the network has been quiet for 1 s. What is measured comes from Chromium's own
network log (Chrome DevTools Protocol, `Network.*` events of the page):

  - bytes: the sum over every HTTP response of `Network.loadingFinished.encodedDataLength`,
    i.e. response headers plus the body as it came over the wire (compressed when it was
    compressed). Request bytes sent and WebSocket frames are not counted. 1 kb = 1000 bytes.
  - requests: every HTTP request the page made (the document, scripts, styles, icon, XHR).
    A WebSocket the page opens is counted apart (`websockets`).
  - external requests: requests (HTTP or WebSocket) to anything that is not the server's
    origin (data: and blob: URLs are not requests). Must be 0.
  - duplicate requests: the same URL fetched more than once in one cold load. Must be 0.
  - uncompressed: script, style, SVG and JSON responses of more than 1 kb that came without
    a Content-Encoding (Chromium always accepts gzip; `accept_encoding` reports what it sent:
    over plain HTTP it offers no brotli). HTML is not counted: pages are sent as they are
    rendered (they carry per-user secrets; see README). Must be 0.

Pages (a fresh confirmed visit is seeded for the call pages, and its signed link minted with
the server's keys, as bench/join.py does):
  - `call`: the patient's call page of a visit that is not recorded (the default policy).
    Its kb is `call_page_kb`: target <= 60.
  - `call_recorded`: the same page for a visit whose doctor records on request (the consent
    box and the recording code load). Reported, not a target.
  - `login`, `book_departments`, `book_doctors`, `book_slots`: the sign-in page and the three
    booking pages (the demo patient signed in). Target <= 60 kb each.

The last line of stdout is one JSON object: `call_page_kb`, `external_requests`, per page its
`kb`, `requests`, `websockets`, `external`, `duplicates` and `uncompressed`, the `targets`, the
`failures` (each figure that missed its target, with its value) and `pass`. The exit status
is 0 when every figure meets its target, 1 when one does not.

    .venv/bin/python bench/pageweight.py
    .venv/bin/python bench/pageweight.py --keep      # keep the work dir (server logs)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common import ConsultServer, enter_private_netns  # bench/ is on sys.path
from join import MEDIA_PERMISSIONS, PATIENT_CONTEXT, launch_chromium, new_visit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PATIENT_LOGIN = "13800000000"  # the demo patient (consult/ops/demo.py)
PASSWORD = "Bench-weight-pass-2024"
CALL_DOCTOR = "dr.wang"  # recording off (the default policy)
RECORDED_DOCTOR = "dr.li"  # recording on request, set for this run
WAIT_MS = 20_000
QUIET_S = 1.0
TEXT_TYPES = ("javascript", "css", "svg", "json")

PAGE_FIGURES = ("kb", "requests", "websockets", "external", "duplicates", "uncompressed")
TARGETS = {
    "call_page_kb": 60.0,
    "page_kb": 60.0,  # every page but `call_recorded`
    "external_requests": 0,
    "duplicate_requests": 0,
    "uncompressed_responses": 0,
}


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def prepare(server: ConsultServer) -> dict[str, Any]:
    """Passwords for the demo patient, the doctors' ids, a department and a doctor that books."""
    server.cli("user", "passwd", PATIENT_LOGIN, "--password", PASSWORD)
    conn = sqlite3.connect(server.data_dir / "consult.db", isolation_level=None)
    try:
        ids = {
            name: conn.execute("SELECT id FROM users WHERE username = ?", [name]).fetchone()[0]
            for name in (CALL_DOCTOR, RECORDED_DOCTOR)
        }
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute(
            "UPDATE doctors SET recording_policy = 'on_request' WHERE user_id = ?", [ids[RECORDED_DOCTOR]]
        )
        department_id = conn.execute(
            "SELECT department_id FROM doctor_departments WHERE doctor_id = ? LIMIT 1", [ids[CALL_DOCTOR]]
        ).fetchone()[0]
        return {"doctor_ids": ids, "department_id": department_id}
    finally:
        conn.close()


class NetLog:
    """One page's network, from the DevTools protocol."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.requests: dict[str, dict[str, Any]] = {}
        self.websockets: list[str] = []
        self.accept_encoding = ""
        self.last_event = time.monotonic()

    def attach(self, cdp: Any) -> None:
        cdp.on("Network.requestWillBeSent", self._sent)
        cdp.on("Network.responseReceived", self._response)
        cdp.on("Network.loadingFinished", self._finished)
        cdp.on("Network.loadingFailed", self._failed)
        cdp.on("Network.webSocketCreated", self._websocket)
        cdp.on("Network.requestWillBeSentExtraInfo", self._sent_headers)

    def _sent_headers(self, e: dict) -> None:
        # The headers as sent (Accept-Encoding is added below the page, so only seen here).
        value = _header(e.get("headers", {}), "accept-encoding")
        if value:
            self.accept_encoding = value

    def _touch(self) -> None:
        self.last_event = time.monotonic()

    def _sent(self, e: dict) -> None:
        self._touch()
        url = e["request"]["url"]
        if url.startswith(("data:", "blob:")):
            return
        entry = self.requests.setdefault(e["requestId"], {"url": url, "done": False, "bytes": 0})
        if "redirectResponse" in e:  # the same id goes on after a redirect: count the hop
            hop_bytes = e["redirectResponse"].get("encodedDataLength", 0)
            hop = {"url": entry["url"], "done": True, "bytes": hop_bytes}
            self.requests[e["requestId"] + ":" + str(len(self.requests))] = hop
            entry["url"] = url

    def _response(self, e: dict) -> None:
        self._touch()
        entry = self.requests.get(e["requestId"])
        if entry is None:
            return
        r = e["response"]
        entry["status"] = r.get("status")
        entry["mime"] = r.get("mimeType", "")
        entry["encoding"] = _header(r.get("headers", {}), "content-encoding")
        entry["cache_control"] = _header(r.get("headers", {}), "cache-control")

    def _finished(self, e: dict) -> None:
        self._touch()
        entry = self.requests.get(e["requestId"])
        if entry is not None:
            entry["bytes"] = int(e.get("encodedDataLength", 0))
            entry["done"] = True

    def _failed(self, e: dict) -> None:
        self._touch()
        entry = self.requests.get(e["requestId"])
        if entry is not None:
            entry["done"] = True
            entry["failed"] = e.get("errorText", "failed")

    def _websocket(self, e: dict) -> None:
        self._touch()
        self.websockets.append(e["url"])

    def in_flight(self) -> int:
        return sum(1 for r in self.requests.values() if not r["done"])

    def external(self, url: str) -> bool:
        parts = urlsplit(url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        return f"{scheme}://{parts.netloc}" != self.origin

    def figures(self) -> dict[str, Any]:
        urls = [r["url"] for r in self.requests.values()]
        seen: dict[str, int] = {}
        for url in urls:
            seen[url] = seen.get(url, 0) + 1
        uncompressed = [
            r["url"]
            for r in self.requests.values()
            if any(t in r.get("mime", "") for t in TEXT_TYPES) and r["bytes"] > 1000 and not r.get("encoding")
        ]
        total = sum(r["bytes"] for r in self.requests.values())
        return {
            "kb": round(total / 1000, 1),
            "bytes": total,
            "requests": len(urls),
            "websockets": len(self.websockets),
            "external": sum(1 for u in [*urls, *self.websockets] if self.external(u)),
            "duplicates": sorted(u for u, n in seen.items() if n > 1),
            "uncompressed": sorted(uncompressed),
            "accept_encoding": self.accept_encoding,
            "failed": sorted(r["url"] for r in self.requests.values() if r.get("failed")),
            "files": sorted(
                (
                    {
                        "path": urlsplit(r["url"]).path,
                        "bytes": r["bytes"],
                        "encoding": r.get("encoding") or "",
                        "cache": r.get("cache_control") or "",
                    }
                    for r in self.requests.values()
                ),
                key=lambda f: -f["bytes"],
            ),
        }


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


async def load_cold(browser: Any, origin: str, url: str, cookies: list[dict] | None = None) -> dict:
    """`url` in a fresh context (empty cache): its network figures once it has gone quiet."""
    context = await browser.new_context(permissions=MEDIA_PERMISSIONS, **PATIENT_CONTEXT)
    try:
        context.set_default_timeout(WAIT_MS)
        if cookies:
            await context.add_cookies(cookies)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        net = NetLog(origin)
        cdp = await context.new_cdp_session(page)
        net.attach(cdp)
        await cdp.send("Network.enable")
        await cdp.send("Network.setCacheDisabled", {"cacheDisabled": False})
        response = await page.goto(url, wait_until="load")
        if response is None or response.status != 200:
            raise RuntimeError(f"{url}: status {response.status if response else None}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if net.in_flight() == 0 and time.monotonic() - net.last_event >= QUIET_S:
                break
            await asyncio.sleep(0.05)
        figures = net.figures()
        figures["page_errors"] = errors
        return figures
    finally:
        await context.close()


async def sign_in(browser: Any, origin: str) -> list[dict]:
    context = await browser.new_context(**PATIENT_CONTEXT)
    try:
        page = await context.new_page()
        await page.goto(origin + "/login")
        form = page.locator("main form[action='/login']")
        await form.locator("input[name=identifier]").fill(PATIENT_LOGIN)
        await form.locator("input[name=password]").fill(PASSWORD)
        await form.locator("button[type=submit]").click()
        await page.wait_for_url(origin + "/patient", timeout=WAIT_MS)
        return await context.cookies()  # the session (and CSRF) cookies, nothing cached
    finally:
        await context.close()


async def first_link(browser: Any, url: str, cookies: list[dict], selector: str) -> str:
    """The first link matching `selector` on `url` (the next booking page to load)."""
    context = await browser.new_context(**PATIENT_CONTEXT)
    try:
        await context.add_cookies(cookies)
        page = await context.new_page()
        await page.goto(url)
        href = await page.locator(selector).first.get_attribute("href", timeout=WAIT_MS)
        if not href:
            raise RuntimeError(f"no link {selector!r} on {url}")
        return href
    finally:
        await context.close()


async def bench(work: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    server = ConsultServer(work / "data", log_dir=work, env={"CONSULT_DEFAULT_LOCALE": "en"})
    await asyncio.to_thread(server.init, demo=True)
    await server.astart()
    pages: dict[str, dict[str, Any]] = {}
    try:
        seeded = await asyncio.to_thread(prepare, server)
        ids = seeded["doctor_ids"]
        call_url, _ = await asyncio.to_thread(new_visit, server, ids[CALL_DOCTOR])
        recorded_url, _ = await asyncio.to_thread(new_visit, server, ids[RECORDED_DOCTOR])
        origin = server.origin
        async with async_playwright() as pw:
            browser = await launch_chromium(pw, [origin])
            try:
                # Warm the server (template compilation, static caches) so that a cold
                # browser, not a cold server, is measured: one load, not counted.
                await load_cold(browser, origin, origin + "/login")
                pages["call"] = await load_cold(browser, origin, call_url)
                pages["call_recorded"] = await load_cold(browser, origin, recorded_url)
                pages["login"] = await load_cold(browser, origin, origin + "/login")
                cookies = await sign_in(browser, origin)
                book = origin + "/book"
                pages["book_departments"] = await load_cold(browser, origin, book, cookies)
                doctors = origin + await first_link(browser, book, cookies, "main a[href^='/book/']")
                pages["book_doctors"] = await load_cold(browser, origin, doctors, cookies)
                slots = origin + await first_link(browser, doctors, cookies, "main a[href*='/doctors/']")
                pages["book_slots"] = await load_cold(browser, origin, slots, cookies)
            finally:
                await browser.close()
    finally:
        server.stop()
    return summarise(pages)


def summarise(pages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    failures: list[str] = []
    for name, p in pages.items():
        log(f"{name}: {p['kb']} kb in {p['requests']} requests (+{p['websockets']} websocket)")
        for f in p["files"]:
            log(f"    {f['bytes']:>7} B  {f['encoding'] or '-':<5} {f['path']}  [{f['cache']}]")
        if p["page_errors"]:
            log(f"    page errors: {p['page_errors']}")
        if name not in ("call", "call_recorded") and p["kb"] > TARGETS["page_kb"]:
            failures.append(f"{name}: {p['kb']} kb > {TARGETS['page_kb']}")
        if p["failed"]:
            failures.append(f"{name}: failed requests {p['failed']}")
    call_kb = pages["call"]["kb"]
    if call_kb > TARGETS["call_page_kb"]:
        failures.append(f"call_page_kb: {call_kb} > {TARGETS['call_page_kb']}")
    external = sum(p["external"] for p in pages.values())
    if external > TARGETS["external_requests"]:
        failures.append(f"external_requests: {external}")
    duplicates = sum(len(p["duplicates"]) for p in pages.values())
    if duplicates > TARGETS["duplicate_requests"]:
        dup = {n: p["duplicates"] for n, p in pages.items() if p["duplicates"]}
        failures.append(f"duplicate_requests: {duplicates} {dup}")
    uncompressed = sum(len(p["uncompressed"]) for p in pages.values())
    if uncompressed > TARGETS["uncompressed_responses"]:
        unc = {n: p["uncompressed"] for n, p in pages.items() if p["uncompressed"]}
        failures.append(f"uncompressed_responses: {uncompressed} {unc}")
    from consult.core.templates import BUNDLES, STATIC_PREFIX

    def loaded(path: str) -> tuple[str, ...]:
        """The web/static files a request brought: a bundle's parts, or the file itself."""
        name = path.removeprefix(STATIC_PREFIX)
        return BUNDLES.get(name, (name,))

    def has_recording_js(page: str) -> bool:
        return any("call-recording.js" in loaded(f["path"]) for f in pages[page]["files"])

    recording_js = has_recording_js("call")
    if not has_recording_js("call_recorded"):  # the check above must be able to see it
        failures.append("call_recorded: call-recording.js not found among the files it loaded")
    if recording_js:
        failures.append("call: call-recording.js loaded for a visit that is not recorded")
    return {
        "call_page_kb": call_kb,
        "accept_encoding": pages["call"]["accept_encoding"],
        "call_page_requests": pages["call"]["requests"],
        "call_recorded_kb": pages["call_recorded"]["kb"],
        "external_requests": external,
        "duplicate_requests": duplicates,
        "uncompressed_responses": uncompressed,
        "call_loads_recording_js": recording_js,
        "pages": {name: {k: p[k] for k in PAGE_FIGURES} for name, p in pages.items()},
        "targets": TARGETS,
        "failures": failures,
        "pass": not failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (server logs, data dir)")
    args = parser.parse_args()

    try:
        enter_private_netns()  # before any thread: the server and Chromium inherit the namespace
    except RuntimeError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")

    work = Path(tempfile.mkdtemp(prefix="consult-bench-pageweight-"))
    try:
        result = asyncio.run(bench(work))
    except BaseException:
        log(f"server logs: {work}")
        args.keep = True
        raise
    finally:
        if args.keep:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
