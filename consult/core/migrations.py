"""Named schema migrations, applied in order at start; never edit one once applied.

Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with the row that
records it, so a failed migration leaves the database as it was.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from consult.core.db import Database
from consult.core.engine import database_path, open_database

log = logging.getLogger(__name__)
Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(name: str) -> Callable[[Migration], Migration]:
    def register(fn: Migration) -> Migration:
        if any(n == name for n, _ in MIGRATIONS):
            raise ValueError(f"duplicate migration {name}")
        MIGRATIONS.append((name, fn))
        return fn

    return register


def run_script(db: sqlite_utils.Database, script: str) -> None:
    """Execute statements one by one: ``executescript`` would COMMIT our transaction."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            db.execute(buffer)
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()[:60]}")


@migration("0001_initial")
def m0001_initial(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('patient', 'doctor', 'admin')),
            username TEXT UNIQUE,
            phone TEXT UNIQUE,
            display_name TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            locale TEXT,
            active INTEGER NOT NULL DEFAULT 1,
            created REAL NOT NULL,
            password_changed REAL NOT NULL,
            CHECK (username IS NOT NULL OR phone IS NOT NULL)
        );
        CREATE TABLE sessions (
            token_hash TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            created REAL NOT NULL,
            last_seen REAL NOT NULL,
            remote TEXT,
            user_agent TEXT
        );
        CREATE INDEX sessions_user ON sessions(user_id);
        CREATE TABLE login_failures (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX login_failures_key ON login_failures(key, at);
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            channel TEXT NOT NULL,
            recipient TEXT NOT NULL,
            subject TEXT NOT NULL,
            body TEXT NOT NULL,
            created REAL NOT NULL
        );
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            created REAL NOT NULL,
            actor_id INTEGER,
            actor_role TEXT,
            remote TEXT,
            action TEXT NOT NULL,
            object_type TEXT NOT NULL,
            object_id TEXT,
            subject_user_id INTEGER,
            detail TEXT NOT NULL DEFAULT '{}',
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE INDEX audit_subject ON audit_log(subject_user_id, id);
        CREATE INDEX audit_actor ON audit_log(actor_id, id);
        """,
    )


def _ensure_table(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")


def applied(db: sqlite_utils.Database) -> list[str]:
    _ensure_table(db)
    return [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY applied_at, name").fetchall()]


# PostgreSQL starts from the schema these migrations build (made on SQLite, translated once by
# `consult.core.pg.schema_statements`); migrations after it run on both engines, so they must be
# written in the portable subset (CREATE TABLE/INDEX, ALTER TABLE ADD COLUMN, plain DML).
PG_BASELINE = "0019_clinic_board"


def sqlite_image(upto: str = PG_BASELINE) -> sqlite3.Connection:
    """An empty in-memory SQLite database with every migration up to ``upto`` applied."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    db = sqlite_utils.Database(conn)
    for name, fn in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        fn(db)
        conn.execute("COMMIT")
        if name == upto:
            break
    return conn


def _pg_baseline(db: Any) -> list[str]:
    """Create PostgreSQL's schema up to `PG_BASELINE` if it is not there; the names applied."""
    from consult.core.pg import schema_statements

    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    if db.execute("SELECT 1 FROM _migrations LIMIT 1").fetchone():
        return []
    image = sqlite_image()
    try:
        statements = schema_statements(image)
    finally:
        image.close()
    for sql in statements:
        db.execute(sql)
    names = []
    now = time.time()
    for name, _fn in MIGRATIONS:
        db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", [name, now])
        names.append(name)
        if name == PG_BASELINE:
            break
    return names


def migrate(target: Path | Database) -> list[str]:
    """Apply pending migrations to a SQLite file or an open `Database`; the names applied now."""
    if isinstance(target, Database):
        database, owned = target, False
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        database, owned = Database(target), True
    try:
        now_applied: list[str] = []
        if database.engine == "postgresql":
            now_applied += database.write_sync(_pg_baseline)
        done = set(database.read_sync(applied))
        for name, fn in MIGRATIONS:
            if name in done:
                continue

            def step(db: sqlite_utils.Database, fn: Migration = fn, name: str = name) -> bool:
                # Under the write lock: another node may have applied it a moment ago.
                if db.execute("SELECT 1 FROM _migrations WHERE name = ?", [name]).fetchone():
                    return False
                fn(db)
                db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", [name, time.time()])
                return True

            if database.write_sync(step):
                now_applied.append(name)
        return now_applied
    finally:
        if owned:
            database.close()


def migrate_settings(settings: Any) -> list[str]:
    """Apply pending migrations to the database `settings` name (SQLite file or PostgreSQL)."""
    if not getattr(settings, "database_url", ""):
        return migrate(database_path(settings))
    database = open_database(settings)
    try:
        return migrate(database)
    finally:
        database.close()


@migration("0002_booking")
def m0002_booking(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        CREATE TABLE departments (
            id INTEGER PRIMARY KEY,
            code TEXT NOT NULL UNIQUE,
            name_zh TEXT NOT NULL,
            name_en TEXT NOT NULL,
            description_zh TEXT NOT NULL DEFAULT '',
            description_en TEXT NOT NULL DEFAULT '',
            active INTEGER NOT NULL DEFAULT 1,
            sort INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE doctors (
            user_id INTEGER PRIMARY KEY REFERENCES users(id),
            title_zh TEXT NOT NULL DEFAULT '',
            title_en TEXT NOT NULL DEFAULT '',
            bio_zh TEXT NOT NULL DEFAULT '',
            bio_en TEXT NOT NULL DEFAULT '',
            fee_minor INTEGER NOT NULL DEFAULT 5000 CHECK (fee_minor >= 0),
            currency TEXT NOT NULL DEFAULT 'CNY',
            visit_minutes INTEGER NOT NULL DEFAULT 15 CHECK (visit_minutes BETWEEN 5 AND 120),
            active INTEGER NOT NULL DEFAULT 1
        );
        CREATE TABLE doctor_departments (
            doctor_id INTEGER NOT NULL REFERENCES doctors(user_id) ON DELETE CASCADE,
            department_id INTEGER NOT NULL REFERENCES departments(id) ON DELETE CASCADE,
            PRIMARY KEY (doctor_id, department_id)
        );
        -- Weekly template: weekday 0 = Monday; times are local to the hospital's time zone.
        CREATE TABLE schedule_templates (
            id INTEGER PRIMARY KEY,
            doctor_id INTEGER NOT NULL REFERENCES doctors(user_id) ON DELETE CASCADE,
            weekday INTEGER NOT NULL CHECK (weekday BETWEEN 0 AND 6),
            start_local TEXT NOT NULL,
            end_local TEXT NOT NULL,
            valid_from TEXT,
            valid_until TEXT,
            CHECK (start_local < end_local)
        );
        CREATE INDEX schedule_templates_doctor ON schedule_templates(doctor_id);
        -- kind 'leave' removes time (whole day when start/end are NULL); 'extra' adds a session.
        CREATE TABLE schedule_exceptions (
            id INTEGER PRIMARY KEY,
            doctor_id INTEGER NOT NULL REFERENCES doctors(user_id) ON DELETE CASCADE,
            day TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('leave', 'extra')),
            start_local TEXT,
            end_local TEXT,
            note TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX schedule_exceptions_doctor ON schedule_exceptions(doctor_id, day);
        -- A visit is a booking of one slot. Times in UTC unix seconds.
        CREATE TABLE visits (
            id INTEGER PRIMARY KEY,
            public_id TEXT NOT NULL UNIQUE,
            patient_id INTEGER NOT NULL REFERENCES users(id),
            doctor_id INTEGER NOT NULL REFERENCES doctors(user_id),
            department_id INTEGER NOT NULL REFERENCES departments(id),
            starts_at INTEGER NOT NULL,
            ends_at INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('held', 'confirmed', 'cancelled', 'expired', 'completed', 'no_show')),
            hold_expires REAL,
            fee_minor INTEGER NOT NULL,
            currency TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            cancelled_by TEXT,
            cancel_reason TEXT,
            needs_reschedule INTEGER NOT NULL DEFAULT 0,
            call_nonce TEXT NOT NULL,
            reminder_sent INTEGER NOT NULL DEFAULT 0,
            CHECK (ends_at > starts_at)
        );
        -- The database, not Python, guarantees a slot is never booked twice.
        CREATE UNIQUE INDEX visits_one_per_slot ON visits(doctor_id, starts_at)
            WHERE status IN ('held', 'confirmed', 'completed');
        CREATE INDEX visits_patient ON visits(patient_id, starts_at);
        CREATE INDEX visits_doctor_time ON visits(doctor_id, starts_at);
        CREATE INDEX visits_hold ON visits(status, hold_expires);
        CREATE TABLE reports (
            id INTEGER PRIMARY KEY,
            visit_id INTEGER NOT NULL REFERENCES visits(id),
            owner_id INTEGER NOT NULL REFERENCES users(id),
            display_name TEXT NOT NULL,
            stored_name TEXT NOT NULL UNIQUE,
            content_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            created REAL NOT NULL
        );
        CREATE INDEX reports_visit ON reports(visit_id);
        CREATE TABLE payments (
            id INTEGER PRIMARY KEY,
            visit_id INTEGER NOT NULL REFERENCES visits(id),
            order_id TEXT NOT NULL UNIQUE,
            provider TEXT NOT NULL,
            amount_minor INTEGER NOT NULL CHECK (amount_minor >= 0),
            currency TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'refunded', 'failed', 'cancelled')),
            provider_ref TEXT,
            created REAL NOT NULL,
            paid_at REAL,
            refunded_at REAL,
            refund_minor INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX payments_visit ON payments(visit_id);
        -- Every payment event, and the gateway's notification ids (replays change nothing).
        CREATE TABLE payment_events (
            id INTEGER PRIMARY KEY,
            payment_id INTEGER REFERENCES payments(id),
            kind TEXT NOT NULL,
            notify_id TEXT UNIQUE,
            detail TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL
        );
        CREATE INDEX payment_events_payment ON payment_events(payment_id);
        """,
    )


@migration("0003_booking_extra")
def m0003_booking_extra(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- Reminders and the doctor's day look visits up by status and start time.
        CREATE INDEX visits_status_start ON visits(status, starts_at);
        """,
    )


@migration("0004_payments_extra")
def m0004_payments_extra(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- At most one open payment per visit: pressing Pay twice reuses it, never charges twice.
        CREATE UNIQUE INDEX payments_one_pending ON payments(visit_id) WHERE status = 'pending';
        -- The cashier desk lists pending payments oldest first.
        CREATE INDEX payments_status ON payments(status, created);
        """,
    )


@migration("0007_session_logs")
def m0007_session_logs(db: sqlite_utils.Database) -> None:
    # Independent of 0005_rooms: summaries are keyed by visit, fed event by event.
    run_script(
        db,
        """
        -- One row per visit room: what the admin list shows and filters on.
        CREATE TABLE session_summaries (
            visit_id INTEGER PRIMARY KEY REFERENCES visits(id) ON DELETE CASCADE,
            department_id INTEGER NOT NULL,
            doctor_id INTEGER NOT NULL,
            patient_id INTEGER NOT NULL,
            day TEXT NOT NULL,                       -- local date of scheduled_start
            scheduled_start INTEGER NOT NULL,
            room_opened REAL,
            first_joined_patient REAL,
            first_joined_doctor REAL,
            started_at REAL,
            ended_at REAL,
            end_reason TEXT CHECK (end_reason IS NULL OR end_reason IN
                ('time_limit', 'host_ended', 'patient_left', 'connection_failed', 'no_show')),
            outcome TEXT NOT NULL DEFAULT 'in_progress' CHECK (outcome IN
                ('completed', 'no_show', 'failed', 'cancelled', 'in_progress')),
            connected_seconds INTEGER NOT NULL DEFAULT 0,
            used_turn INTEGER NOT NULL DEFAULT 0,
            reconnects INTEGER NOT NULL DEFAULT 0,
            ice_restarts INTEGER NOT NULL DEFAULT 0,
            patient_device TEXT,
            doctor_device TEXT,
            recording INTEGER NOT NULL DEFAULT 0,
            -- Running state while the room is live, so each event is applied in O(1).
            patient_present INTEGER NOT NULL DEFAULT 0,
            doctor_present INTEGER NOT NULL DEFAULT 0,
            patient_left_reason TEXT,
            doctor_left_reason TEXT,
            both_since REAL,
            ice_failed INTEGER NOT NULL DEFAULT 0,
            samples INTEGER NOT NULL DEFAULT 0
        );
        -- Keyset pagination: ORDER BY scheduled_start DESC, visit_id DESC, with each filter.
        CREATE INDEX session_summaries_start ON session_summaries(scheduled_start, visit_id);
        CREATE INDEX session_summaries_doctor ON session_summaries(doctor_id, scheduled_start, visit_id);
        CREATE INDEX session_summaries_department
            ON session_summaries(department_id, scheduled_start, visit_id);
        CREATE INDEX session_summaries_outcome ON session_summaries(outcome, scheduled_start, visit_id);
        CREATE INDEX session_summaries_end_reason
            ON session_summaries(end_reason, scheduled_start, visit_id);
        CREATE INDEX session_summaries_patient ON session_summaries(patient_id, scheduled_start, visit_id);
        -- The overview aggregates by day from the index alone.
        CREATE INDEX session_summaries_day
            ON session_summaries(day, outcome, end_reason, used_turn, connected_seconds);
        -- Quality over time, one row per stats sample, compact integers.
        CREATE TABLE quality_samples (
            visit_id INTEGER NOT NULL REFERENCES visits(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('patient', 'doctor')),
            t INTEGER NOT NULL,                      -- seconds since the room's start
            bitrate_kbps INTEGER,
            loss_pct INTEGER,                        -- whole percent
            jitter_ms INTEGER,
            fps INTEGER,
            width INTEGER,
            height INTEGER,
            freezes INTEGER,
            rtt_ms INTEGER
        );
        CREATE INDEX quality_samples_visit ON quality_samples(visit_id, role, t);
        -- The audit search filters by action, object and time.
        CREATE INDEX audit_action ON audit_log(action, id);
        CREATE INDEX audit_object ON audit_log(object_type, object_id, id);
        CREATE INDEX audit_created ON audit_log(created);
        """,
    )


@migration("0006_prescriptions")
def m0006_prescriptions(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- One clinical note per visit, written by its doctor; version drives optimistic concurrency.
        CREATE TABLE visit_notes (
            visit_id INTEGER PRIMARY KEY REFERENCES visits(id) ON DELETE CASCADE,
            doctor_id INTEGER NOT NULL REFERENCES users(id),
            text TEXT NOT NULL DEFAULT '',
            advice TEXT NOT NULL DEFAULT '',           -- shown to the patient; text is not
            version INTEGER NOT NULL CHECK (version >= 1),
            created REAL NOT NULL,
            updated REAL NOT NULL
        );
        -- Prescription numbers: one counter per year, bumped inside the issuing transaction.
        CREATE TABLE prescription_counters (
            year INTEGER PRIMARY KEY,
            last INTEGER NOT NULL
        );
        CREATE TABLE prescriptions (
            id INTEGER PRIMARY KEY,
            number TEXT NOT NULL UNIQUE,
            visit_id INTEGER NOT NULL REFERENCES visits(id),
            doctor_id INTEGER NOT NULL REFERENCES users(id),
            patient_id INTEGER NOT NULL REFERENCES users(id),
            issued_at REAL NOT NULL,
            document TEXT NOT NULL,                   -- canonical JSON, byte for byte as signed
            signature TEXT NOT NULL,                  -- base64 Ed25519 signature of document
            key_id TEXT NOT NULL,
            client_ref TEXT                           -- the form's submission id: a retry is not a second Rx
        );
        CREATE INDEX prescriptions_visit ON prescriptions(visit_id, id);
        CREATE INDEX prescriptions_patient ON prescriptions(patient_id, id);
        CREATE UNIQUE INDEX prescriptions_client_ref ON prescriptions(visit_id, client_ref)
            WHERE client_ref IS NOT NULL;
        """,
    )


@migration("0005_rooms")
def m0005_rooms(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- The visit clock of each call room: written by the signaling server through
        -- consult.calls.ConsultPolicy, so that it survives reconnects and server restarts.
        CREATE TABLE rooms (
            visit_id INTEGER PRIMARY KEY REFERENCES visits(id) ON DELETE CASCADE,
            started_at REAL,
            ended_at REAL,
            end_reason TEXT,
            updated REAL NOT NULL
        );
        -- Every room event verbatim, in order: the raw timeline behind the session logs.
        CREATE TABLE session_events (
            id INTEGER PRIMARY KEY,
            visit_id INTEGER NOT NULL REFERENCES visits(id) ON DELETE CASCADE,
            created REAL NOT NULL,
            name TEXT NOT NULL,
            role TEXT,
            data TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX session_events_visit ON session_events(visit_id, created);
        """,
    )


@migration("0008_recordings")
def m0008_recordings(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- Recording policy overrides (NULL: inherit; see consult.recordings.effective_policy).
        ALTER TABLE departments ADD COLUMN recording_policy TEXT
            CHECK (recording_policy IS NULL OR recording_policy IN ('off', 'on_request', 'always'));
        ALTER TABLE doctors ADD COLUMN recording_policy TEXT
            CHECK (recording_policy IS NULL OR recording_policy IN ('off', 'on_request', 'always'));
        -- The visit's policy, fixed when the first consent answer is stored (later changes of
        -- the settings do not flip a visit in progress), and each side's answer: 1 yes, 0 no.
        ALTER TABLE visits ADD COLUMN recording TEXT
            CHECK (recording IS NULL OR recording IN ('off', 'on_request', 'always'));
        ALTER TABLE visits ADD COLUMN recording_consent_patient INTEGER
            CHECK (recording_consent_patient IS NULL OR recording_consent_patient IN (0, 1));
        ALTER TABLE visits ADD COLUMN recording_consent_doctor INTEGER
            CHECK (recording_consent_doctor IS NULL OR recording_consent_doctor IN (0, 1));
        -- One row per recorded file (one per participant leg). complete = 0: found on disk after
        -- a crash (size, hash and duration computed from the partial file at start-up).
        CREATE TABLE recordings (
            id INTEGER PRIMARY KEY,
            visit_id INTEGER NOT NULL REFERENCES visits(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('patient', 'doctor')),
            path TEXT NOT NULL UNIQUE,                -- relative to the data directory
            tracks TEXT NOT NULL DEFAULT '[]',        -- JSON, signaling.recording's track stats
            started_at REAL,
            duration_s REAL,
            size INTEGER,
            sha256 TEXT,
            created REAL NOT NULL,
            complete INTEGER NOT NULL DEFAULT 0 CHECK (complete IN (0, 1))
        );
        CREATE INDEX recordings_visit ON recordings(visit_id, id);
        CREATE INDEX recordings_created ON recordings(created);
        """,
    )


@migration("0009_login_throttle")
def m0009_login_throttle(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- One row per attempt grew without bound and was checked before it was written (a race).
        -- Its rows only ever described the last 15 minutes: nothing worth carrying over.
        DROP TABLE login_failures;
        -- Keyed counters (see consult.accounts.throttle): one row per account, account-and-address,
        -- trusted device or address, reserved in the same write that checks it and deleted once
        -- `expires` has passed.
        CREATE TABLE login_throttle (
            key TEXT PRIMARY KEY,
            failures INTEGER NOT NULL DEFAULT 0,  -- reserved tries (registrations for r: keys)
            refused INTEGER NOT NULL DEFAULT 0,   -- tries turned away while waiting
            tokens REAL,                          -- r: keys only, the registration bucket
            last_at REAL NOT NULL,
            next_at REAL NOT NULL DEFAULT 0,      -- no try before this time
            expires REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX login_throttle_expires ON login_throttle(expires);
        """,
    )


@migration("0010_reports_autoincrement")
def m0010_reports_autoincrement(db: sqlite_utils.Database) -> None:
    """Report ids are never given again after a delete: the audit trail names reports by id.

    SQLite cannot add AUTOINCREMENT to a table, so ``reports`` is rebuilt (create the new
    table, copy, drop, rename, recreate its indexes and triggers) inside this migration's
    transaction. The sequence starts above every id the table or the audit trail has ever
    named, so an id deleted before this migration is not given again either.
    """
    extras = [
        r[0]
        for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'reports' AND type IN ('index', 'trigger')"
            " AND sql IS NOT NULL ORDER BY type, name"
        ).fetchall()
    ]
    run_script(
        db,
        """
        CREATE TABLE reports_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            visit_id INTEGER NOT NULL REFERENCES visits(id),
            owner_id INTEGER NOT NULL REFERENCES users(id),
            display_name TEXT NOT NULL,
            stored_name TEXT NOT NULL UNIQUE,
            content_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            created REAL NOT NULL
        );
        INSERT INTO reports_new (id, visit_id, owner_id, display_name, stored_name, content_type, size,
            sha256, created)
            SELECT id, visit_id, owner_id, display_name, stored_name, content_type, size, sha256, created
            FROM reports ORDER BY id;
        DROP TABLE reports;
        ALTER TABLE reports_new RENAME TO reports;
        """,
    )
    for sql in extras:  # reports_visit, and whatever a later change may have added
        db.execute(sql)
    highest = db.execute(
        "SELECT max(coalesce((SELECT max(id) FROM reports), 0), coalesce((SELECT max(CAST(object_id AS"
        " INTEGER)) FROM audit_log WHERE object_type = 'report'), 0))"
    ).fetchone()[0]
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'reports'")
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('reports', ?)", [highest])
    broken = db.execute("PRAGMA foreign_key_check(reports)").fetchall()
    if broken:
        raise RuntimeError(f"reports rebuild: {len(broken)} rows break a foreign key")


@migration("0011_recordings_repaired")
def m0011_recordings_repaired(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- When start-up recovery repaired an interrupted file (finished it, with cues) and stored
        -- its values: later starts leave it alone instead of re-reading and re-hashing it.
        ALTER TABLE recordings ADD COLUMN repaired_at REAL;
        """,
    )


@migration("0012_session_end_server_restart")
def m0012_session_end_server_restart(db: sqlite_utils.Database) -> None:
    """A visit whose room a dead server left open is closed by the sweep with end reason
    ``server_restart`` (consult.calls.closing); the summaries' CHECK has to allow it.

    SQLite cannot change a CHECK in place: ``session_summaries`` is rebuilt from its own stored
    definition with the one list extended, its rows copied and its indexes recreated, inside
    this migration's transaction. Nothing references the table, so the foreign keys hold.
    """
    table_sql, *_ = db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'session_summaries'"
    ).fetchone()
    old = "'connection_failed', 'no_show')"
    if table_sql.count(old) != 1 or not table_sql.startswith("CREATE TABLE session_summaries ("):
        raise ValueError("session_summaries is not as 0007_session_logs created it")
    new_sql = table_sql.replace(old, "'connection_failed', 'no_show', 'server_restart')").replace(
        "CREATE TABLE session_summaries (", "CREATE TABLE session_summaries_new (", 1
    )
    indexes = [
        r[0]
        for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'session_summaries' AND type = 'index'"
            " AND sql IS NOT NULL ORDER BY name"
        ).fetchall()
    ]
    db.execute(new_sql)
    db.execute("INSERT INTO session_summaries_new SELECT * FROM session_summaries")
    db.execute("DROP TABLE session_summaries")
    db.execute("ALTER TABLE session_summaries_new RENAME TO session_summaries")
    for sql in indexes:
        db.execute(sql)
    run_script(
        db,
        """
        -- The sweep looks for rooms still open (started, never ended) without scanning them all.
        CREATE INDEX rooms_open ON rooms(visit_id) WHERE ended_at IS NULL;
        """,
    )


@migration("0013_jobs")
def m0013_jobs(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- Durable background work (consult.core.jobs): written in the same transaction as the fact
        -- that causes it, claimed by the worker (queued -> running, with a lease), then done, or
        -- queued again with backoff, or dead after max_attempts (kept for admins; done is pruned).
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,                        -- the same (kind, key) is never queued twice
            payload TEXT NOT NULL DEFAULT '{}',       -- JSON
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'done', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER CHECK (max_attempts IS NULL OR max_attempts >= 1),  -- NULL: the setting
            next_run_at REAL NOT NULL,
            claim TEXT,                               -- token of the current claim: a late finisher
            claimed_at REAL,                          -- whose lease was taken over records nothing
            lease_until REAL,
            last_error TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            finished_at REAL,
            UNIQUE (kind, key)
        );
        CREATE INDEX jobs_due ON jobs(status, next_run_at);
        CREATE INDEX jobs_finished ON jobs(status, finished_at);
        """,
    )


@migration("0014_session_budgets")
def m0014_session_budgets(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- What each seat of a visit's call has stored in session_events and quality_samples, so
        -- that a client cannot grow them without bound (consult.calls.policy, "budget"). seat:
        -- 'host', 'guest', or '' for events of no seat (refused joins, the room opening).
        CREATE TABLE session_budgets (
            visit_id INTEGER NOT NULL REFERENCES visits(id) ON DELETE CASCADE,
            seat TEXT NOT NULL,
            rows INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0,
            dropped INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (visit_id, seat)
        ) WITHOUT ROWID;
        """,
    )


@migration("0015_phone_codes")
def m0015_phone_codes(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- One-time codes sent by SMS (consult.accounts.codes): one row per number with a code
        -- outstanding, replaced by the next code to it and deleted once `keep_until` has passed,
        -- so a flood of numbers cannot grow the table beyond the sms_code_max_pending setting.
        CREATE TABLE phone_codes (
            phone TEXT PRIMARY KEY,
            purpose TEXT NOT NULL CHECK (purpose IN ('register', 'reset')),
            flow_hash TEXT NOT NULL,      -- the browser that asked (a cookie's hash): only it may answer
            code_hash TEXT,               -- HMAC of the code; NULL once it was used up by wrong tries
            expires REAL NOT NULL,        -- the code works until then
            attempts INTEGER NOT NULL DEFAULT 0,
            sends INTEGER NOT NULL,       -- codes sent to the number since window_start
            window_start REAL NOT NULL,
            last_sent REAL NOT NULL,
            keep_until REAL NOT NULL,     -- the row (and its send counters) is forgotten after this
            display_name TEXT,            -- register only: the account made once the code is right
            password_hash TEXT,
            locale TEXT
        ) WITHOUT ROWID;
        CREATE INDEX phone_codes_keep_until ON phone_codes(keep_until);
        """,
    )


@migration("0016_payment_events_kind")
def m0016_payment_events_kind(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- Refused gateway notifications are stored at most a few an hour and pruned by age
        -- (consult.payments.record_rejection): both questions are asked by kind and time.
        CREATE INDEX payment_events_kind ON payment_events(kind, created);
        """,
    )


@migration("0017_instance_marks")
def m0017_instance_marks(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- Durable facts about this installation itself. 'demo': the data directory was seeded by
        -- `consult demo`, so `consult serve` runs it in demo mode (core/mode.py).
        CREATE TABLE instance_marks (
            name TEXT PRIMARY KEY,
            created REAL NOT NULL
        );
        """,
    )


@migration("0018_prescription_review")
def m0018_prescription_review(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- A prescription waits for a pharmacist when review is on (setting pharmacist_review):
        -- issued = the patient sees it; pending = waiting; returned = refused with review_note.
        -- Rows written before this migration were issued at once and keep their format-1 document.
        ALTER TABLE prescriptions ADD COLUMN status TEXT NOT NULL DEFAULT 'issued'
            CHECK (status IN ('issued', 'pending', 'returned'));
        ALTER TABLE prescriptions ADD COLUMN reviewed_by INTEGER REFERENCES users(id);
        ALTER TABLE prescriptions ADD COLUMN reviewed_at REAL;
        ALTER TABLE prescriptions ADD COLUMN review_note TEXT;
        ALTER TABLE prescriptions ADD COLUMN diagnosis TEXT;   -- a copy of the document's, for lists
        CREATE INDEX prescriptions_pending ON prescriptions(status, id) WHERE status = 'pending';
        """,
    )
    # The pharmacist role. SQLite cannot alter a CHECK constraint, and rebuilding `users` would
    # fire every ON DELETE CASCADE that points at it; widening the CHECK in the stored schema is
    # the documented shortcut for loosening a constraint (sqlite.org/lang_altertable.html,
    # "making other kinds of table schema changes"): every existing row still satisfies it.
    old = "role TEXT NOT NULL CHECK (role IN ('patient', 'doctor', 'admin'))"
    new = "role TEXT NOT NULL CHECK (role IN ('patient', 'doctor', 'admin', 'pharmacist'))"
    sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'users'").fetchone()[0]
    if old not in sql:
        raise ValueError("users.role is not as migration 0001 made it; widen its CHECK by hand")
    version = db.execute("PRAGMA schema_version").fetchone()[0]
    db.execute("PRAGMA writable_schema = ON")
    try:
        db.execute(
            "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'users'",
            [sql.replace(old, new)],
        )
        db.execute(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        db.execute("PRAGMA writable_schema = OFF")


@migration("0019_clinic_board")
def m0019_clinic_board(db: sqlite_utils.Database) -> None:
    run_script(
        db,
        """
        -- When the visit's doctor last looked at its reports (their visit page or consult room):
        -- the clinic board counts reports uploaded since as new.
        CREATE TABLE report_looks (
            visit_id INTEGER PRIMARY KEY REFERENCES visits(id) ON DELETE CASCADE,
            doctor_id INTEGER NOT NULL REFERENCES users(id),
            looked_at REAL NOT NULL
        );
        -- "Running about N minutes late" for one doctor on one local day (0: on time again).
        CREATE TABLE running_late (
            doctor_id INTEGER NOT NULL REFERENCES users(id),
            day TEXT NOT NULL,
            minutes INTEGER NOT NULL CHECK (minutes >= 0),
            created REAL NOT NULL,
            PRIMARY KEY (doctor_id, day)
        );
        """,
    )


@migration("0020_room_leases")
def m0020_room_leases(db: sqlite_utils.Database) -> None:
    """Which node runs a room, and until when its lease holds (consult.calls.leases)."""
    db.execute("ALTER TABLE rooms ADD COLUMN node TEXT")
    db.execute("ALTER TABLE rooms ADD COLUMN lease_until REAL")


@migration("0021_user_search")
def m0021_user_search(db: sqlite_utils.Database) -> None:
    """An index for the admin's substring search of patients' names and numbers
    (consult.sessionlog.queries._search_targets), which scanned every account.

    SQLite: an FTS5 table with the trigram tokenizer over users' display_name and phone (its own
    copy of the text is not kept: content='users'), kept in step by triggers. It finds the
    candidates of any substring of 3 or more characters; the search still applies its LIKE to
    them, so what it finds is what the LIKE alone found. PostgreSQL: pg_trgm's GIN indexes, which
    the LIKE (ILIKE there) uses as it is; where the extension cannot be created (a role without
    the right, no contrib package) the search stays a scan, correct and slower.
    """
    if getattr(db, "engine", "sqlite") == "postgresql":
        db.execute("SAVEPOINT user_search")
        try:
            db.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except Exception as e:  # any refusal (no right, no contrib package) leaves the search a scan
            db.execute("ROLLBACK TO SAVEPOINT user_search")
            log.warning(
                "0021_user_search: pg_trgm is not available (%s); the admin's patient search scans"
                " the accounts. Later: CREATE EXTENSION pg_trgm; CREATE INDEX users_name_trgm ON users"
                " USING gin (display_name gin_trgm_ops); CREATE INDEX users_phone_trgm ON users"
                " USING gin (phone gin_trgm_ops);",
                e,
            )
            return
        db.execute("RELEASE SAVEPOINT user_search")
        db.execute("CREATE INDEX users_name_trgm ON users USING gin (display_name gin_trgm_ops)")
        db.execute("CREATE INDEX users_phone_trgm ON users USING gin (phone gin_trgm_ops)")
        return
    run_script(
        db,
        """
        CREATE VIRTUAL TABLE user_search USING fts5(
            display_name, phone, content='users', content_rowid='id', tokenize='trigram'
        );
        CREATE TRIGGER user_search_insert AFTER INSERT ON users BEGIN
            INSERT INTO user_search (rowid, display_name, phone)
                VALUES (new.id, new.display_name, new.phone);
        END;
        CREATE TRIGGER user_search_delete AFTER DELETE ON users BEGIN
            INSERT INTO user_search (user_search, rowid, display_name, phone)
                VALUES ('delete', old.id, old.display_name, old.phone);
        END;
        CREATE TRIGGER user_search_update AFTER UPDATE OF id, display_name, phone ON users BEGIN
            INSERT INTO user_search (user_search, rowid, display_name, phone)
                VALUES ('delete', old.id, old.display_name, old.phone);
            INSERT INTO user_search (rowid, display_name, phone)
                VALUES (new.id, new.display_name, new.phone);
        END;
        INSERT INTO user_search (user_search) VALUES ('rebuild');
        """,
    )
