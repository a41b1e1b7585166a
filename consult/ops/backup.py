"""Consistent online backups, their verification, and restoring one into a new data directory.

A backup is taken while the server runs, in this order:

1. ``secrets.json``, ``consult.toml`` and ``keys/``: without them a restored server would mint new
   secrets (every call link dead, sessions gone) and a new prescription key.
2. The database, through SQLite's online backup API: one consistent snapshot, whatever the
   writer thread is doing meanwhile.
3. Exactly the files the *snapshot's* rows reference (``reports.stored_name``,
   ``recordings.path``): hard links when the backup is on the same file system, else copies.
   Upload temp files (``.part``, ``.clean``), recordings still being written and orphans are
   never copied, because no row names them.

A file that vanished between the snapshot and its copy is reported, never a crash. When its row
is gone from the live database too (the report was deleted after the snapshot), the snapshot is
stale and is taken again (up to ``MAX_SNAPSHOTS`` times). Everything is written into a hidden
temporary directory next to the target, fsynced, and renamed to the target only when complete:
an interrupted backup leaves no directory that looks like a backup. ``manifest.json`` lists every
file with its size and SHA-256, the database's integrity and audit-chain state, the time and the
version.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1
DB_NAME = "consult.db"
SECRETS = "secrets.json"
CONFIG = "consult.toml"
KEY_DIR = "keys"
FILE_DIRS = ("uploads", "recordings")
MAX_SNAPSHOTS = 5
CHUNK = 1 << 20
# Mirrors consult.clinical.uploads.STORED_NAME_RE and recordings' directory layout: a row that
# names anything else is reported instead of followed out of the data directory.
_REPORT_NAME_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}$")
_RECORDING_PATH_RE = re.compile(r"^recordings/[A-Za-z0-9_-]{8,64}/[A-Za-z0-9._-]{1,200}$")

Stage = Callable[[str], None]


@dataclass(frozen=True)
class Ref:
    """A file the database references: which row, where (relative to the data directory)."""

    kind: str  # "report" | "recording"
    row: int
    path: str
    sha256: str | None


@dataclass
class BackupResult:
    path: Path
    database_bytes: int
    files: int  # every file in the backup, the database and manifest excluded
    linked: int = 0
    copied: int = 0
    bytes: int = 0
    snapshots: int = 1
    seconds: float = 0.0
    integrity: str = ""
    audit: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:  # the old dict interface: result["files"]
        return getattr(self, key)


@dataclass
class VerifyResult:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


class RestoreRefused(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"the backup has {len(problems)} problem(s)")
        self.problems = problems


# -- small file helpers -----------------------------------------------------------------------


def sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file, then every directory (deepest first), so that a crash after the rename
    cannot leave a backup whose names exist but whose contents do not."""
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)


def _copy_file(src: Path, dst: Path, mode: int = 0o600) -> None:
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
    os.chmod(dst, mode)  # the umask may have narrowed it


_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}


def _link_or_copy(src: Path, dst: Path, try_link: bool) -> bool:
    """Hard link ``src`` at ``dst`` (True), or copy it (False). FileNotFoundError: it vanished."""
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if try_link:
        try:
            os.link(src, dst, follow_symlinks=False)
            return True
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
    _copy_file(src, dst)
    return False


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# -- the database -----------------------------------------------------------------------------


def _snapshot(source: Path, dst: Path) -> None:
    """One consistent copy of the live database (WAL readers never block the writer)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{dst}{suffix}").unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    out = sqlite3.connect(str(dst))
    try:
        src.backup(out)  # pages=-1: all pages in one step, under one read transaction
        # A standalone file in the backup (no -wal beside it); the server switches it back.
        out.execute("PRAGMA journal_mode = DELETE")
    finally:
        out.close()
        src.close()
    os.chmod(dst, 0o600)


def _references(conn: sqlite3.Connection) -> tuple[list[Ref], list[str]]:
    refs: list[Ref] = []
    problems: list[str] = []
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "reports" in tables:
        for row_id, name, sha in conn.execute("SELECT id, stored_name, sha256 FROM reports ORDER BY id"):
            if not isinstance(name, str) or not _REPORT_NAME_RE.match(name):
                problems.append(f"report {row_id}: stored name {name!r} is not a file name Consult makes")
                continue
            refs.append(Ref("report", row_id, f"uploads/{name}", sha))
    if "recordings" in tables:
        for row_id, path, sha in conn.execute("SELECT id, path, sha256 FROM recordings ORDER BY id"):
            if not isinstance(path, str) or not _RECORDING_PATH_RE.match(path) or ".." in path.split("/"):
                problems.append(f"recording {row_id}: path {path!r} is not under recordings/")
                continue
            refs.append(Ref("recording", row_id, path, sha))
    return refs, problems


def _row_alive(source: Path, ref: Ref) -> bool:
    """Whether the live database still has this row *for this file*: ids are reused (a report
    deleted as the newest row gives its id to the next upload), file names never are."""
    if ref.kind == "report":
        sql, name = (
            "SELECT 1 FROM reports WHERE id = ? AND stored_name = ?",
            ref.path.removeprefix("uploads/"),
        )
    else:
        sql, name = "SELECT 1 FROM recordings WHERE id = ? AND path = ?", ref.path
    conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, [ref.row, name]).fetchone() is not None
    finally:
        conn.close()


def database_health(path: Path) -> tuple[str, tuple[bool, str]]:
    """``PRAGMA integrity_check`` ("ok" or the problems) and the audit chain's verdict."""
    import sqlite_utils

    from consult.audit import chain as audit

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        integrity = "ok" if rows == ["ok"] else "; ".join(rows[:10])
        try:
            chain = audit.verify(sqlite_utils.Database(conn))
        except sqlite3.DatabaseError as exc:
            chain = (False, f"cannot read the audit log: {exc}")
    finally:
        conn.close()
    return integrity, chain


# -- backup -----------------------------------------------------------------------------------


def backup(
    data_dir: Path,
    target: Path,
    *,
    link: bool = True,
    on_stage: Stage | None = None,
    max_snapshots: int = MAX_SNAPSHOTS,
    files_dir: Path | None = None,
) -> BackupResult:
    """Back ``data_dir`` up into the new directory ``target`` (see the module's docstring).
    Uploads and recordings are read from ``files_dir`` (the `shared_dir` setting) if given; the
    backup holds them as if they were in the data directory.

    ``on_stage(name)`` is called before each step ("secrets", "database", "files", "manifest",
    "rename"); tests use it to delete files or fail at a chosen moment.
    """
    data_dir, target = Path(data_dir), Path(target)
    files_dir = Path(files_dir) if files_dir is not None else data_dir
    source_db = data_dir / DB_NAME
    if not source_db.exists():
        raise FileNotFoundError(f"no database at {source_db}; run 'consult init' first")
    if target.exists() and not _is_empty_dir(target):
        raise FileExistsError(f"{target} is not empty; choose a new directory")
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))  # mode 0700
    try:
        same_device = link and os.stat(files_dir).st_dev == os.stat(parent).st_dev
        stage = on_stage or (lambda _name: None)
        result = _fill(data_dir, tmp, target, same_device, stage, max_snapshots, files_dir)
        (on_stage or (lambda _name: None))("rename")
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)  # replaces an empty directory, refuses a non-empty one
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FileExistsError(f"{target} appeared while backing up; choose a new directory") from None
            raise
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.monotonic() - started
    return result


def _fill(
    data_dir: Path, tmp: Path, target: Path, try_link: bool, stage: Stage, max_snapshots: int, files_dir: Path
) -> BackupResult:
    from consult import __version__

    entries: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    problems: list[str] = []

    def add(relative: str, kind: str, row: int | None = None) -> tuple[int, str]:
        size, digest = sha256_file(tmp / relative)
        entries[relative] = {"path": relative, "kind": kind, "size": size, "sha256": digest}
        if row is not None:
            entries[relative]["row"] = row
        return size, digest

    # 1. What makes the data readable and the links valid: before anything refers to it.
    stage("secrets")
    for name, kind in ((SECRETS, "secrets"), (CONFIG, "config")):
        if (data_dir / name).is_file():
            _copy_file(data_dir / name, tmp / name)
            add(name, kind)
    if SECRETS not in entries:
        notes.append(
            "no secrets.json in the data directory: the secrets come from consult.toml or the"
            " environment; keep a copy of them with this backup"
        )
    keys_src = data_dir / KEY_DIR
    (tmp / KEY_DIR).mkdir(mode=0o700)
    if keys_src.is_dir():
        for path in sorted(keys_src.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.is_symlink():
                continue  # a key being written (".name.xxxx.tmp") or not ours
            mode = 0o644 if path.name.endswith(".pub.pem") else 0o600
            _copy_file(path, tmp / KEY_DIR / path.name, mode)
            add(f"{KEY_DIR}/{path.name}", "key")

    # 2 and 3. The snapshot, then the files its rows name; again if the snapshot went stale.
    source_db = data_dir / DB_NAME
    for d in FILE_DIRS:
        (tmp / d).mkdir(mode=0o700)
    linked = copied = 0
    vanished: list[Ref] = []
    refs: list[Ref] = []
    attempt = 0
    for attempt in range(1, max_snapshots + 1):
        stage("database")
        _snapshot(source_db, tmp / DB_NAME)
        conn = sqlite3.connect(f"file:{tmp / DB_NAME}?mode=ro", uri=True)
        try:
            refs, bad_rows = _references(conn)
        finally:
            conn.close()
        stage("files")
        wanted = {r.path for r in refs}
        for d in FILE_DIRS:  # files an earlier, stale snapshot wanted and this one does not
            for path in sorted((tmp / d).rglob("*"), reverse=True):
                relative = path.relative_to(tmp).as_posix()
                if path.is_file() and relative not in wanted:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        vanished = []
        for ref in refs:
            dst = tmp / ref.path
            if dst.exists():
                continue
            try:
                if _link_or_copy(files_dir / ref.path, dst, try_link):
                    linked += 1
                else:
                    copied += 1
            except FileNotFoundError:
                vanished.append(ref)
        deleted_since = [r for r in vanished if not _row_alive(source_db, r)]
        if not deleted_since or attempt == max_snapshots:
            break
        notes.append(
            f"{len(deleted_since)} file(s) were deleted with their rows after snapshot {attempt};"
            " took the snapshot again"
        )
    problems.extend(bad_rows)
    missing: list[dict[str, Any]] = []
    for ref in vanished:
        alive = _row_alive(source_db, ref)
        reason = (
            "missing from the data directory although the database lists it"
            if alive
            else "deleted from the data directory (with its row) after the last snapshot"
        )
        missing.append({"path": ref.path, "kind": ref.kind, "row": ref.row, "reason": reason})
        problems.append(f"{ref.kind} {ref.row}: {ref.path} {reason}")
    total_bytes = 0
    for ref in refs:
        if (tmp / ref.path).is_file():
            size, digest = add(ref.path, ref.kind, ref.row)
            total_bytes += size
            if ref.sha256 and ref.sha256 != digest:
                problems.append(
                    f"{ref.kind} {ref.row}: {ref.path} does not match the SHA-256 in its row"
                    " (damaged in the data directory)"
                )

    stage("manifest")
    integrity, (chain_ok, chain_message) = database_health(tmp / DB_NAME)
    if integrity != "ok":
        problems.append(f"database integrity check: {integrity}")
    if not chain_ok:
        problems.append(f"audit chain: {chain_message}")
    db_size, _digest = add(DB_NAME, "database")
    files = [e for e in entries.values() if e["kind"] != "database"]
    now = time.time()
    manifest = {
        "format": FORMAT,
        "consult_version": __version__,
        "created": now,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "source": str(data_dir.absolute()),
        "database": {
            "path": DB_NAME,
            "integrity_check": integrity,
            "audit_chain": {"ok": chain_ok, "message": chain_message},
            "snapshots": attempt,
            "reports": sum(1 for r in refs if r.kind == "report"),
            "recordings": sum(1 for r in refs if r.kind == "recording"),
        },
        "secrets_in_backup": SECRETS in entries,
        "files": sorted(entries.values(), key=lambda e: e["path"]),
        "missing": missing,
        "problems": problems,
    }
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    return BackupResult(
        path=target,
        database_bytes=db_size,
        files=len(files),
        linked=linked,
        copied=copied,
        bytes=total_bytes,
        snapshots=attempt,
        integrity=integrity,
        audit=chain_message,
        problems=problems,
        notes=notes,
    )


# -- verify -----------------------------------------------------------------------------------


def verify(backup_dir: Path) -> VerifyResult:
    """Check a backup (or a data directory) without changing it; every problem is listed."""
    backup_dir = Path(backup_dir)
    result = VerifyResult()
    if not backup_dir.is_dir():
        result.problems.append(f"{backup_dir} is not a directory")
        return result
    manifest: dict[str, Any] | None = None
    try:
        manifest = json.loads((backup_dir / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            raise ValueError("no file list")
    except FileNotFoundError:
        result.problems.append(f"no {MANIFEST}: not a complete Consult backup")
        manifest = None
    except (ValueError, OSError) as exc:
        result.problems.append(f"{MANIFEST} is unreadable: {exc}")
        manifest = None
    result.manifest = manifest
    hashes: dict[str, str] = {}
    reasons = {
        str(m.get("path")): str(m.get("reason"))
        for m in (manifest or {}).get("missing") or []
        if isinstance(m, dict)
    }

    def check(relative: str, sha: str | None, what: str) -> None:
        path = backup_dir / relative
        if relative in hashes:
            digest = hashes[relative]
        else:
            try:
                _size, digest = sha256_file(path)
            except FileNotFoundError:
                why = reasons.get(relative, "")
                result.problems.append(f"{what}: {relative} is missing" + (f" ({why})" if why else ""))
                hashes[relative] = ""
                return
            except OSError as exc:
                result.problems.append(f"{what}: {relative} cannot be read: {exc.strerror or exc}")
                hashes[relative] = ""
                return
            hashes[relative] = digest
            result.checked += 1
        if digest and sha and digest != sha:
            result.problems.append(f"{what}: {relative} does not match its SHA-256 (changed or damaged)")

    if manifest is not None:
        for entry in manifest["files"]:
            check(str(entry.get("path")), entry.get("sha256"), "manifest")
        if not manifest.get("secrets_in_backup", True):
            result.notes.append(
                "the data directory had no secrets.json: restore the secrets from where they are kept"
                " (consult.toml or the environment), or call links and sessions will not work"
            )
    if (manifest is None or manifest.get("secrets_in_backup", True)) and not (backup_dir / SECRETS).is_file():
        result.problems.append(
            "secrets.json is missing: a server restored from this would make new secrets"
            " (every call link dead, everyone signed out)"
        )
    db_path = backup_dir / DB_NAME
    if not db_path.is_file():
        result.problems.append(f"{DB_NAME} is missing")
        return result
    try:
        integrity, (chain_ok, chain_message) = database_health(db_path)
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            refs, bad_rows = _references(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        result.problems.append(f"{DB_NAME} cannot be read: {exc}")
        return result
    if integrity != "ok":
        result.problems.append(f"database integrity check failed: {integrity}")
    if chain_ok:
        result.notes.append(f"audit chain: {chain_message}")
    else:
        result.problems.append(f"audit chain broken: {chain_message}")
    result.problems.extend(bad_rows)
    for ref in refs:
        check(ref.path, ref.sha256, f"{ref.kind} {ref.row}")
    return result


# -- restore ----------------------------------------------------------------------------------


def restore(
    backup_dir: Path, data_dir: Path, *, force: bool = False, ignore_problems: bool = False
) -> tuple[VerifyResult, Path | None]:
    """Copy a verified backup into ``data_dir`` (new or empty; with ``force`` an existing one is
    moved aside, never deleted). Returns the verification and where the old directory went."""
    backup_dir, data_dir = Path(backup_dir), Path(data_dir)
    checked = verify(backup_dir)
    if checked.problems and not ignore_problems:
        raise RestoreRefused(checked.problems)
    occupied = data_dir.exists() and not _is_empty_dir(data_dir)
    if occupied and not force:
        raise FileExistsError(
            f"{data_dir} is not empty; restore into a new directory, or pass --force to move it aside"
        )
    parent = data_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restoring-", dir=parent))
    try:
        for dirpath, _dirnames, filenames in os.walk(backup_dir):
            for name in filenames:
                src = Path(dirpath) / name
                relative = src.relative_to(backup_dir)
                if relative.as_posix() == MANIFEST or src.is_symlink():
                    continue
                public = relative.parts[0] == KEY_DIR and name.endswith(".pub.pem")
                _copy_file(src, tmp / relative, 0o644 if public else 0o600)
        for d in (KEY_DIR, *FILE_DIRS):
            (tmp / d).mkdir(mode=0o700, exist_ok=True)
        for dirpath, _dirnames, _filenames in os.walk(tmp):
            os.chmod(dirpath, 0o700)
        _fsync_tree(tmp)
        moved: Path | None = None
        if occupied:
            moved = parent / f"{data_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(data_dir, moved)
        elif data_dir.exists():
            data_dir.rmdir()
        os.rename(tmp, data_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        os.chmod(data_dir, 0o700)
    return checked, moved
