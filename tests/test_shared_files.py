"""Uploads and recordings on a directory every node mounts (the `shared_dir` setting): they go
there, not into the data directory; each file is written whole under a name no other node
picks (consult/core/files.py); a recording another node may still be writing is not repaired."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from consult.calls import recordings
from consult.core import files
from consult.core.config import Settings, load_settings
from consult.ops import cli
from tests.conftest import IN_PROCESS, locale_for
from tests.test_recordings import webm
from tests.test_reports import PATIENT, World, build_world, pdf_bytes, png_bytes, report_rows, sign_in, upload


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    path = tmp_path / "nfs"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path, shared_dir: Path, request: pytest.FixtureRequest) -> Settings:
    return load_settings(
        env={},
        data_dir=data_dir,
        shared_dir=str(shared_dir),
        tls=False,
        default_locale=locale_for(request),
        **IN_PROCESS,
    )


@pytest.fixture
def world(client, settings, make_user) -> World:
    w = build_world(client, settings, make_user)
    w.db.write_sync(lambda d: d.execute("UPDATE visits SET status = 'confirmed' WHERE id = ?", [w.visit_id]))
    yield w
    w.db.close()


def test_files_dir_is_the_shared_dir_or_the_data_dir(tmp_path: Path):
    assert load_settings(env={}, data_dir=tmp_path).files_dir == tmp_path
    shared = load_settings(env={"CONSULT_SHARED_DIR": "/mnt/consult"}, data_dir=tmp_path)
    assert shared.files_dir == Path("/mnt/consult")


async def test_reports_are_stored_on_the_shared_dir_and_served_and_backed_up_from_it(
    world: World, shared_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    backup_dir = tmp_path / "backup"
    monkeypatch.setenv("CONSULT_SHARED_DIR", str(shared_dir))
    client = world.client
    token = await sign_in(client, PATIENT)
    pdf = pdf_bytes()
    for data, name in ((pdf, "血常规.pdf"), (png_bytes(), "scan.png")):
        resp = await upload(client, world, token, data, name)
        assert resp.status == 201, await resp.text()
    rows = report_rows(world)
    assert len(rows) == 2
    for row in rows:
        path = shared_dir / "uploads" / row["stored_name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
        assert path.stat().st_mode & 0o777 == 0o600
    assert not (world.data_dir / "uploads").exists() or not any((world.data_dir / "uploads").rglob("*.*"))
    # Nothing half-written is left behind: the temp files were consumed.
    tmp = shared_dir / "uploads" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())
    resp = await client.get(f"/reports/{rows[0]['id']}")
    assert resp.status == 200 and await resp.read() == pdf
    # `consult backup` takes them from the shared directory, as if they were in the data directory.
    capsys.readouterr()
    assert cli.main(["--data-dir", str(world.data_dir), "backup", str(backup_dir)]) == 0, capsys.readouterr()
    for row in rows:
        assert (backup_dir / "uploads" / row["stored_name"]).read_bytes() == (
            shared_dir / "uploads" / row["stored_name"]
        ).read_bytes()


async def test_recordings_of_a_shared_dir_are_found_and_served_there(world: World, shared_dir: Path):
    directory = recordings.room_dir(shared_dir, world.public_id)
    path = directory / "host-20240101T000000Z-0123456789ab.webm"
    webm(path, seconds=1.0)
    old = time.time() - 3600
    os.utime(path, (old, old))
    touched = world.db.write_sync(lambda d: recordings.recover_sync(d, shared_dir))
    assert touched == [f"recordings/{world.public_id}/{path.name}"]
    (row,) = world.db.read_sync(lambda d: recordings.for_visit_sync(d, world.visit_id))
    await sign_in(world.client, "drwang")
    resp = await world.client.get(f"/recordings/{row['id']}")
    assert resp.status == 200 and await resp.read() == path.read_bytes()


def test_a_recording_written_to_just_now_is_left_to_the_node_recording_it(world: World, shared_dir: Path):
    directory = recordings.room_dir(shared_dir, world.public_id)
    live = directory / "guest-20240101T000000Z-aaaaaaaaaaaa.webm"
    cut = directory / "host-20240101T000000Z-bbbbbbbbbbbb.webm"
    for path in (live, cut):
        path.write_bytes(b"\x1a\x45\xdf\xa3 not finished")
    old = time.time() - 2 * recordings.LIVE_GRACE_S
    os.utime(cut, (old, old))

    def found(grace: float) -> set[str]:
        return {
            i.path.name
            for i in world.db.read_sync(
                lambda d: recordings.interrupted_sync(d, shared_dir, live_grace_s=grace)
            )
        }

    assert found(recordings.LIVE_GRACE_S) == {cut.name}
    assert found(0.0) == {cut.name, live.name}  # one node alone: everything left is its own


def test_init_makes_the_file_directories_on_the_shared_dir(tmp_path: Path, monkeypatch):
    shared = tmp_path / "nfs"
    monkeypatch.setenv("CONSULT_SHARED_DIR", str(shared))
    assert cli.main(["--data-dir", str(tmp_path / "data"), "init"]) == 0
    assert (shared / "uploads").is_dir() and (shared / "recordings").is_dir()
    assert (tmp_path / "data" / "keys").is_dir()
    assert not (tmp_path / "data" / "uploads").exists()


def test_write_atomic_leaves_the_whole_file_or_none(tmp_path: Path):
    target = tmp_path / "secrets.json"
    files.write_atomic(target, b"one", 0o600)
    assert target.read_bytes() == b"one" and target.stat().st_mode & 0o777 == 0o600
    files.write_atomic(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        files.write_atomic(target, b"three", 0o600, replace=False)
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["secrets.json"]  # no temp file left


def test_temp_names_differ_across_writers(tmp_path: Path):
    target = tmp_path / "thumb.png"
    names = {files.temp_name(target) for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.parent == tmp_path and n.name.startswith(".thumb.png.") for n in names)
