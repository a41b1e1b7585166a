"""Self-tests of tests/harness: processes, Chromium + fake camera + WebRTC, coturn, artifacts."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page

from tests.harness.browser import (
    PageRecorder,
    assert_only_local_requests,
    foreign_requests,
    save_page_artifacts,
)
from tests.harness.server import (
    BRIDGE_ADDR,
    REPO_ROOT,
    ConsultServer,
    ServerProcess,
    ServerStartError,
    free_port,
)
from tests.harness.turn import TurnServer, stun_binding_ok, turn_rest_credentials

pytestmark = pytest.mark.netns  # real WebRTC media, coturn or the server on the bridge


# The harness fixtures and makereport hook come from tests/conftest.py
# (`from tests.harness.fixtures import *`).

TEST_TIMEOUT = 60

LOOPBACK_PAGE = """<!doctype html>
<meta charset="utf-8"><title>loopback</title>
<script>
// Two RTCPeerConnections in one page: a sends the fake camera + microphone to b.
async function startLoopback(config) {
  const stream = await navigator.mediaDevices.getUserMedia({video: true, audio: true});
  const a = new RTCPeerConnection(config), b = new RTCPeerConnection(config);
  a.onicecandidate = e => { if (e.candidate) b.addIceCandidate(e.candidate); };
  b.onicecandidate = e => { if (e.candidate) a.addIceCandidate(e.candidate); };
  for (const t of stream.getTracks()) a.addTrack(t, stream);
  await a.setLocalDescription();
  await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription();
  await a.setRemoteDescription(b.localDescription);
  window.pcs = {a, b};
  return stream.getTracks().map(t => t.kind + ":" + t.label);
}
async function loopbackStats() {
  const {b} = window.pcs;
  const stats = await b.getStats();
  const out = {state: b.connectionState, framesDecoded: 0};
  let pairId = null;
  stats.forEach(s => {
    if (s.type === "inbound-rtp" && s.kind === "video") out.framesDecoded = s.framesDecoded || 0;
    if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
  });
  const pair = pairId && stats.get(pairId);
  if (pair) {
    const local = stats.get(pair.localCandidateId), remote = stats.get(pair.remoteCandidateId);
    out.local = {type: local.candidateType, address: local.address, protocol: local.protocol};
    out.remote = {type: remote.candidateType, address: remote.address};
  }
  return out;
}
</script>
<p>loopback</p>
"""

FOREIGN_PAGE = """<!doctype html>
<meta charset="utf-8"><title>foreign</title>
<img src="/local.png"><img src="http://example.com/tracker.png">
<script>console.log("foreign page loaded")</script>
"""


def write_site(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text(
        '<!doctype html><meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>ok</title><p>ok</p>"
    )
    (root / "loopback.html").write_text(LOOPBACK_PAGE)
    (root / "foreign.html").write_text(FOREIGN_PAGE)
    return root


def http_server(site: Path, port: int, log_dir: Path, **kwargs) -> ServerProcess:
    argv = [sys.executable, "-m", "http.server", "--bind", BRIDGE_ADDR, "--directory", site]
    return ServerProcess(
        [*argv, str(port)],
        health_url=f"http://{BRIDGE_ADDR}:{port}/index.html",
        log_dir=log_dir,
        name="standin",
        **kwargs,
    )


@pytest.fixture
async def standin(tmp_path: Path, server_port: int) -> AsyncIterator[ServerProcess]:
    """A stand-in for the Consult server on `server_port` (= `app_origin`)."""
    server = http_server(write_site(tmp_path / "site"), server_port, tmp_path)
    await server.astart()
    yield server
    await server.astop()


async def wait_for_media(page: Page, seconds: float = 30.0) -> dict:
    """Poll loopbackStats() until video frames decode; fail with the last stats otherwise."""
    stats: dict = {}
    try:
        async with asyncio.timeout(seconds):
            while True:
                stats = await page.evaluate("loopbackStats()")
                if stats["framesDecoded"] > 0 and stats.get("local"):
                    return stats
                await asyncio.sleep(0.25)
    except TimeoutError:
        pytest.fail(f"no decoded frames within {seconds} s; last stats: {json.dumps(stats)}")


# -- ServerProcess, generic part (no browser) -----------------------------------------------


async def test_server_process_start_restart_kill9(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site")
    port = free_port()
    server = http_server(site, port, tmp_path)
    try:
        await server.astart()
        assert server.running
        first_pid = server.pid
        await server.arestart()
        assert server.running and server.pid != first_pid
        assert await server.akill9() == -signal.SIGKILL
        assert not server.running
        await server.astart()  # the port is immediately reusable after a crash
        assert server.running
        assert server.starts == 3
    finally:
        code = await server.astop()
    assert code == -signal.SIGTERM
    log = server.stderr_path.read_text()
    assert log.count("=== start #") == 3 and "GET /index.html" in log


def test_server_process_death_reports_stderr(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('to stderr: boom', file=sys.stderr); sys.exit(3)"]
    server = ServerProcess(argv, health_url=f"http://{BRIDGE_ADDR}:9/", log_dir=tmp_path)
    with pytest.raises(ServerStartError, match=r"(?s)status 3.*to stderr: boom"):
        server.start()
    assert not server.running


def test_server_process_unhealthy_times_out_and_is_stopped(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site")
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "http.server", "--bind", BRIDGE_ADDR, "--directory", site, port],
        health_url=f"http://{BRIDGE_ADDR}:{port}/healthz",  # 404 from http.server
        log_dir=tmp_path,
        startup_timeout=1.5,
    )
    with pytest.raises(ServerStartError, match="last answer: 404"):
        server.start()
    assert not server.running and server.returncode is not None


FAKE_CONSULT = """
import argparse, http.server, json, os, pathlib, sys
p = argparse.ArgumentParser(prog="consult")
p.add_argument("--data-dir", required=True)
sub = p.add_subparsers(dest="cmd", required=True)
sub.add_parser("init"); sub.add_parser("demo")
s = sub.add_parser("serve"); s.add_argument("--host"); s.add_argument("--port", type=int)
s.add_argument("--no-tls", action="store_true")
a = p.parse_args()
data = pathlib.Path(a.data_dir)
if a.cmd in ("init", "demo"):
    data.mkdir(exist_ok=True); (data / a.cmd).write_text("done"); sys.exit(0)
assert a.no_tls and (data / "init").exists()
env = {k: v for k, v in os.environ.items() if k.startswith("CONSULT_")}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "env": env}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
http.server.HTTPServer((a.host, a.port), H).serve_forever()
"""


def test_consult_server_contract_with_fake_cli(tmp_path: Path) -> None:
    """ConsultServer drives `python -m consult --data-dir D init|demo|serve ...` as specified."""
    fake = tmp_path / "fake"
    (fake / "consult").mkdir(parents=True)
    (fake / "consult" / "__init__.py").write_text("")
    (fake / "consult" / "__main__.py").write_text(FAKE_CONSULT)
    server = ConsultServer(tmp_path / "data", log_dir=tmp_path, env={"CONSULT_VISIT_MINUTES": "1"}, cwd=fake)
    assert server.argv[1:] == [
        "-m", "consult", "--data-dir", str(tmp_path / "data"),
        "serve", "--host", BRIDGE_ADDR, "--port", str(server.port), "--no-tls",
    ]  # fmt: skip
    server.init(demo=True)
    assert (tmp_path / "data" / "demo").exists()
    with server:
        import urllib.request

        with urllib.request.urlopen(server.url("/healthz"), timeout=5) as resp:  # noqa: S310
            answer = json.load(resp)
    assert answer["path"] == "/healthz"
    assert answer["env"]["CONSULT_VISIT_MINUTES"] == "1"
    assert not server.running
    with pytest.raises(ServerStartError, match="consult bogus"):
        server.cli("bogus")


# -- Chromium --------------------------------------------------------------------------------


async def test_chromium_fake_camera_loopback_call(
    standin: ServerProcess, app_origin: str, doctor_page: Page, pages: PageRecorder
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        await doctor_page.goto(f"{app_origin}/loopback.html")
        assert await doctor_page.evaluate("window.isSecureContext")
        tracks = await doctor_page.evaluate("startLoopback({iceServers: []})")
        assert any(t.startswith("video:") for t in tracks), tracks
        stats = await wait_for_media(doctor_page)
        assert stats["local"]["type"] == "host", stats
        assert stats["local"]["address"] == BRIDGE_ADDR, stats
        await doctor_page.wait_for_function("window.pcs.b.connectionState === 'connected'")
    assert_only_local_requests(pages.log(doctor_page), app_origin)


async def test_patient_context_is_a_phone(
    standin: ServerProcess, app_origin: str, patient_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        await patient_page.goto(f"{app_origin}/index.html")
        info = await patient_page.evaluate(
            "({w: innerWidth, h: innerHeight, dpr: devicePixelRatio, ua: navigator.userAgent,"
            " touch: navigator.maxTouchPoints > 0, secure: isSecureContext})"
        )
    assert (info["w"], info["h"], info["dpr"]) == (390, 844, 3)
    assert "Mobile" in info["ua"] and info["touch"] and info["secure"]


# -- coturn ----------------------------------------------------------------------------------


def test_turn_rest_credentials() -> None:
    import base64
    import hashlib
    import hmac

    user, password = turn_rest_credentials("s3cret", "alice", ttl=60)
    expiry, name = user.split(":")
    assert name == "alice" and int(expiry) > 0
    expected = base64.b64encode(hmac.new(b"s3cret", user.encode(), hashlib.sha1).digest())
    assert password == expected.decode()


async def test_coturn_relay_only_loopback_call(
    coturn: TurnServer, standin: ServerProcess, app_origin: str, doctor_page: Page
) -> None:
    assert coturn.url == f"turn:{BRIDGE_ADDR}:{coturn.port}?transport=udp"
    assert stun_binding_ok(coturn.host, coturn.port)
    config = {"iceServers": [coturn.ice_server("doctor")], "iceTransportPolicy": "relay"}
    async with asyncio.timeout(TEST_TIMEOUT):
        await doctor_page.goto(f"{app_origin}/loopback.html")
        await doctor_page.evaluate("config => startLoopback(config)", config)
        stats = await wait_for_media(doctor_page)
    assert stats["state"] == "connected", stats
    assert stats["local"]["type"] == "relay" and stats["remote"]["type"] == "relay", stats
    # (coturn's stdout is block-buffered into the file: session lines may not be there yet)
    assert coturn.secret not in coturn.log_path.read_text()


async def test_coturn_rejects_bad_credentials(
    coturn: TurnServer, standin: ServerProcess, app_origin: str, doctor_page: Page
) -> None:
    bad = {**coturn.ice_server("mallory"), "credential": "d3JvbmcK"}
    config = {"iceServers": [bad], "iceTransportPolicy": "relay"}
    async with asyncio.timeout(TEST_TIMEOUT):
        await doctor_page.goto(f"{app_origin}/loopback.html")
        await doctor_page.evaluate("config => startLoopback(config)", config)
        await asyncio.sleep(3)
        stats = await doctor_page.evaluate("loopbackStats()")
    assert stats["framesDecoded"] == 0 and stats["state"] != "connected", stats


# -- failure artifacts -----------------------------------------------------------------------


async def test_save_page_artifacts_writes_screenshot_and_console(
    tmp_path: Path, doctor_context, pages: PageRecorder
) -> None:
    page = await pages.new_page(doctor_context, "doctor")
    await page.set_content("<h1>artifact</h1><script>console.warn('hello artifact')</script>")
    await page.evaluate("console.error('second line')")
    written = await save_page_artifacts(tmp_path / "art", pages.logs)
    names = sorted(p.name for p in written)
    assert names == ["doctor.console.log", "doctor.png"]
    png = (tmp_path / "art" / "doctor.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    console = (tmp_path / "art" / "doctor.console.log").read_text()
    assert "[warning] hello artifact" in console and "[error] second line" in console


INNER_TESTS = """
async def test_fails(patient_page, doctor_page):
    await patient_page.set_content("<p>patient</p><script>console.log('inner-patient')</script>")
    await doctor_page.set_content("<p>doctor</p><script>console.log('inner-doctor')</script>")
    assert 1 == 2

async def test_passes(doctor_page):
    await doctor_page.set_content("<p>fine</p>")
"""


def test_failure_hook_saves_artifacts_end_to_end(tmp_path: Path) -> None:
    """A real inner pytest run with the harness plugin: the failing test leaves artifacts."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    artifacts = tmp_path / "artifacts"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "tests.harness.fixtures"]
    argv += ["-p", "no:cacheprovider", "-o", "asyncio_mode=auto", "-W", "error"]
    argv += ["-o", "asyncio_default_fixture_loop_scope=function", "test_inner.py"]
    env = {
        "PYTHONPATH": str(REPO_ROOT),
        "CONSULT_TEST_ARTIFACTS": str(artifacts),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    dirs = sorted(p.name for p in artifacts.iterdir())
    assert dirs == ["test_inner.py__test_fails"], (dirs, out)
    files = sorted(p.name for p in (artifacts / dirs[0]).iterdir())
    assert files == ["doctor.console.log", "doctor.png", "patient.console.log", "patient.png"]
    assert "inner-patient" in (artifacts / dirs[0] / "patient.console.log").read_text()


# -- request log -----------------------------------------------------------------------------


async def test_request_log_catches_foreign_origin(
    standin: ServerProcess, app_origin: str, patient_page: Page, pages: PageRecorder
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        await patient_page.goto(f"{app_origin}/foreign.html", wait_until="load")
    log = pages.log(patient_page)
    assert f"{app_origin}/foreign.html" in log.requests
    assert "http://example.com/tracker.png" in log.requests
    assert any("example.com" in f for f in log.failed_requests), log.failed_requests
    assert any(m.startswith("[log] foreign page loaded") for m in log.console), log.console
    with pytest.raises(AssertionError, match=r"example\.com/tracker\.png"):
        assert_only_local_requests(log, app_origin)
    assert_only_local_requests(log, [app_origin, "http://example.com"])


def test_foreign_requests_rules() -> None:
    origin = "http://10.99.0.1:8080"
    ok = [
        "http://10.99.0.1:8080/a",
        "ws://10.99.0.1:8080/ws",
        "blob:http://10.99.0.1:8080/uuid",
        "data:image/png;base64,AAAA",
        "about:blank",
    ]
    bad = [
        "http://10.99.0.1:8081/a",
        "https://10.99.0.1:8080/a",
        "wss://example.org/ws",
        "http://127.0.0.1:8080/",
        "chrome-extension://abc/x.js",
    ]
    assert foreign_requests(ok + bad, origin + "/") == bad


# -- the real Consult server -----------------------------------------------------------------


async def test_real_consult_server_in_the_browser(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, pages: PageRecorder
) -> None:
    """`consult init` + `demo` + `serve --no-tls` on the bridge; the phone loads the home page."""
    assert consult_server.origin == app_origin
    async with asyncio.timeout(TEST_TIMEOUT):
        resp = await patient_page.goto(app_origin + "/")
        assert resp is not None and resp.ok
        await patient_page.wait_for_load_state("load")
        assert await patient_page.evaluate("isSecureContext")
        await consult_server.arestart()
        resp = await patient_page.reload()
        assert resp is not None and resp.ok
        assert await consult_server.akill9() == -9
        await consult_server.astart()  # after a crash: same data dir, same port
        resp = await patient_page.reload()
        assert resp is not None and resp.ok
    assert_only_local_requests(pages, app_origin)
    assert not pages.log(patient_page).errors
