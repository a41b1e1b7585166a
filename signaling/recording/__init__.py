"""Server-side recording of a visit without decoding or re-encoding (docs/recording.md).

Media side only: this package knows rooms by an opaque label and participants by role; who may
be recorded, consent and where file rows are kept belong to the application.
"""

from signaling.recording.passthrough import counters
from signaling.recording.session import RecordingError, RecordingSession
from signaling.recording.writer import RecordingFile

__all__ = ["RecordingError", "RecordingFile", "RecordingSession", "counters"]
