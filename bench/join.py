"""Benchmark: the join as the patient sees it, from opening the call link to the doctor's face.

Setup (once): a real Consult server process (`init` + `demo` in a temporary data dir) serving
HTTPS with a certificate from `consult certs`, and headless Debian Chromium, everything inside a
private network namespace that this script enters itself (bench/common.py; needs root). The
doctor signs in through the login page.

Each run seeds a fresh confirmed visit; the doctor opens its consult room (and waits there, as a
doctor at the start of a visit does); a fresh phone context (cold cache, no cookies) opens the
signed patient link over HTTPS. Both sides act as people would, with zero reaction time:
  - the patient taps "Join" as soon as the button can be tapped (shown and enabled: the page
    enables it once call.js listens), and nothing is sent before that tap;
  - the doctor clicks "Admit" in the room's UI as soon as it appears.
A watcher in each page reports the moment the control is usable (an exposed binding) and the
bench touches or clicks its middle through CDP (Input.dispatchTouchEvent / dispatchMouseEvent:
real input events, a user activation). Playwright's own click()/tap() waits retry an unusable
control after 20, 100, 100 and then every 500 ms, which put up to half a second of the
driver's into the "reaction".

In the patient's page, an init script records `performance.now()` (milliseconds since the
navigation started, i.e. since the link was opened) at:
  - `seen`: the first remote video frame presented (`requestVideoFrameCallback`) while the call
    screen shows. THE HEADLINE: `join_ms_*` are these, the patient's tap and the doctor's click
    included.
  - `tap`: the tap on "Join"; `pipeline` = seen - tap: what the product's media path adds after
    the tap (signaling, ICE, DTLS, first keyframe, decode).
  - `connected`, `decoded` (first getStats() with framesDecoded > 0), `stage`: cross-checks.
The breakdown of each run is printed on stderr, step by step on the patient's clock (STEPS):
navigation timing (HTML first byte, loaded), the last stylesheet and script loaded, first
paint, then the pages' own User Timing marks (`consult:<step>`, web/static/call-media.js
Consult.mark): socket opening (call-boot.js), call.js running, Join enabled, the welcome,
camera on, admitted, the offer, ICE connected; the doctor's page's marks (Admit shown, offer
made, the held offer sent, answer received) are put on the patient's clock through the two
pages' performance.timeOrigin. Between Join enabled and the tap: when the page hands the usable
button to the bench ("bench told") and when the bench's touch reaches the page ("touch starts"):
the difference is the driver's relay (binding -> Playwright's node driver -> Python -> CDP), not
the page. "admission/offer at the socket": when those messages reach the patient page's main
thread (a WebSocket listener added before the page's own), before the page's queue.
With --detail, each resource's timing too. The medians of every
step are in the JSON line (`breakdown_ms_median`) and printed as a table.

Warm-up runs (default 1) are not counted: the first run also pays for the server's template
compilation and Chromium's first media pipeline. The last line of stdout is one JSON object:
`join_ms_median`, `join_ms_p90` (link opened -> first remote frame drawn, tap included),
`pipeline_ms_median` (tap -> frame), `runs`, medians of the breakdown and the machine's load
averages before and after. Target: join median < 800 ms.

    .venv/bin/python bench/join.py                 # 10 runs
    .venv/bin/python bench/join.py --runs 20 --warmup 2 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BRIDGE_ADDR, ConsultServer, enter_private_netns, loadavg  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOCTOR = "dr.wang"
PASSWORD = "Bench-join-pass-2024"
WAIT_MS = 20_000

# The browsers of the browser tests (tests/harness/browser.py): a phone and a desktop.
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

# Patient page: milestones in performance.now() (ms since the navigation started).
PATIENT_PROBE_JS = """
(() => {
  const marks = (window.__joinMarks = {});
  const mark = (name) => { if (marks[name] === undefined) marks[name] = performance.now(); };
  document.addEventListener("click", (event) => {
    if (event.target.closest && event.target.closest("[data-action=join]")) mark("tap");
  }, true);
  // The bench's touch as the page gets it (the click follows the touch's end).
  document.addEventListener("touchstart", () => mark("touchstart"), { capture: true, passive: true });
  // When the socket's messages reach the page's main thread (before the page's own listeners,
  // which handle them in order, one at a time): the admission and the doctor's offer.
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = new Proxy(NativeWebSocket, {
    construct(target, args) {
      const ws = new target(...args);
      ws.addEventListener("message", (event) => {
        if (typeof event.data !== "string") return;
        if (event.data.includes('"type":"admitted"') || event.data.includes('"type": "admitted"')) {
          mark("admittedAtSocket");
        }
        if (event.data.includes('"offer"')) mark("offerAtSocket");
      });
      return ws;
    },
  });
  let hooked = null;
  let statsBusy = false;
  let lastStats = 0;
  const tick = () => {
    const video = document.querySelector("[data-remote-video]");
    if (video && video !== hooked && "requestVideoFrameCallback" in video) {
      hooked = video;
      const onFrame = (now, meta) => {
        mark("frame");
        if (marks.frameSize === undefined) marks.frameSize = meta.width + "x" + meta.height;
        const shown = document.querySelector("[data-screen=call]");
        if (shown && !shown.hidden) mark("seen");
        else video.requestVideoFrameCallback(onFrame);
      };
      video.requestVideoFrameCallback(onFrame);
    }
    const stage = document.querySelector("[data-screen=call]");
    if (stage && !stage.hidden) mark("stage");
    const pc = window.__consultPc;
    if (pc) {
      mark("pc");
      if (pc.connectionState === "connected") mark("connected");
      const now = performance.now();
      if (marks.decoded === undefined && !statsBusy && now - lastStats >= 20) {
        statsBusy = true;
        lastStats = now;
        pc.getStats().then((report) => {
          report.forEach((s) => {
            if (s.type === "inbound-rtp" && s.kind === "video" && s.framesDecoded > 0) mark("decoded");
          });
        }).catch(() => {}).finally(() => { statsBusy = false; });
      }
    }
    if (marks.seen === undefined || marks.decoded === undefined) setTimeout(tick, 4);
  };
  tick();
})();
"""


# Doctor's room: when the "Admit" button shows (epoch ms, as performance.timeOrigin + now()).
DOCTOR_PROBE_JS = """
(() => {
  const seen = () => {
    const b = document.querySelector("[data-testid=admit]");
    if (b && !b.hidden && window.__admitShown === undefined) {
      window.__admitShown = performance.timeOrigin + performance.now();
    }
  };
  const watch = { attributes: true, attributeFilter: ["hidden"], subtree: true, childList: true };
  new MutationObserver(seen).observe(document, watch);
})();
"""

# Both pages' own timings, read after the frame: navigation and resource timing, first paint,
# and the product's User Timing marks ("consult:<step>", web/static/call-media.js Consult.mark).
TIMINGS_JS = """
() => {
  const out = { origin: performance.timeOrigin, marks: {} };
  const nav = performance.getEntriesByType("navigation")[0];
  if (nav) {
    for (const k of ["connectEnd", "requestStart", "responseStart", "responseEnd", "domInteractive",
                     "domContentLoadedEventEnd"]) out[k] = nav[k];
  }
  for (const p of performance.getEntriesByType("paint")) out[p.name] = p.startTime;
  let css = 0, js = 0;
  for (const r of performance.getEntriesByType("resource")) {
    if (r.name.includes(".css")) css = Math.max(css, r.responseEnd);
    if (r.name.includes(".js")) js = Math.max(js, r.responseEnd);
  }
  out.cssLoaded = css;
  const round = (v) => (typeof v === "number" ? Math.round(v) : v);
  out.resources = performance.getEntriesByType("resource").map((r) =>
    [r.name.split("/").pop().split("?")[0], r.startTime, r.connectStart, r.secureConnectionStart,
     r.connectEnd, r.requestStart, r.responseStart, r.responseEnd, r.nextHopProtocol].map(round));
  out.jsLoaded = js;
  for (const m of performance.getEntriesByType("mark")) {
    const step = m.name.slice(8);
    if (m.name.startsWith("consult:") && out.marks[step] === undefined) out.marks[step] = m.startTime;
  }
  return out;
}
"""

# The breakdown, in the order a join goes (patient's clock: ms since the link was opened).
# "dr:" steps happen on the doctor's page, put on the patient's clock.
STEPS = (
    ("responseStart", "HTML first byte"),
    ("responseEnd", "HTML loaded"),
    ("domInteractive", "HTML parsed"),
    ("cssLoaded", "CSS loaded"),
    ("first-contentful-paint", "first paint"),
    ("jsLoaded", "scripts loaded"),
    ("start", "call.js runs"),
    ("join-ready", "Join enabled"),
    ("socket", "socket opening"),
    ("domContentLoadedEventEnd", "DOMContentLoaded"),
    ("react", "bench told: Join usable"),
    ("touchstart", "touch starts"),
    ("tap", "tap"),
    ("welcome", "socket welcomed"),
    ("dr:admitShown", "dr: Admit shows"),
    ("admitClick", "dr: Admit clicked"),
    ("media", "camera on"),
    ("admittedAtSocket", "admission at the socket"),
    ("admitted", "admitted"),
    ("dr:offer sent", "dr: offer made"),
    ("dr:held offer released", "dr: held offer sent"),
    ("offerAtSocket", "offer at the socket"),
    ("offer received", "offer received"),
    ("ice connected", "ICE connected"),
    ("dr:answer received", "dr: answer received"),
    ("connected", "pc connected"),
    ("decoded", "first frame decoded"),
    ("seen", "first frame drawn"),
)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def prepare_server(server: Any) -> int:
    server.cli("user", "passwd", DOCTOR, "--password", PASSWORD)
    conn = sqlite3.connect(server.data_dir / "consult.db")
    try:
        return conn.execute("SELECT id FROM users WHERE username = ?", [DOCTOR]).fetchone()[0]
    finally:
        conn.close()


def seed_visit(db_path: Path, doctor_id: int, starts_in_s: float, minutes: int = 15) -> dict[str, Any]:
    """A confirmed visit of `doctor_id` with the first patient, written with sqlite3 (as the
    browser tests seed theirs). Safe while the server runs (WAL, one short write)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        patient = conn.execute("SELECT id FROM users WHERE role = 'patient' ORDER BY id LIMIT 1").fetchone()
        row = conn.execute(
            "SELECT department_id FROM doctor_departments WHERE doctor_id = ? LIMIT 1", [doctor_id]
        ).fetchone()
        department_id = row[0] if row else conn.execute("SELECT id FROM departments LIMIT 1").fetchone()[0]
        now = time.time()
        starts = int(now + starts_in_s)
        ends = starts + minutes * 60
        public_id, nonce = secrets.token_urlsafe(12), secrets.token_urlsafe(8)
        row = [public_id, patient[0], doctor_id, department_id, starts, ends, "confirmed", 5000, "CNY"]
        conn.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " fee_minor, currency, created, updated, call_nonce) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [*row, now, now, nonce],
        )
        return {"public_id": public_id, "nonce": nonce, "starts_at": starts, "ends_at": ends}
    finally:
        conn.close()


def new_visit(server: Any, doctor_id: int) -> tuple[str, str]:
    """A confirmed visit starting now: (patient link, consult room URL)."""
    from consult.calls import links as calllinks
    from consult.core.config import ensure_secrets, load_settings

    # One visit per doctor and start second (UNIQUE): runs can come faster than that.
    for back in range(60, 120):
        try:
            visit = seed_visit(server.data_dir / "consult.db", doctor_id, starts_in_s=-back)
            break
        except sqlite3.IntegrityError:
            continue
    else:
        raise RuntimeError("no free start second for a new visit")
    # Signed with the keys the server signs with: its data dir's secrets.json.
    settings = ensure_secrets(load_settings(env={}, data_dir=server.data_dir, tls=False))
    token = calllinks.make_token(
        settings, visit["public_id"], "patient", visit["nonce"], visit["starts_at"], visit["ends_at"]
    )
    return server.url(f"/call/{token}"), server.url(f"/doctor/visits/{visit['public_id']}/room")


async def launch_chromium(playwright: Any, secure_origins: list[str]) -> Any:
    """Debian's Chromium, headless, with fake media devices and no way to the outside."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("`chromium` is not installed: `apt-get install chromium`")
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
        "--unsafely-treat-insecure-origin-as-secure=" + ",".join(o.rstrip("/") for o in secure_origins),
    ]
    return await playwright.chromium.launch(executable_path=chromium, headless=True, args=args)


async def sign_in_doctor(page: Any, origin: str) -> None:
    await page.goto(origin + "/login")
    form = page.locator("main form[action='/login']")
    await form.locator("input[name=identifier]").fill(DOCTOR)
    await form.locator("input[name=password]").fill(PASSWORD)
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(origin + "/doctor", timeout=WAIT_MS)


# Zero reaction time. The page itself watches for the control (every change of an element's
# `disabled` or `hidden`, and every 50 ms) and, the moment it can be used, tells the bench
# where it is (an exposed binding); the bench then touches or clicks that point through CDP:
# one round trip. (Playwright's click() and tap() retry a control that is not usable yet after
# 20, 100, 100, then every 500 ms, and take several more round trips for their checks: a
# reaction time that is the driver's.)
REACT_JS = """
(([selector, binding]) => {
  // Cheap until the control may be usable (no layout forced while the page is parsed): the
  // observer sees `disabled` and `hidden` change; the slow poll covers the rest.
  let done = false;
  const check = () => {
    if (done) return;
    const b = document.querySelector(selector);
    if (b && !b.disabled && !b.hidden && b.getClientRects().length > 0) {
      b.scrollIntoView({ block: "center" });
      const r = b.getBoundingClientRect();
      done = true;
      window.__benchReactAt = performance.now(); // the page hands the control to the bench
      window[binding](r.left + r.width / 2, r.top + r.height / 2);
    }
  };
  const watch = { attributes: true, attributeFilter: ["disabled", "hidden"], childList: true, subtree: true };
  new MutationObserver(check).observe(document, watch);
  const poll = () => { check(); if (!done) setTimeout(poll, 50); };
  poll();
})(%s);
"""


class Reactor:
    """A person with zero reaction time on one page: touches (a phone) or clicks the control
    with `testid` the moment it becomes usable, in every document the page loads; `arm()`
    gives a future of when (monotonic seconds) for the next one."""

    def __init__(self, testid: str, touch: bool) -> None:
        self.testid, self.touch = testid, touch
        self.pending: asyncio.Future | None = None

    async def attach(self, page: Any) -> Reactor:
        self.cdp = await page.context.new_cdp_session(page)
        binding = "__benchReact_" + self.testid
        await page.expose_binding(binding, self._act)
        await page.add_init_script(REACT_JS % json.dumps([f"[data-testid={self.testid}]", binding]))
        return self

    def arm(self) -> asyncio.Future:
        self.pending = asyncio.get_running_loop().create_future()
        return self.pending

    async def _act(self, _source: Any, x: float, y: float) -> None:
        done = self.pending
        if done is None or done.done():
            return
        if self.touch:
            point = [{"x": x, "y": y}]
            await self.cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": point})
            await self.cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        else:
            for kind in ("mousePressed", "mouseReleased"):
                await self.cdp.send(
                    "Input.dispatchMouseEvent",
                    {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                )
        done.set_result(time.monotonic())


async def one_run(
    browser: Any,
    doctor: Any,
    admitter: Reactor,
    server: Any,
    doctor_id: int,
    timeout_s: float,
    detail: bool = False,
) -> dict:
    patient_url, room_url = await asyncio.to_thread(new_visit, server, doctor_id)
    await doctor.goto(room_url)
    # The doctor is in the room (signaling open, nobody there yet).
    await doctor.locator("[data-testid=call-status][data-state=waiting_patient]").wait_for(timeout=WAIT_MS)

    context = await browser.new_context(
        permissions=MEDIA_PERMISSIONS, ignore_https_errors=True, **PATIENT_CONTEXT
    )
    admitting = admitter.arm()
    try:
        context.set_default_timeout(WAIT_MS)
        await context.add_init_script(PATIENT_PROBE_JS)
        page = await context.new_page()
        tapped = (await Reactor("join", touch=True).attach(page)).arm()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        wall0 = time.monotonic()
        await page.goto(patient_url, wait_until="commit")
        # A real touch the moment the button can take it (it also unlocks audio playback).
        await asyncio.wait_for(asyncio.shield(tapped), WAIT_MS / 1000)
        await page.wait_for_function(
            "() => ['seen', 'decoded'].every((k) => window.__joinMarks[k] !== undefined)",
            polling=10,
            timeout=timeout_s * 1000,
        )
        wall_ms = (time.monotonic() - wall0) * 1000
        marks = await page.evaluate("({...window.__joinMarks, react: window.__benchReactAt})")
        admitted = await asyncio.wait_for(asyncio.shield(admitting), WAIT_MS / 1000)
        timings = await page.evaluate(TIMINGS_JS)
        origin = timings.pop("origin")
        resources = timings.pop("resources")
        if detail:
            log("  resource: start, connect, tls, connected, request, first byte, end")
            for r in resources:
                log("   ", *r)
        marks.update({k: v for k, v in timings.pop("marks").items() if k not in marks})
        marks.update({k: v for k, v in timings.items() if isinstance(v, int | float) and v > 0})
        dr = await doctor.evaluate(TIMINGS_JS)
        for k, v in dr["marks"].items():
            marks["dr:" + k] = dr["origin"] + v - origin
        shown = await doctor.evaluate("window.__admitShown")
        if isinstance(shown, int | float):
            marks["dr:admitShown"] = shown - origin
        if errors:
            log("patient page errors:", errors)
        marks["wall"] = wall_ms
        marks["admitClick"] = (admitted - wall0) * 1000
        marks["pipeline"] = marks["seen"] - marks["tap"] if "tap" in marks else None
        return marks
    finally:
        if not admitting.done():
            admitting.cancel()
        await context.close()


async def bench(args: argparse.Namespace, work: Path) -> dict:
    from playwright.async_api import async_playwright

    server = ConsultServer(work / "data", log_dir=work, tls=(work / "dev-cert.pem", work / "dev-key.pem"))
    await asyncio.to_thread(server.init, demo=True)
    await asyncio.to_thread(server.cli, "certs", "--dir", str(work))
    await server.astart()
    try:
        doctor_id = await asyncio.to_thread(prepare_server, server)
        async with async_playwright() as pw:
            browser = await launch_chromium(pw, [server.origin])
            try:
                doctor_context = await browser.new_context(
                    permissions=MEDIA_PERMISSIONS, ignore_https_errors=True, **DOCTOR_CONTEXT
                )
                doctor_context.set_default_timeout(WAIT_MS)
                await doctor_context.add_init_script(DOCTOR_PROBE_JS)
                doctor = await doctor_context.new_page()
                admitter = await Reactor("admit", touch=False).attach(doctor)
                await sign_in_doctor(doctor, server.origin)
                results: list[dict] = []
                for i in range(args.warmup + args.runs):
                    marks = await one_run(
                        browser, doctor, admitter, server, doctor_id, args.timeout, args.detail
                    )
                    counted = i >= args.warmup
                    if counted:
                        results.append(marks)
                    log(
                        f"{'run' if counted else 'warm-up'} {i + 1 - (args.warmup if counted else 0)}: "
                        + ", ".join(
                            f"{label} {marks[k]:.0f}"
                            for k, label in (*STEPS, ("pipeline", "pipeline"), ("wall", "wall"))
                            if isinstance(marks.get(k), int | float)
                        )
                        + f" ms ({marks.get('frameSize')}), load {loadavg()[0]}"
                    )
            finally:
                await browser.close()
    finally:
        server.stop()

    seen = [r["seen"] for r in results]
    pipeline = [r["pipeline"] for r in results if isinstance(r.get("pipeline"), int | float)]
    out: dict[str, Any] = {
        "join_ms_median": round(statistics.median(seen), 1),
        "join_ms_p90": round(percentile(seen, 90), 1),
        "join_ms_min": round(min(seen), 1),
        "join_ms_max": round(max(seen), 1),
        "pipeline_ms_median": round(statistics.median(pipeline), 1) if pipeline else None,
        "runs": len(results),
    }
    # The breakdown's medians, in the order of a join (also printed as a table on stderr).
    breakdown: dict[str, float] = {}
    for key, label in STEPS:
        values = [r[key] for r in results if isinstance(r.get(key), int | float)]
        if values:
            breakdown[key] = round(statistics.median(values), 1)
            log(f"  {label:<22} {breakdown[key]:8.0f} ms  (median of {len(values)})")
    out["breakdown_ms_median"] = breakdown
    for key in ("tap", "admitClick", "connected", "decoded", "stage", "wall"):
        values = [r[key] for r in results if isinstance(r.get(key), int | float)]
        if values:
            out[f"{key}_ms_median"] = round(statistics.median(values), 1)
    out["target_ms"] = 800
    out["meets_target"] = out["join_ms_median"] < 800
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="measured runs (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds one run may take to its first frame (default 30)"
    )
    parser.add_argument("--detail", action="store_true", help="print each run's resource timings")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (server logs, data dir)")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")

    try:
        enter_private_netns()  # before any thread: the server and Chromium inherit the namespace
    except RuntimeError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")

    load_before = loadavg()
    work = Path(tempfile.mkdtemp(prefix="consult-bench-join-"))
    try:
        result = asyncio.run(bench(args, work))
        result.update(load_before=load_before, load_after=loadavg())
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
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
