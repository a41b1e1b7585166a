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
_STREAMS_ATTR = "_RTCRtpReceiver__remote_streams"


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


# Later audio packets held while an earlier one is missing, before it is given up: a reordered
# datagram comes within a few ms, a lost one never (audio is not retransmitted).
AUDIO_PATIENCE = 8
# A sequence number this far behind is a new sequence (the sender restarted), not a late packet.
MAX_MISORDER = 100


class AudioInOrder:
    """Stands in for an audio receiver's jitter buffer on a recording leg.

    An Opus packet is a frame: each goes to the tap at once, in sequence order. aiortc's buffer
    (16 packets, prefetch 4) kept the last 4 packets back, and when a datagram was lost it
    waited until it overflowed and then discarded, one per new packet, the good packets queued
    before the gap: one lost datagram cost 5 frames of the recording. Here a missing packet is
    waited for until `AUDIO_PATIENCE` later ones came, then skipped; nothing else is dropped.
    """

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self.receiver = receiver
        self.next: int | None = None
        self.held: dict[int, Any] = {}

    def add(self, packet: Any) -> tuple[bool, None]:
        seq = packet.sequence_number
        if self.next is None:
            self.next = seq
        behind = (self.next - seq) & 0xFFFF
        if 0 < behind < 0x8000:
            if behind < MAX_MISORDER:
                return False, None  # a duplicate, or later than a packet given up
            self.release(final=True)  # the sender started a new sequence
            self.next = seq
        self.held[seq] = packet
        self.release(final=False)
        return False, None

    def release(self, *, final: bool) -> int:
        """Hand the tap every packet that is next in order; past a gap once `AUDIO_PATIENCE`
        packets wait behind it (or at once when `final`). Returns how many."""
        done = 0
        while self.held:
            assert self.next is not None
            packet = self.held.pop(self.next, None)
            if packet is None:
                if not final and len(self.held) < AUDIO_PATIENCE:
                    break
                self.next = min(self.held, key=lambda s: (s - self.next) & 0xFFFF)
                continue
            self.next = (self.next + 1) & 0xFFFF
            done += self._emit(packet)
        return done

    def _emit(self, packet: Any) -> int:
        tap = getattr(self.receiver, _QUEUE_ATTR, None)
        mapper = getattr(self.receiver, _MAPPER_ATTR, None)
        codec = (getattr(self.receiver, _CODECS_ATTR, None) or {}).get(packet.payload_type)
        data = getattr(packet, "_data", b"")
        if not isinstance(tap, FrameTap) or mapper is None or codec is None or not data:
            return 0
        tap.put((codec, JitterFrame(data=data, timestamp=mapper.map(packet.timestamp))))
        return 1


def audio_in_order(receiver: RTCRtpReceiver) -> None:
    """Give `receiver` (audio, `attach`ed) an `AudioInOrder` instead of aiortc's jitter buffer."""
    if hasattr(receiver, _JITTER_ATTR):
        setattr(receiver, _JITTER_ATTR, AudioInOrder(receiver))


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


def _starts_frame(packet: Any, codec: RTCRtpCodecParameters | None) -> bool:
    """Whether `packet` is the first of its video frame, by its payload alone (used after a gap,
    where the packet before it is unknown): VP8's descriptor says so (S bit, partition 0).
    H.264 cannot tell (an access unit may begin with parameter sets): never assumed."""
    if codec is None or codec.name.upper() != "VP8" or not packet.payload:
        return False
    return bool(packet.payload[0] & 0x10) and packet.payload[0] & 0x0F == 0


def flush(receiver: RTCRtpReceiver) -> int:
    """Hand the sink the complete frames `receiver`'s jitter buffer still holds; return how many.

    aiortc releases a video frame only once the next one starts, and none behind a missing
    packet until its buffer overflows, so when a leg ends its last video frame (more behind a
    gap: a packet lost, or a retransmission still on its way) is still in the buffer and would be
    lost. Call this after the receiver is stopped (the connection closed: no packet can arrive
    meanwhile). Every complete frame is taken, behind gaps too, in sequence order: an audio
    packet is a frame; a video frame is complete when its packets run without a gap from its
    first (known: the packet before it belongs to another frame, or VP8's descriptor marks it)
    to its last (RTP marker bit). What stays in the buffer was not written (`buffered_packets`).
    """
    tap = getattr(receiver, _QUEUE_ATTR, None)
    buffer = getattr(receiver, _JITTER_ATTR, None)
    mapper = getattr(receiver, _MAPPER_ATTR, None)
    codecs = getattr(receiver, _CODECS_ATTR, None)
    if isinstance(buffer, AudioInOrder):  # audio of a recording leg: what waits behind a gap
        return buffer.release(final=True)
    if not isinstance(tap, FrameTap) or buffer is None or mapper is None or not codecs:
        return 0
    video = receiver.track.kind == "video"
    # Runs of consecutive packets with one timestamp: (slots, start known).
    runs: list[tuple[list[int], bool]] = []
    previous: Any = None
    for count in range(buffer.capacity):
        slot = (buffer._origin + count) % buffer.capacity
        packet = buffer._packets[slot]
        if packet is None:
            previous = None
            continue
        if previous is not None and previous.timestamp == packet.timestamp:
            runs[-1][0].append(slot)
        else:
            # The origin is where aiortc's next frame starts; after another frame's packet a
            # new frame starts; after a gap, only the payload can tell.
            known = count == 0 or previous is not None
            if not known and video:
                known = _starts_frame(packet, codecs.get(packet.payload_type))
            runs.append(([slot], known))
        previous = packet
    done = 0
    for slots, known in runs:
        packets = [buffer._packets[slot] for slot in slots]
        if video and not (known and packets[-1].marker):
            continue  # a part of a frame: its other packets never came
        codec = codecs.get(packets[0].payload_type)
        data = b"".join(getattr(p, "_data", b"") for p in packets)
        if codec is None or not data:
            continue
        tap.put((codec, JitterFrame(data=data, timestamp=mapper.map(packets[0].timestamp))))
        for slot in slots:
            buffer._packets[slot] = None
        done += 1
    return done


def receive_counts(receiver: RTCRtpReceiver) -> tuple[int, int]:
    """RTP packets `receiver` got, and how many it never got between its first and its highest
    sequence number (RTCP's cumulative loss; a loss after the last packet cannot show here)."""
    received = lost = 0
    for stream in (getattr(receiver, _STREAMS_ATTR, None) or {}).values():
        received += stream.packets_received
        lost += max(0, stream.packets_lost)
    return received, lost


def buffered_packets(receiver: RTCRtpReceiver) -> int:
    """Packets still in `receiver`'s jitter buffer (after `flush`: those behind a gap)."""
    buffer = getattr(receiver, _JITTER_ATTR, None)
    if isinstance(buffer, AudioInOrder):
        return len(buffer.held)
    return 0 if buffer is None else sum(p is not None for p in buffer._packets)
