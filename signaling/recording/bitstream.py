"""Just enough parsing of encoded frames to mux them: keyframes, picture size, Opus durations.

The recorder never decodes; these read a few header bytes of each frame (RFC 6386 for VP8,
ISO 14496-10 NAL headers for H.264, RFC 6716 section 3.1 for the Opus TOC byte).
"""

from __future__ import annotations


def vp8_keyframe(frame: bytes) -> tuple[bool, tuple[int, int] | None]:
    """(is keyframe, (width, height) of a keyframe) for one depacketized VP8 frame."""
    if len(frame) < 3 or frame[0] & 0x01:
        return False, None
    # A keyframe's 3-byte tag is followed by the start code and the 14-bit dimensions.
    if len(frame) >= 10 and frame[3:6] == b"\x9d\x01\x2a":
        width = int.from_bytes(frame[6:8], "little") & 0x3FFF
        height = int.from_bytes(frame[8:10], "little") & 0x3FFF
        return True, (width, height)
    return True, None


def _nal_types(frame: bytes) -> set[int]:
    types: set[int] = set()
    i = frame.find(b"\x00\x00\x01")
    while i != -1 and i + 3 < len(frame):
        types.add(frame[i + 3] & 0x1F)
        i = frame.find(b"\x00\x00\x01", i + 3)
    return types


def h264_keyframe(frame: bytes) -> tuple[bool, tuple[int, int] | None]:
    """(is keyframe, None) for one Annex-B access unit: an IDR slice makes a keyframe.

    The picture size is not parsed (it sits behind Exp-Golomb fields of the SPS); Matroska
    takes it from the SPS in the codec private data anyway.
    """
    return 5 in _nal_types(frame), None


def keyframe_info(codec: str, frame: bytes) -> tuple[bool, tuple[int, int] | None]:
    if codec == "vp8":
        return vp8_keyframe(frame)
    if codec == "h264":
        return h264_keyframe(frame)
    return False, None


_SILK_MS = (10, 20, 40, 60)
_CELT_US = (2500, 5000, 10000, 20000)


def opus_duration_samples(packet: bytes) -> int:
    """Samples at 48 kHz in one Opus packet, from its TOC byte (0 if malformed)."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:
        frame_us = _SILK_MS[config % 4] * 1000
    elif config < 16:
        frame_us = (10000, 20000)[config % 2]
    else:
        frame_us = _CELT_US[config % 4]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            return 0
        frames = packet[1] & 0x3F
    return frames * frame_us * 48 // 1000
