"""Visit recordings: policy and consent, the file rows, crash recovery and retention.

The media side is `signaling.recording` (docs/recording.md): it writes one WebM file per
participant leg into the directory this module chooses (`<data_dir>/recordings/<public id>/`)
and reports the files in a `recording_stopped` room event, which `consult.calls` stores here.

Policy: `recording_policy` setting, overridden by the department, then by the doctor; fixed on
the visit (`visits.recording`) when the first consent answer is stored. Under `on_request`
a visit is recorded only when both sides said yes; under `always` a side that has not said
yes cannot join (the patient is offered to reschedule).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlite_utils

from consult.audit import chain as audit
from consult.core.db import Database
from consult.core.files import temp_name
from consult.core.seats import ROLE_OF_SEAT

log = logging.getLogger(__name__)

POLICIES = ("off", "on_request", "always")
# Signaling seats to the application's roles (and back: file names start with the seat).
SUBDIR = "recordings"
_ROOM_DIR_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# A recording leg writes continuously; one not written to for this long is not being recorded.
LIVE_GRACE_S = 120.0
_FILE_RE = re.compile(r"^(host|guest)-[0-9TZ]+-[0-9a-f]{12}\.(webm|mkv)$")


# -- policy and consent -----------------------------------------------------------------------


@dataclass(frozen=True)
class VisitRecording:
    """A visit's recording terms: its policy and each side's answer (None: not asked yet)."""

    policy: str
    patient: bool | None
    doctor: bool | None

    @property
    def asks(self) -> bool:
        return self.policy != "off"

    def consent(self, role: str) -> bool | None:
        return self.patient if role == "patient" else self.doctor

    def records(self, role: str) -> bool:
        """Whether `role`'s admission allows recording: they said yes and the other side has
        not said no (the room records only when both admissions allow it)."""
        other = self.doctor if role == "patient" else self.patient
        return self.asks and self.consent(role) is True and other is not False

    def may_join(self, role: str) -> bool:
        """Under `always`, a visit is held only with this side's consent."""
        return self.policy != "always" or self.consent(role) is True

    @property
    def recorded(self) -> bool:
        return self.asks and self.patient is True and self.doctor is True

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "patient": self.patient, "doctor": self.doctor}


_TERMS_SQL = (
    "SELECT v.recording, v.recording_consent_patient, v.recording_consent_doctor,"
    " d.recording_policy AS doctor_policy, dep.recording_policy AS department_policy"
    " FROM visits v LEFT JOIN doctors d ON d.user_id = v.doctor_id"
    " LEFT JOIN departments dep ON dep.id = v.department_id WHERE v.id = ?"
)


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def effective_policy(default: str, department: str | None, doctor: str | None) -> str:
    for value in (doctor, department, default):
        if value in POLICIES:
            return value
    return "off"


def terms_sync(db: sqlite_utils.Database, visit_id: int, default_policy: str) -> VisitRecording:
    row = db.execute(_TERMS_SQL, [visit_id]).fetchone()
    if row is None:
        return VisitRecording("off", None, None)
    fixed, patient, doctor, doctor_policy, department_policy = row
    policy = fixed if fixed in POLICIES else None
    policy = policy or effective_policy(default_policy, department_policy, doctor_policy)
    return VisitRecording(policy, _bool(patient), _bool(doctor))


def set_consent_sync(
    db: sqlite_utils.Database,
    visit_id: int,
    role: str,
    consent: bool,
    default_policy: str,
    *,
    actor_id: int | None,
    remote: str | None,
    subject_user_id: int | None,
) -> VisitRecording:
    """Store one side's answer (writer thread), fixing the visit's policy; audited."""
    if role not in ("patient", "doctor"):
        raise ValueError(role)
    terms = terms_sync(db, visit_id, default_policy)
    column = f"recording_consent_{role}"
    db.execute(
        f"UPDATE visits SET recording = ?, {column} = ?, updated = ? WHERE id = ?",  # noqa: S608
        [terms.policy, int(consent), time.time(), visit_id],
    )
    audit.record(
        db,
        "visit.recording_consent",
        "visit",
        visit_id,
        actor=SimpleNamespace(id=actor_id),  # the caller knows the actor's id only
        role=role,  # the call seat ("patient" or "doctor") that answered
        remote=remote,
        subject_user_id=subject_user_id,
        detail={"role": role, "consent": consent, "policy": terms.policy},
    )
    return terms_sync(db, visit_id, default_policy)


def set_override_sync(db: sqlite_utils.Database, kind: str, object_id: int, raw: str, actor: Any) -> None:
    """An admin's recording policy for a department or doctor ("" = inherit); audited if changed."""
    from consult.core.errors import BadRequest
    from consult.core.i18n import _

    value = (raw or "").strip() or None
    if value is not None and value not in POLICIES:
        raise BadRequest(_("Unknown recording policy."))
    table, key = {"department": ("departments", "id"), "doctor": ("doctors", "user_id")}[kind]
    row = db.execute(f"SELECT recording_policy FROM {table} WHERE {key} = ?", [object_id]).fetchone()  # noqa: S608
    if row is None or row[0] == value:
        return
    db.execute(f"UPDATE {table} SET recording_policy = ? WHERE {key} = ?", [value, object_id])  # noqa: S608
    detail = {"from": row[0], "to": value}
    audit.record(db, f"{kind}.recording_policy", kind, object_id, actor=actor, detail=detail)


# -- files ------------------------------------------------------------------------------------


def root_dir(data_dir: Path) -> Path:
    return data_dir / SUBDIR


def room_dir(data_dir: Path, public_id: str) -> Path:
    """`<data_dir>/recordings/<public id>/`, created private (the recorder's callable)."""
    if not _ROOM_DIR_RE.fullmatch(public_id):
        raise ValueError("invalid room id")
    root = root_dir(data_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = root / public_id
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def stored_path(data_dir: Path, relative: str) -> Path:
    """The absolute path of a row's file; refuses anything outside recordings/."""
    root = root_dir(data_dir).resolve()
    path = (data_dir / relative).resolve()
    if root not in path.parents:
        raise ValueError("not a recording path")
    return path


def _relative(data_dir: Path, path: Path | str) -> str:
    return str(Path(path).resolve().relative_to(data_dir.resolve()))


def sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def probe(path: Path) -> tuple[float | None, list[dict[str, Any]]]:
    """Duration and tracks of a (possibly partial) file, read by demuxing it completely:
    a file cut by a crash has no duration in its header."""
    import av

    tracks: dict[int, dict[str, Any]] = {}
    first: float | None = None
    last: float | None = None
    try:
        with av.open(str(path)) as container:
            for stream in container.streams:
                tracks[stream.index] = {
                    "kind": stream.type,
                    "codec": stream.codec_context.name if stream.codec_context else None,
                    "frames": 0,
                    "bytes": 0,
                }
            for packet in container.demux():
                if packet.pts is None or packet.size == 0:
                    continue
                t = float(packet.pts * packet.time_base)
                end = t + float((packet.duration or 0) * packet.time_base)
                first = t if first is None else min(first, t)
                last = end if last is None else max(last, end)
                track = tracks.get(packet.stream.index)
                if track is not None:
                    track["frames"] += 1
                    track["bytes"] += packet.size
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        log.warning("recording %s: could not read it completely: %s", path, exc)
    duration = None if last is None else round(last - min(first or 0.0, 0.0), 3)
    return duration, list(tracks.values())


def store_files_sync(
    db: sqlite_utils.Database, data_dir: Path, visit_id: int, files: list[dict[str, Any]], now: float
) -> int:
    """Rows for the files a `recording_stopped` event reports; returns bytes. A file whose write
    failed (the recorder says `complete: false`, e.g. disk full) is stored as incomplete."""
    total = 0
    for f in files:
        seat = str(f.get("role"))
        role = ROLE_OF_SEAT.get(seat)
        if role is None:
            continue
        try:
            relative = _relative(data_dir, f["path"])
        except (KeyError, ValueError):
            log.error("recording outside the data directory ignored: %r", f.get("path"))
            continue
        size = int(f.get("size") or 0)
        total += size
        complete = 0 if f.get("complete") is False else 1
        if not complete:
            log.error(
                "recording %s stored as incomplete: %s", relative, f.get("error") or "the recorder failed"
            )
        db.execute(
            "INSERT INTO recordings (visit_id, role, path, tracks, started_at, duration_s, size, sha256,"
            " created, complete) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET"
            " tracks = excluded.tracks, started_at = excluded.started_at, duration_s = excluded.duration_s,"
            " size = excluded.size, sha256 = excluded.sha256, complete = excluded.complete",
            [
                visit_id,
                role,
                relative,
                json.dumps(f.get("tracks") or [], default=str),
                f.get("started_at"),
                f.get("duration_s"),
                size,
                f.get("sha256"),
                now,
                complete,
            ],
        )
    return total


@dataclass(frozen=True)
class Interrupted:
    """A file on disk that start-up recovery has not dealt with yet."""

    visit_id: int
    role: str
    path: Path
    relative: str


def interrupted_sync(
    db: sqlite_utils.Database, data_dir: Path, *, live_grace_s: float = 0.0
) -> list[Interrupted]:
    """On a reader, quick: the files that need recovery. A file needs it when it has no row (the
    server died while recording) or an incomplete row never repaired (a write failed, or an older
    version stored it); a repaired or complete file is never read again.

    With `live_grace_s` (a directory shared by several nodes), a file written to within that
    many seconds is left alone: another node may be recording into it right now."""
    root = root_dir(data_dir)
    if not root.is_dir():
        return []
    written_before = time.time() - live_grace_s
    done = {
        r[0]
        for r in db.execute(
            "SELECT path FROM recordings WHERE complete = 1 OR repaired_at IS NOT NULL"
        ).fetchall()
    }
    found: list[Interrupted] = []
    for room in sorted(p for p in root.iterdir() if p.is_dir() and _ROOM_DIR_RE.fullmatch(p.name)):
        visit = db.execute("SELECT id FROM visits WHERE public_id = ?", [room.name]).fetchone()
        if visit is None:
            continue
        for path in sorted(room.iterdir()):
            match = _FILE_RE.fullmatch(path.name)
            if match is None or not path.is_file() or path.is_symlink():
                continue
            relative = _relative(data_dir, path)
            if live_grace_s and path.stat().st_mtime > written_before:
                continue
            if relative not in done:
                found.append(Interrupted(visit[0], ROLE_OF_SEAT[match.group(1)], path, relative))
    return found


def repair_file(path: Path) -> bool:
    """Rewrite a file cut by a crash (or a failed write) into a finished one: the same packets,
    remuxed up to the first unreadable byte, closed properly so that it has its duration and
    cues (the seek index). The new file replaces the old one atomically; False (and the file
    untouched) if nothing could be read. Blocking: run it in a thread."""
    import av

    # Not a recording name (never picked up), and no other node's: two nodes starting at once
    # may both repair the same file; each writes its own copy and the last rename wins.
    repaired = temp_name(path)
    packets = 0
    try:
        with av.open(str(path)) as source:
            streams = [s for s in source.streams if s.type in ("audio", "video")]
            if not streams:
                raise ValueError("no audio or video stream")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(repaired, flags, 0o600), "wb") as fh:
                fmt = "webm" if path.suffix == ".webm" else "matroska"
                with av.open(fh, "w", format=fmt) as out:
                    mapping = {s.index: out.add_stream_from_template(s) for s in streams}
                    try:
                        for packet in source.demux(streams):
                            if packet.dts is None or packet.size == 0:
                                continue
                            packet.stream = mapping[packet.stream.index]
                            out.mux(packet)
                            packets += 1
                    except (av.FFmpegError, EOFError) as exc:
                        log.info("recording %s: readable up to packet %d (%s)", path, packets, exc)
                fh.flush()
                os.fsync(fh.fileno())
        if packets == 0:
            raise ValueError("no readable packet")
        os.replace(repaired, path)
        _fsync_dir(path.parent)
        return True
    except (av.FFmpegError, OSError, ValueError) as exc:
        log.error("recording %s: could not repair it, kept as it is: %s", path, exc)
        repaired.unlink(missing_ok=True)
        return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_files(found: list[Interrupted], now: float) -> list[dict[str, Any]]:
    """Off the database threads: repair each file once, then read its size, SHA-256, duration
    and tracks (the row's values, describing the repaired file)."""
    out: list[dict[str, Any]] = []
    for item in found:
        try:
            created = item.path.stat().st_mtime  # when the recording was last written, not now
            before = item.path.stat().st_size
            repaired = repair_file(item.path)
            size, digest = sha256_file(item.path)
        except OSError as exc:  # gone or unreadable: nothing to store, tried again next start
            log.error("recording %s: could not read it: %s", item.path, exc)
            continue
        duration, tracks = probe(item.path)
        log.warning(
            "recording %s interrupted: %s (%d bytes, now %d bytes, %s s), stored as incomplete",
            item.relative,
            "repaired" if repaired else "not repairable",
            before,
            size,
            duration,
        )
        out.append(
            {
                "visit_id": item.visit_id,
                "role": item.role,
                "path": item.relative,
                "tracks": json.dumps(tracks),
                "duration_s": duration,
                "size": size,
                "sha256": digest,
                "created": created,
                "repaired_at": now,
            }
        )
    return out


def find_interrupted_sync(db: sqlite_utils.Database, data_dir: Path) -> list[dict[str, Any]]:
    """Both reading steps in one call (CLI and tests); the app runs them apart, the file work
    off the database threads."""
    return recover_files(interrupted_sync(db, data_dir), time.time())


def store_interrupted_sync(db: sqlite_utils.Database, found: list[dict[str, Any]]) -> list[str]:
    """In the writer: a row (complete = 0, repaired) for each file ``recover_files`` returned;
    an incomplete row takes the repaired file's values. Returns the relative paths touched."""
    for item in found:
        db.execute(
            "INSERT INTO recordings (visit_id, role, path, tracks, started_at, duration_s, size, sha256,"
            " created, complete, repaired_at) VALUES (:visit_id, :role, :path, :tracks, NULL, :duration_s,"
            " :size, :sha256, :created, 0, :repaired_at) ON CONFLICT(path) DO UPDATE SET"
            " tracks = excluded.tracks, duration_s = excluded.duration_s, size = excluded.size,"
            " sha256 = excluded.sha256, repaired_at = excluded.repaired_at WHERE recordings.complete = 0",
            item,
        )
    return [item["path"] for item in found]


def recover_sync(db: sqlite_utils.Database, data_dir: Path) -> list[str]:
    """Both steps in one connection, for the CLI and tests."""
    return store_interrupted_sync(db, find_interrupted_sync(db, data_dir))


def for_visit_sync(db: sqlite_utils.Database, visit_id: int) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT id, role, path, tracks, started_at, duration_s, size, sha256, created, complete"
        " FROM recordings WHERE visit_id = ? ORDER BY id",
        [visit_id],
    ).fetchall()
    keys = ("id", "role", "path", "tracks", "started_at", "duration_s", "size", "sha256", "created")
    keys += ("complete",)
    out = []
    for row in rows:
        item = dict(zip(keys, row, strict=True))
        item["tracks"] = json.loads(item["tracks"] or "[]")
        out.append(item)
    return out


# -- retention --------------------------------------------------------------------------------


def purge(
    database: Database,
    data_dir: Path,
    older_than_days: float,
    *,
    dry_run: bool,
    now: float,
    actor: str = "cli",
) -> list[dict[str, Any]]:
    """Delete recordings created more than `older_than_days` ago: the file, then its row with
    an audit entry (`recording.delete`) in the same transaction, one recording at a time."""
    cutoff = now - older_than_days * 86400
    keys = ("id", "visit_id", "role", "path", "size", "sha256", "created", "patient_id")

    def find(db: sqlite_utils.Database) -> list[dict[str, Any]]:
        rows = db.execute(
            "SELECT r.id, r.visit_id, r.role, r.path, r.size, r.sha256, r.created, v.patient_id"
            " FROM recordings r JOIN visits v ON v.id = r.visit_id WHERE r.created < ? ORDER BY r.id",
            [cutoff],
        ).fetchall()
        return [dict(zip(keys, r, strict=True)) for r in rows]

    found = database.read_sync(find)
    if dry_run:
        return found
    for item in found:
        try:
            path = stored_path(data_dir, item["path"])
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the visit's directory, once empty
        except ValueError:
            log.error("recording %s: path outside recordings/, only the row is removed", item["id"])

        def delete(db: sqlite_utils.Database, item: dict[str, Any] = item) -> None:
            db.execute("DELETE FROM recordings WHERE id = ?", [item["id"]])
            audit.record(
                db,
                "recording.delete",
                "recording",
                item["id"],
                role=actor,
                subject_user_id=item["patient_id"],
                detail={
                    "visit_id": item["visit_id"],
                    "role": item["role"],
                    "path": item["path"],
                    "size": item["size"],
                    "sha256": item["sha256"],
                    "reason": "retention",
                    "older_than_days": older_than_days,
                },
            )

        database.write_sync(delete)
    return found


def file_mode_ok(path: Path) -> bool:
    return (os.stat(path).st_mode & 0o077) == 0
