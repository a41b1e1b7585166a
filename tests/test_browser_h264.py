"""H.264, what iPhones prefer: both pages put it first (setCodecPreferences, web/static/
call-media.js `Consult.preferCodecs`), so two browsers that both have it call with it. Here
that is Debian Chromium on both sides (OpenH264 encoder, FFmpeg decoder); this Firefox has no
H.264 (tests/test_browser_firefox.py: VP8). The recording legs prefer it too, and the server
writes the H.264 access units as they come (no transcoding) into Matroska: the files must
decode to the end.
"""

from __future__ import annotations

import asyncio
import json
import time

import av
from playwright.async_api import Page, expect

from tests.db_helpers import rows as db_rows
from tests.test_browser_call import WAIT_MS, frames_grow, prepare_call
from tests.test_browser_firefox import CODECS_JS
from tests.test_browser_recording import decode, join_with_consent, rows

TEST_TIMEOUT = 150
VISIT_S = 25

H264_OFFERED_JS = """
() => RTCRtpReceiver.getCapabilities("video").codecs.some((c) => c.mimeType === "video/H264")
  && RTCRtpSender.getCapabilities("video").codecs.some((c) => c.mimeType === "video/H264")
"""
# The video codec of the recording leg's sender, from its stats.
REC_CODEC_JS = """
async () => {
  const pc = window.__consultRecPc;
  if (!pc) return null;
  const report = await pc.getStats();
  let mime = null;
  report.forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video" && s.codecId && report.get(s.codecId)) {
      mime = report.get(s.codecId).mimeType;
    }
  });
  return mime;
}
"""

REC_DEBUG_JS = """
async () => {
  const pc = window.__consultRecPc;
  if (!pc) return "no recording connection";
  const out = [];
  (await pc.getStats()).forEach((s) => { if (s.type === "outbound-rtp" || s.type === "codec") out.push(s); });
  const lines = pc.remoteDescription ? pc.remoteDescription.sdp.split("\\r\\n") : [];
  const sdp = lines.filter((l) => /^a=(rtpmap|fmtp)|^m=/.test(l));
  return JSON.stringify({state: pc.connectionState, sdp, out});
}
"""


async def test_h264_call_and_its_recording_decode_to_the_end(
    consult_server_factory, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        assert await patient_page.evaluate(H264_OFFERED_JS), "this Chromium has no H.264"
        server = await consult_server_factory(
            env={"CONSULT_VISIT_SECONDS_OVERRIDE": str(VISIT_S), "CONSULT_RECORDING_POLICY": "always"}
        )
        call = await asyncio.to_thread(prepare_call, server)
        await join_with_consent(call, patient_page, doctor_page, app_origin, patient_agrees=True)
        # Each recording leg sends H.264 too.
        for page in (patient_page, doctor_page):
            await expect(page.get_by_test_id("recording-indicator")).to_be_visible(timeout=WAIT_MS)
            deadline = time.monotonic() + 10
            while (rec := await page.evaluate(REC_CODEC_JS)) != "video/H264":
                debug = await page.evaluate(REC_DEBUG_JS)
                assert time.monotonic() < deadline, f"recording leg sends {rec}: {debug}"
                await asyncio.sleep(0.5)
        # The call itself: H.264 both ways, and pictures decoded from it.
        codecs = await asyncio.gather(patient_page.evaluate(CODECS_JS), doctor_page.evaluate(CODECS_JS))
        assert all(c == {"receives": "video/H264", "sends": "video/H264"} for c in codecs), codecs
        await asyncio.gather(frames_grow(patient_page), frames_grow(doctor_page))
        await expect(doctor_page.get_by_test_id("call-ended")).to_be_visible(timeout=(VISIT_S + 15) * 1000)

        deadline = time.monotonic() + 15
        while len(found := rows(server, call.visit.id)) < 2 or not all(r["complete"] for r in found):
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.25)
        ended = db_rows(server, "SELECT ended_at FROM rooms WHERE visit_id = ?", [call.visit.id])
        (room_ended,) = [r["ended_at"] for r in ended]
        assert room_ended is not None
        for row in found:
            path = server.data_dir / row["path"]
            assert path.suffix == ".mkv", row["path"]
            video = [t for t in json.loads(row["tracks"]) if t["kind"] == "video"]
            assert video and video[0]["codec"] == "h264", row["tracks"]
            with av.open(str(path)) as container:
                assert container.streams.video[0].codec_context.name == "h264"
            # Every packet decodes, from the first keyframe to the end of the file.
            info = await asyncio.to_thread(decode, path)
            assert info["kinds"] == {"audio", "video"}, info
            assert info["video_frames"] > 5 * VISIT_S // 2 and info["width"] > 0, info
            assert abs(row["duration_s"] - info["last"]) < 0.5, (row, info)
            # The file runs to the room's end. Under load (3 test workers on 2 cores) a leg may
            # come up seconds after the visit's clock started, so its length alone says little
            # (20.1 s of a 25 s visit once in CI, every frame since the leg came up): where the
            # leg started plus what the file holds must reach the room's end.
            assert info["last"] > VISIT_S / 2, info
            assert row["started_at"] + info["last"] > room_ended - 3, (row, info, room_ended)
            lead = room_ended - row["started_at"]
            print(f"{row['role']}: {row['path']} {info}, started {lead:.2f} s before the room's end")
