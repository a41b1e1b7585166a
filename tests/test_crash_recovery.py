"""Nothing lost in a crash: what a killed or failing server leaves on disk converges to rows.

Real files, real SQLite: recordings whose write failed, interrupted recordings repaired once,
report ids never reused, and the periodic sweep of upload temp files and orphan report files.
"""

from __future__ import annotations

import os

import pytest

from consult.calls import recordings
from signaling.recording.writer import ParticipantWriter
from tests.test_recording_writer import OPUS
from tests.test_reports import World, build_world


@pytest.fixture
def world(client, settings, make_user) -> World:
    w = build_world(client, settings, make_user)
    yield w
    w.db.close()


def rows(world: World, sql: str, params=()) -> list[dict]:
    return world.db.read_sync(lambda d: [dict(r) for r in d.execute(sql, list(params)).fetchall()])


# -- a recording whose write failed ----------------------------------------------------------


def test_a_recording_whose_write_failed_is_stored_as_incomplete(world: World, caplog):
    directory = recordings.room_dir(world.data_dir, world.public_id)
    writer = ParticipantWriter(directory, "guest", audio=True, video_codec=None)
    for i in range(50):
        writer.write("audio", 48000, OPUS, i * 960)
    writer.drain()
    full = os.open("/dev/full", os.O_WRONLY)  # every later write fails with ENOSPC
    try:
        os.dup2(full, writer._file.fileno())
    finally:
        os.close(full)
    for i in range(50, 2000):
        writer.write("audio", 48000, OPUS, i * 960)
    writer.drain()
    result = writer.close()
    assert result is not None and not result.complete
    # What the room's recording_stopped event carries, stored as consult.calls does.
    files = [result.as_dict()]
    world.db.write_sync(lambda d: recordings.store_files_sync(d, world.data_dir, world.visit_id, files, 1.0))
    (row,) = world.db.read_sync(lambda d: recordings.for_visit_sync(d, world.visit_id))
    assert row["complete"] == 0 and row["role"] == "patient"
    assert row["size"] == result.path.stat().st_size and row["sha256"] == result.sha256
    assert any(
        "stored as incomplete" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records
    )
