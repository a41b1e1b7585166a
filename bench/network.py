"""Benchmark: calls under real network conditions (issue 14), real pages, real server.

One command runs the condition matrix, each on a fresh visit with a patient (phone context) and
a doctor in headless Debian Chromium with fake media, inside a private network namespace this
script enters itself (bench/common.py; needs root). Everything runs on one host, so media goes
through `lo` and each impairment picks the phone's packets by port (this kernel has no
sch_netem): rate caps are htb + tbf on `lo`, cuts are iptables rules, socket resets `ss -K`,
and loss with delay comes from a small userspace UDP link emulator put in front of coturn
(relay-only calls, so all media crosses it; each packet crosses it twice per direction).

Conditions and what each figure measures:

  clean          `join_ms_median_clean`: median over --joins runs of the time from opening
                 the patient link (navigation start) to the first video frame decoded on the
                 patient's page (getStats framesDecoded > 0, polled every 20 ms); the doctor
                 waits in the room and admits at once, the patient taps Join as soon as it can.
  loss5          `audio_concealment_pct_loss5`: relay-only call with the link emulator set to
                 5 % loss per direction and 200 ms round trip; over --window seconds, the
                 percentage of audio samples the receivers had to conceal (inbound-rtp
                 concealedSamples / totalSamplesReceived, both pages together). Target < 5.
  uplink300/150  `uplink_300_level` / `uplink_150_level`: the quality level both pages show
                 (data-level of the badge) after --window seconds with the phone's UDP uplink
                 capped at 300 / 150 kbit/s; plus whether audio only was offered at 150.
  relay2         `relay_only_connected`: a relay-only call through coturn with 2 % loss per
                 direction decodes video on both pages (true/false).
  udp_drop       `udp_drop_recovery_s`: every UDP port of the phone is dropped; seconds from
                 the cut until the patient's page decodes video again: the first of 3 frames
                 decoded after decoding had stopped for 0.7 s (frames still in the pipeline
                 at the cut do not count; getStats polled every 50 ms). Target < 3.
  switch         `switch_recovery_s`: as udp_drop, and the phone's signaling socket is made
                 silently dead (its TCP packets dropped both ways, no reset); seconds until
                 video is back (as above) on both pages, the later of the two. Target < 5.
  outage         `signaling_outage_media_gap_s`: every signaling socket is reset and new ones
                 are refused for 20 s; the longest stretch, on either page, without a newly
                 decoded video frame during those 20 s (polled every 100 ms). Target < 1.

  firefox        `firefox_chromium_connected`: the two-engine calls of the test suite, run as
                 they are (`pytest tests/test_browser_firefox.py` in a subprocess, its own
                 namespace): a patient on Firefox ESR calls a doctor on Chromium and the
                 reverse, through the real pages; true when both calls negotiated a codec,
                 decoded video both ways, carried mute and ended on time.
stderr has each condition's details; the load average is printed before and after; the last
line of stdout is one JSON object with the figures above.

    .venv/bin/python bench/network.py                 # all conditions
    .venv/bin/python bench/network.py --only clean,udp_drop --joins 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (  # bench/ is on sys.path
    BRIDGE_ADDR,
    ROOT,
    ConsultServer,
    enter_private_netns,
    free_port,
    loadavg,
)
from join import (
    DOCTOR_CONTEXT,
    MEDIA_PERMISSIONS,
    PATIENT_CONTEXT,
    launch_chromium,
    log,
    new_visit,
    prepare_server,
    sign_in_doctor,
)

WAIT_MS = 30_000
STALL_S = 0.7  # no new frame for this long: the cut has reached the decoder
BACK_FRAMES = 3  # video is back once this many frames are decoded after the stall
# The doctor's page admits the patient the moment the button shows: these conditions measure the
# network, not a person's reaction (bench/join.py measures the join with the click in the UI).
AUTO_ADMIT_JS = """
(() => {
  const tick = () => {
    const button = document.querySelector("[data-action=admit]");
    if (button && !button.hidden) button.click();
    setTimeout(tick, 5);
  };
  tick();
})();
"""

CONDITIONS = ("clean", "loss5", "uplink300", "uplink150", "relay2", "udp_drop", "switch", "outage", "firefox")

STATS_JS = """
async () => {
  const pc = window.__consultPc;
  if (!pc) return null;
  const out = {frames: 0, concealed: 0, samples: 0, state: pc.connectionState, udp: [], audioCodec: null};
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "audio" && s.codecId && report.get(s.codecId)) {
      const c = report.get(s.codecId);
      out.audioCodec = c.mimeType + (c.sdpFmtpLine ? " " + c.sdpFmtpLine : "");
    }
    // What the answer put first on the audio line (RED when both sides prefer it).
    const sdp = (pc.remoteDescription && pc.remoteDescription.sdp) || "";
    const m = sdp.match(/m=audio \\S+ \\S+ (\\d+)/);
    const map = m && sdp.match(new RegExp("a=rtpmap:" + m[1] + " ([^\\r\\n]+)"));
    out.audioFirst = map ? map[1] : null;
    if (s.type === "inbound-rtp" && s.kind === "video") out.frames += s.framesDecoded || 0;
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      out.concealed += s.concealedSamples || 0;
      out.samples += s.totalSamplesReceived || 0;
    }
    if (s.type === "local-candidate" && s.protocol === "udp") out.udp.push(s.port);
  });
  return out;
}
"""
FIRST_FRAME_JS = """
(() => {
  const poll = () => {
    const pc = window.__consultPc;
    if (pc) pc.getStats().then((r) => r.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video" && s.framesDecoded > 0 && !window.__firstFrame)
        window.__firstFrame = performance.now();
    })).catch(() => {});
    if (!window.__firstFrame) setTimeout(poll, 20);
  };
  poll();
})();
"""


def sh(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True)


# -- impairments (the same as tests/harness/impair.py, in the form a benchmark needs) -----------


def iptables(action: str, rules: list[list[str]]) -> None:
    for rule in rules:
        sh("iptables", "-w", action, *rule, check=action == "-I")


def udp_drop_rules(ports: list[int]) -> list[list[str]]:
    return [
        r
        for p in ports
        for r in (
            ["INPUT", "-p", "udp", "--dport", str(p), "-j", "DROP"],
            ["OUTPUT", "-p", "udp", "--sport", str(p), "-j", "DROP"],
        )
    ]


def tcp_blackhole_rules(local_port: int) -> list[list[str]]:
    return [
        ["INPUT", "-p", "tcp", "--dport", str(local_port), "-j", "DROP"],
        ["OUTPUT", "-p", "tcp", "--sport", str(local_port), "-j", "DROP"],
    ]


def client_tcp_ports(server_port: int) -> set[int]:
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{server_port} )"], capture_output=True, text=True
    ).stdout
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if len(line.split()) >= 4}


def cap_uplink(ports: list[int], kbit: int) -> None:
    sh("tc", "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb", "default", "20", "r2q", "1000")
    sh("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", f"{kbit}kbit")
    sh("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit")
    sh("tc", "qdisc", "add", "dev", "lo", "parent", "1:10", "tbf", "rate", f"{kbit}kbit", "burst", "4kb",
       "latency", "200ms")  # fmt: skip
    for i, port in enumerate(ports):
        sh("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", str(i + 1), "u32",
           "match", "ip", "protocol", "17", "0xff", "match", "ip", "sport", str(port), "0xffff",
           "flowid", "1:10")  # fmt: skip


def uncap() -> None:
    sh("tc", "qdisc", "del", "dev", "lo", "root", check=False)


class LinkEmulator:
    """A UDP forwarder in front of coturn: each client address gets its own upstream socket;
    every packet, both ways, is dropped with probability `loss` or else delivered after
    `delay_s`. Set the figures per pass (a relayed packet passes twice per direction)."""

    def __init__(self, host: str, upstream: tuple[str, int]) -> None:
        self.host = host
        self.upstream = upstream
        self.loss = 0.0
        self.delay_s = 0.0
        self.port = 0
        self._front: asyncio.DatagramTransport | None = None
        self._clients: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._waiting: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        emulator = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                emulator._from_client(data, addr)

        self._front, _ = await loop.create_datagram_endpoint(Front, local_addr=(self.host, 0))
        self.port = self._front.get_extra_info("sockname")[1]

    def _pass(self, send: Any) -> None:
        if random.random() < self.loss:
            return
        if self.delay_s > 0:
            asyncio.get_running_loop().call_later(self.delay_s, send)
        else:
            send()

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self._clients.get(addr)
        if up is not None:
            self._pass(lambda: up.sendto(data))
            return
        waiting = self._waiting.get(addr)
        if waiting is not None:
            waiting.append(data)
            return
        self._waiting[addr] = [data]
        task = asyncio.get_running_loop().create_task(self._open_upstream(addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_upstream(self, addr: tuple[str, int]) -> None:
        front = self._front
        assert front is not None
        emulator = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, reply: bytes, _from: tuple[str, int]) -> None:
                emulator._pass(lambda: front.sendto(reply, addr))

        loop = asyncio.get_running_loop()
        up, _ = await loop.create_datagram_endpoint(
            Back, local_addr=(self.host, 0), remote_addr=self.upstream
        )
        self._clients[addr] = up
        for data in self._waiting.pop(addr, []):
            self._pass(lambda data=data: up.sendto(data))

    def close(self) -> None:
        for t in self._clients.values():
            t.close()
        if self._front is not None:
            self._front.close()


def start_coturn(work: Path, port: int, secret: str) -> subprocess.Popen[bytes]:
    turnserver = shutil.which("turnserver") or "/usr/bin/turnserver"
    argv = [
        turnserver, "-n", f"--listening-ip={BRIDGE_ADDR}", f"--relay-ip={BRIDGE_ADDR}",
        f"--listening-port={port}", "--min-port=49160", "--max-port=49400", "--use-auth-secret",
        f"--static-auth-secret={secret}", "--realm=bench", "--no-tls", "--no-dtls", "--no-cli",
        "--allow-loopback-peers", "--fingerprint", "--no-software-attribute", "--log-file=stdout",
        "--simple-log", f"--pidfile={work / 'turn.pid'}",
    ]  # fmt: skip
    log_file = open(work / "coturn.log", "ab")  # lives as long as the process
    proc = subprocess.Popen(argv, stdout=log_file, stderr=log_file, start_new_session=True)
    time.sleep(1.0)
    if proc.poll() is not None:
        raise RuntimeError(f"coturn exited: see {work / 'coturn.log'}")
    return proc


# -- one call --------------------------------------------------------------------------------


class CallUnderTest:
    def __init__(self, browser: Any, server: Any, doctor_id: int) -> None:
        self.browser = browser
        self.server = server
        self.doctor_id = doctor_id
        self.contexts: list[Any] = []
        self.patient: Any = None
        self.doctor: Any = None

    async def start(self) -> float:
        """Open both pages; return ms from the patient's navigation start to its first frame."""
        patient_url, room_url = await asyncio.to_thread(new_visit, self.server, self.doctor_id)
        doctor_ctx = await self.browser.new_context(permissions=MEDIA_PERMISSIONS, **DOCTOR_CONTEXT)
        patient_ctx = await self.browser.new_context(permissions=MEDIA_PERMISSIONS, **PATIENT_CONTEXT)
        self.contexts = [doctor_ctx, patient_ctx]
        for ctx in self.contexts:
            ctx.set_default_timeout(WAIT_MS)
        await doctor_ctx.add_init_script(AUTO_ADMIT_JS)
        await patient_ctx.add_init_script(FIRST_FRAME_JS)
        self.doctor = await doctor_ctx.new_page()
        await sign_in_doctor(self.doctor, self.server.origin)
        await self.doctor.goto(room_url)
        await self.doctor.locator("[data-testid=call-status][data-state=waiting_patient]").wait_for()
        self.patient = await patient_ctx.new_page()
        await self.patient.goto(patient_url, wait_until="commit")
        await self.patient.wait_for_function("() => !!window.__consultSignaling", polling=5)
        await self.patient.get_by_test_id("join").tap()
        await self.patient.wait_for_function("() => window.__firstFrame", polling=20, timeout=60_000)
        join_ms = await self.patient.evaluate("window.__firstFrame")
        await self.wait_frames(self.doctor, 1, 60)
        return join_ms

    async def stats(self, page: Any) -> dict:
        return await page.evaluate(STATS_JS) or {"frames": 0, "concealed": 0, "samples": 0, "udp": []}

    async def wait_frames(self, page: Any, more: int, timeout_s: float) -> float:
        """Seconds until `more` new frames are decoded on `page` (inf on timeout)."""
        t0 = time.monotonic()
        start = (await self.stats(page))["frames"]
        while time.monotonic() - t0 < timeout_s:
            if (await self.stats(page))["frames"] >= start + more:
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        return float("inf")

    async def video_back(self, page: Any, cut: float, timeout_s: float) -> float:
        """Seconds from `cut` until video is back on `page`: frames stopped (no new decoded
        frame for STALL_S: what was already in the pipeline is not counted as recovered) and
        then BACK_FRAMES new frames were decoded. inf on timeout."""
        last = (await self.stats(page))["frames"]
        grew_at = time.monotonic()
        stalled = False
        resumed_from = None
        while time.monotonic() - cut < timeout_s:
            await asyncio.sleep(0.05)
            frames = (await self.stats(page))["frames"]
            now = time.monotonic()
            if frames > last:
                if stalled and resumed_from is None:
                    resumed_from = (last, now)
                if resumed_from is not None and frames - resumed_from[0] >= BACK_FRAMES:
                    return resumed_from[1] - cut
                last, grew_at = frames, now
            elif now - grew_at >= STALL_S:
                stalled = True
        return float("inf")

    async def close(self) -> None:
        for ctx in self.contexts:
            await ctx.close()


async def longest_gap(call: CallUnderTest, seconds: float) -> float:
    pages = [call.patient, call.doctor]
    last = [(await call.stats(p))["frames"] for p in pages]
    since = [time.monotonic()] * 2
    worst = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        for i, page in enumerate(pages):
            frames = (await call.stats(page))["frames"]
            now = time.monotonic()
            if frames > last[i]:
                last[i], since[i] = frames, now
            worst = max(worst, now - since[i])
    return worst


# -- the conditions -----------------------------------------------------------------------------


def firefox_calls() -> bool:
    """Both two-engine calls of the test suite, run as they are; True if both passed."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser_firefox.py"]
    env = {k: v for k, v in os.environ.items() if k != "CONSULT_TEST_NETNS"}  # its own namespace
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        log("firefox: the two-engine calls did not finish within 900 s")
        return False
    log("firefox: " + (done.stdout.strip().splitlines() or ["no output"])[-1])
    return done.returncode == 0


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    wanted = set(args.only.split(",")) if args.only else set(CONDITIONS)
    out: dict[str, Any] = {
        "join_ms_median_clean": None,
        "audio_concealment_pct_loss5": None,
        "switch_recovery_s": None,
        "udp_drop_recovery_s": None,
        "signaling_outage_media_gap_s": None,
        "relay_only_connected": None,
        "firefox_chromium_connected": None,
    }
    if "firefox" in wanted:
        out["firefox_chromium_connected"] = await asyncio.to_thread(firefox_calls)
    secret = secrets.token_hex(16)
    turn_port = free_port(BRIDGE_ADDR)
    coturn = None
    emulator = None
    servers: list[ConsultServer] = []
    try:
        plain = ConsultServer(work / "data", log_dir=work, env={"CONSULT_DEFAULT_LOCALE": "en"})
        await asyncio.to_thread(plain.init, demo=True)
        await plain.astart()
        servers.append(plain)
        plain_doctor = await asyncio.to_thread(prepare_server, plain)
        relayed = None
        relay_doctor = 0
        if wanted & {"loss5", "relay2"}:
            coturn = start_coturn(work, turn_port, secret)
            emulator = LinkEmulator(BRIDGE_ADDR, (BRIDGE_ADDR, turn_port))
            await emulator.start()
            relayed = ConsultServer(
                work / "relay-data",
                log_dir=work,
                name="relay",
                env={
                    "CONSULT_DEFAULT_LOCALE": "en",
                    "CONSULT_TURN_URLS": f"turn:{BRIDGE_ADDR}:{emulator.port}?transport=udp",
                    "CONSULT_TURN_SECRET": secret,
                    "CONSULT_ICE_TRANSPORT_POLICY": "relay",
                },
            )
            await asyncio.to_thread(relayed.init, demo=True)
            await relayed.astart()
            servers.append(relayed)
            relay_doctor = await asyncio.to_thread(prepare_server, relayed)

        async with async_playwright() as pw:
            origins = [s.origin for s in servers]
            browser = await launch_chromium(pw, origins)
            try:
                await conditions(
                    args, wanted, out, browser, plain, plain_doctor, relayed, relay_doctor, emulator
                )
            finally:
                await browser.close()
    finally:
        uncap()
        if emulator is not None:
            emulator.close()
        for s in servers:
            s.stop()
        if coturn is not None:
            coturn.terminate()
            coturn.wait(5)
    return out


async def conditions(
    args: argparse.Namespace,
    wanted: set[str],
    out: dict[str, Any],
    browser: Any,
    plain: Any,
    plain_doctor: int,
    relayed: Any,
    relay_doctor: int,
    emulator: LinkEmulator | None,
) -> None:
    async def call_on(server: Any, doctor_id: int) -> tuple[CallUnderTest, float]:
        call = CallUnderTest(browser, server, doctor_id)
        return call, await call.start()

    if "clean" in wanted:
        joins = []
        for i in range(args.joins + 1):
            call, join_ms = await call_on(plain, plain_doctor)
            await call.close()
            if i:  # the first run warms the server's templates and Chromium's media pipeline
                joins.append(join_ms)
            log(f"clean: join {join_ms:.0f} ms{' (warm-up)' if not i else ''}")
        out["join_ms_median_clean"] = round(statistics.median(joins))

    for name, kbit in (("uplink300", 300), ("uplink150", 150)):
        if name not in wanted:
            continue
        call, _ = await call_on(plain, plain_doctor)
        try:
            ports = (await call.stats(call.patient))["udp"]
            cap_uplink(ports, kbit)
            await asyncio.sleep(args.window)
            levels = [
                await p.get_by_test_id("quality").get_attribute("data-level")
                for p in (call.patient, call.doctor)
            ]
            offered = [await p.get_by_test_id("audio-only").is_visible() for p in (call.patient, call.doctor)]
            out[f"uplink_{kbit}_level"] = levels
            out[f"uplink_{kbit}_audio_only_offered"] = offered
            # "auto": switched by itself (available bitrate under 100 kbit/s twice in a row).
            out[f"uplink_{kbit}_audio_only"] = [
                await p.evaluate("document.querySelector('[data-call]').dataset.audioOnly || null")
                for p in (call.patient, call.doctor)
            ]
            switched = out[f"uplink_{kbit}_audio_only"]
            log(f"{name}: quality patient/doctor {levels}, audio only offered {offered}, on {switched}")
        finally:
            uncap()
            await call.close()

    if "udp_drop" in wanted:
        call, _ = await call_on(plain, plain_doctor)
        try:
            rules = udp_drop_rules((await call.stats(call.patient))["udp"])
            iptables("-I", rules)
            try:
                t = await call.video_back(call.patient, time.monotonic(), 30)
            finally:
                iptables("-D", rules)
            out["udp_drop_recovery_s"] = round(t, 2) if t != float("inf") else None
            log(f"udp_drop: video back on the patient's page after {t:.2f} s")
        finally:
            await call.close()

    if "switch" in wanted:
        call, _ = await call_on(plain, plain_doctor)
        try:
            before = client_tcp_ports(plain.port)
            await call.patient.evaluate("window.__old = window.__consultSignaling.ws; window.__old.close()")
            await call.patient.wait_for_function(
                "() => window.__consultSignaling.isOpen && window.__consultSignaling.ws !== window.__old"
            )
            mine = client_tcp_ports(plain.port) - before
            rules = udp_drop_rules((await call.stats(call.patient))["udp"])
            rules += [r for p in mine for r in tcp_blackhole_rules(p)]
            await call.wait_frames(call.patient, 5, 10)
            cut_ms = await call.patient.evaluate("performance.now()")
            iptables("-I", rules)
            try:
                t0 = time.monotonic()
                t = max(
                    await asyncio.gather(
                        call.video_back(call.patient, t0, 45), call.video_back(call.doctor, t0, 45)
                    )
                )
            finally:
                iptables("-D", rules)
            out["switch_recovery_s"] = round(t, 2) if t != float("inf") else None
            for name, page in (("patient", call.patient), ("doctor", call.doctor)):
                log(f"switch: {name}'s trace:", await page.evaluate("window.__consultTrace.slice(-14)"))
            log(f"switch: cut at {cut_ms:.0f} ms of the patient's page")
            log(f"switch (socket of port {sorted(mine)} silenced): video back on both pages after {t:.2f} s")
        finally:
            await call.close()

    if "outage" in wanted:
        call, _ = await call_on(plain, plain_doctor)
        refuse = [["OUTPUT", "-p", "tcp", "--dport", str(plain.port), "--syn", "-j", "REJECT",
                   "--reject-with", "tcp-reset"]]  # fmt: skip
        try:
            iptables("-I", refuse)
            try:
                sh(
                    "ss",
                    "-K",
                    "-t",
                    "state",
                    "established",
                    f"( dport = :{plain.port} or sport = :{plain.port} )",
                )
                gap = await longest_gap(call, 20)
            finally:
                iptables("-D", refuse)
            out["signaling_outage_media_gap_s"] = round(gap, 2)
            log(f"outage: longest stretch without a new decoded frame in 20 s: {gap:.2f} s")
        finally:
            await call.close()

    if relayed is not None and emulator is not None and "relay2" in wanted:
        emulator.loss, emulator.delay_s = 0.01, 0.0  # two passes per direction: ~2 %
        try:
            call, _ = await call_on(relayed, relay_doctor)
            try:
                ok = all([await call.wait_frames(p, 20, 30) < 30 for p in (call.patient, call.doctor)])
            finally:
                await call.close()
        except Exception as e:  # a call that never connects is the answer "false"
            log(f"relay2: {e!r}")
            ok = False
        out["relay_only_connected"] = ok
        log(f"relay2: connected and decoding both ways: {ok}")

    if relayed is not None and emulator is not None and "loss5" in wanted:
        emulator.loss, emulator.delay_s = 0.0253, 0.05  # 5 % per direction, 4 x 50 ms round trip
        call, _ = await call_on(relayed, relay_doctor)
        try:
            await asyncio.sleep(3)
            before = [await call.stats(p) for p in (call.patient, call.doctor)]
            await asyncio.sleep(args.window)
            after = [await call.stats(p) for p in (call.patient, call.doctor)]
            concealed = sum(a["concealed"] - b["concealed"] for a, b in zip(after, before, strict=True))
            samples = sum(a["samples"] - b["samples"] for a, b in zip(after, before, strict=True))
            pct = 100 * concealed / samples if samples else None
            out["audio_concealment_pct_loss5"] = round(pct, 2) if pct is not None else None
            out["audio_codec_loss5"] = (
                f"{after[0]['audioCodec']} (first offered/answered: {after[0]['audioFirst']})"
            )
            codec = out["audio_codec_loss5"]
            log(f"loss5: {concealed} of {samples} audio samples concealed ({pct}); sent as {codec}")
        finally:
            emulator.loss, emulator.delay_s = 0.0, 0.0
            await call.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help=f"comma-separated conditions of {','.join(CONDITIONS)}")
    parser.add_argument(
        "--joins", type=int, default=3, help="measured clean joins (default 3, plus a warm-up)"
    )
    parser.add_argument(
        "--window", type=float, default=20, help="seconds a rate or loss condition is observed (default 20)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (server and coturn logs)")
    args = parser.parse_args()
    unknown = set(filter(None, args.only.split(","))) - set(CONDITIONS)
    if unknown:
        parser.error(f"unknown conditions: {sorted(unknown)}")
    try:
        enter_private_netns()  # before any thread: the server and Chromium inherit the namespace
    except RuntimeError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    load_before = loadavg()
    log(f"load average before: {load_before}")
    work = Path(tempfile.mkdtemp(prefix="consult-bench-network-"))
    try:
        result = asyncio.run(run(args, work))
    except BaseException:
        args.keep = True
        raise
    finally:
        load_after = loadavg()
        log(f"load average after: {load_after}")
        if args.keep:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_before"] = load_before
    result["load_average_after"] = load_after
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
