"""Server-side recording of a visit without decoding or re-encoding (docs/recording.md).

Media side only: this package knows rooms by an opaque label and participants by role; who may
be recorded, consent and where file rows are kept belong to the application. The names below
are imported on first use, so that `signaling.recording.pool` (which the application creates at
start) does not load aiortc and PyAV before a visit is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from signaling.recording.errors import RecordingError

if TYPE_CHECKING:
    from signaling.recording.passthrough import counters
    from signaling.recording.session import RecordingSession
    from signaling.recording.writer import RecordingFile

__all__ = ["RecordingError", "RecordingFile", "RecordingSession", "counters"]


def __getattr__(name: str) -> Any:
    if name == "counters":
        from signaling.recording.passthrough import counters

        return counters
    if name == "RecordingSession":
        from signaling.recording.session import RecordingSession

        return RecordingSession
    if name == "RecordingFile":
        from signaling.recording.writer import RecordingFile

        return RecordingFile
    raise AttributeError(name)
