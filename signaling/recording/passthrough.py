"""The seam through which the recorder takes encoded frames out of aiortc instead of decoding.

`RTCRtpReceiver` reassembles each encoded frame in its jitter buffer (on the event loop) and
puts `(codec, JitterFrame)` on its decoder input queue; a decoder thread per receiver takes it
from there and calls `aiortc.rtcrtpreceiver.get_decoder`. Replacing `get_decoder` works, but
then every frame still crosses to that thread: one GIL hand-off per frame, measured to stall
the event loop for 100-360 ms and make the kernel drop datagrams from 15 visits up (see
docs/recording.md). So the recorder taps one step earlier, per receiver instance:
`attach()` swaps that receiver's decoder queue for a `FrameTap` whose `put()` hands the frame
to the sink right there on the event loop. The receiver's decoder thread still starts but
only ever waits for the stop signal, so no decoder is ever created, and nothing global is
patched: other aiortc peers in the process decode as usual.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Protocol

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, pack_remb_fci

# Name-mangled attributes of RTCRtpReceiver (aiortc 1.x): the decoder input queue, and what
# `flush()` needs to finish the frames its jitter buffer still holds.
_QUEUE_ATTR = "_RTCRtpReceiver__decoder_queue"
_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_MAPPER_ATTR = "_RTCRtpReceiver__timestamp_mapper"
_CODECS_ATTR = "_RTCRtpReceiver__codecs"
_ESTIMATOR_ATTR = "_RTCRtpReceiver__remote_bitrate_estimator"
_RTCP_SSRC_ATTR = "_RTCRtpReceiver__rtcp_ssrc"


class FrameSink(Protocol):
    def on_frame(self, codec: RTCRtpCodecParameters, data: bytes, timestamp: int) -> None:
        """One encoded frame, on the event loop. `timestamp` is in the codec's clock rate,
        counted from this receiver's first frame (wrap-arounds already unwrapped)."""


@dataclass
class Counters:
    """Process-wide counts, so that tests and benchmarks can prove the taps carried the media."""

    taps: int = 0
    frames: int = 0


counters = Counters()


class FrameTap:
    """Stands in for the receiver's `queue.Queue`: frames go to the sink, `None` (stop) goes
    to the idle decoder thread so that it exits when the receiver stops."""

    def __init__(self, sink: FrameSink) -> None:
        self.sink = sink
        self._stop: queue.Queue[None] = queue.Queue()

    def put(self, item: tuple[RTCRtpCodecParameters, Any] | None) -> None:
        if item is None:
            self._stop.put(None)
            return
        codec, frame = item
        counters.frames += 1
        self.sink.on_frame(codec, frame.data, frame.timestamp)

    def get(self) -> None:
        return self._stop.get()


def attach(receiver: RTCRtpReceiver, sink: FrameSink) -> None:
    """Send `receiver`'s encoded frames to `sink` instead of its decoder.

    Must be called before the receiver starts (i.e. before the connection is established),
    which is when aiortc hands the queue to the decoder thread.
    """
    current = getattr(receiver, _QUEUE_ATTR, None)
    if not isinstance(current, queue.Queue):
        # Fail loudly rather than silently decoding: aiortc's internals changed.
        raise RuntimeError("unsupported aiortc version: no decoder queue on RTCRtpReceiver")
    setattr(receiver, _QUEUE_ATTR, FrameTap(sink))
    counters.taps += 1


def skip_bandwidth_estimation(receiver: RTCRtpReceiver) -> None:
    """Take aiortc's receive-side bandwidth estimator off `receiver`'s packet path.

    It runs Python per video packet (inter-arrival filter, overuse detector) and, under load,
    sends a REMB (SRTP + sendto) for many of them: measured about a quarter of a recording
    worker's CPU. A recording leg does not need an estimate: the page caps its bit rate, and
    the browser's own loss-based control still reacts to the receiver reports' losses. The
    session sends a fixed REMB instead (`send_remb`, once a second), which the browser takes
    as a ceiling.
    """
    if hasattr(receiver, _ESTIMATOR_ATTR):
        setattr(receiver, _ESTIMATOR_ATTR, None)


async def send_remb(receiver: RTCRtpReceiver, bitrate: int, ssrcs: list[int]) -> bool:
    """Send one REMB of `bitrate` bit/s for `ssrcs`; False if the receiver cannot send RTCP yet."""
    rtcp_ssrc = getattr(receiver, _RTCP_SSRC_ATTR, None)
    if rtcp_ssrc is None or not ssrcs:
        return False
    fci = pack_remb_fci(bitrate, ssrcs)
    packet = RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=fci)
    await receiver._send_rtcp(packet)
    return True


def on_first_packet(receiver: RTCRtpReceiver, callback: Any) -> None:
    """Call `callback()` (on the event loop) when `receiver` gets its first RTP packet.

    The arrival of the first packet anchors the track's RTP clock to the server's clock; the
    wrapper removes itself so later packets pay nothing.
    """
    original = receiver._handle_rtp_packet

    async def first(packet: Any, arrival_time_ms: int) -> None:
        del receiver._handle_rtp_packet  # back to the class's method
        callback()
        await original(packet, arrival_time_ms)

    receiver._handle_rtp_packet = first  # type: ignore[method-assign]


def flush(receiver: RTCRtpReceiver) -> int:
    """Hand the sink the complete frames `receiver`'s jitter buffer still holds; return how many.

    aiortc releases a frame only once later packets arrive (audio: 4 more frames, video: the
    next frame's first packet), so when a leg ends its last ~80 ms of audio and last video
    frame are still in the buffer and would be lost. Call this after the receiver is stopped
    (the connection closed: no packet can arrive meanwhile). A video frame counts as complete
    when its last packet carries the RTP marker bit; nothing after a missing packet is taken.
    """
    tap = getattr(receiver, _QUEUE_ATTR, None)
    buffer = getattr(receiver, _JITTER_ATTR, None)
    mapper = getattr(receiver, _MAPPER_ATTR, None)
    codecs = getattr(receiver, _CODECS_ATTR, None)
    if not isinstance(tap, FrameTap) or buffer is None or mapper is None or not codecs:
        return 0
    video = receiver.track.kind == "video"
    frames: list[list[Any]] = []
    for count in range(buffer.capacity):
        packet = buffer._packets[(buffer._origin + count) % buffer.capacity]
        if packet is None:
            break
        if not frames or frames[-1][0].timestamp != packet.timestamp:
            frames.append([])
        frames[-1].append(packet)
    if frames and video and not frames[-1][-1].marker:
        frames.pop()  # its last packets never came
    done = 0
    for packets in frames:
        codec = codecs.get(packets[0].payload_type)
        data = b"".join(getattr(p, "_data", b"") for p in packets)
        if codec is None or not data:
            continue
        tap.put((codec, JitterFrame(data=data, timestamp=mapper.map(packets[0].timestamp))))
        done += 1
    buffer.remove(sum(len(p) for p in frames))
    return done
