"""`consult migrate-to-postgres`: a SQLite deployment copied into PostgreSQL, checked, and served.

The source is a real data directory made through the product (accounts, a clinic, a booking, the
audit trail); the target a fresh database on the harness's throwaway PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from consult.audit import chain as audit
from consult.core.engine import database_path, open_database
from consult.core.pg import PgDatabase
from consult.ops.to_postgres import CopyError, copy_sqlite_to_postgres
from tests.booking_helpers import free_slots, make_clinic

# The source is a SQLite deployment and the target this module's own PostgreSQL database, on
# either engine's run; it runs in the SQLite pass (`make test` leaves it out of the second).
pytestmark = pytest.mark.sqlite_only("copies a SQLite deployment; its PostgreSQL target is its own")


@pytest.fixture
def sqlite_settings(make_settings):
    return make_settings(database_url="")  # a single-node deployment, whatever the suite's engine


@pytest.fixture
def deployment(sqlite_settings, make_user):
    from consult import booking

    clinic = make_clinic(sqlite_settings, make_user, doctors=2)
    patient = make_user("patient", login="13900000077", name="王小明")
    slot = free_slots(sqlite_settings, clinic.doctor_ids[0], 7200)[0]
    db = open_database(sqlite_settings)
    try:
        from consult.accounts.users import User

        def hold(d):
            user = User.from_row(d.execute("SELECT * FROM users WHERE id = ?", [patient]).fetchone())
            return booking.hold_sync(
                d,
                patient=user,
                doctor_id=clinic.doctor_ids[0],
                department_id=clinic.department_id,
                starts_at=slot.starts_at,
                now=slot.starts_at - 7200,
                tz=sqlite_settings.timezone,
                lead_s=0,
                hold_s=900,
                remote="203.0.113.9",
            )

        visit = db.write_sync(hold)
    finally:
        db.close()
    return {"path": database_path(sqlite_settings), "visit": visit, "clinic": clinic}


def counts(db, tables):
    sql = 'SELECT count(*) FROM "{}"'
    return {t: db.read_sync(lambda d, t=t: d.execute(sql.format(t)).fetchone()[0]) for t in tables}


def test_a_deployment_is_copied_whole_and_checked(deployment, postgres_url, sqlite_settings):
    report = copy_sqlite_to_postgres(deployment["path"], postgres_url)
    assert report.tables["visits"] == 1 and report.tables["users"] >= 4
    assert report.tables["audit_log"] > 0
    assert report.audit.startswith(str(report.tables["audit_log"])) or report.audit
    source, target = open_database(sqlite_settings), PgDatabase(postgres_url)
    try:
        assert counts(source, report.tables) == counts(target, report.tables)
        ok, message = target.read_sync(audit.verify)
        assert ok, message
        row = target.read_sync(
            lambda d: d.execute("SELECT public_id, status, patient_id FROM visits").fetchone()
        )
        assert row["public_id"] == deployment["visit"]["public_id"] and row["status"] == "held"
        # Ids continue after the highest copied: a new row does not collide.
        highest = target.read_sync(lambda d: d.execute("SELECT max(id) FROM users").fetchone()[0])
        new_id = target.write_sync(
            lambda d: d.execute(
                "INSERT INTO users (role, phone, display_name, password_hash, created, password_changed)"
                " VALUES ('patient', '13900000078', 'x', '!', 0, 0) RETURNING id"
            ).fetchone()[0]
        )
        assert new_id > highest
    finally:
        source.close()
        target.close()


def test_a_copy_into_a_database_with_accounts_is_refused_and_writes_nothing(deployment, postgres_url):
    copy_sqlite_to_postgres(deployment["path"], postgres_url)
    target = PgDatabase(postgres_url)
    try:
        before = target.read_sync(lambda d: d.execute("SELECT count(*) FROM audit_log").fetchone()[0])
        with pytest.raises(CopyError, match="accounts already"):
            copy_sqlite_to_postgres(deployment["path"], postgres_url)
        after = target.read_sync(lambda d: d.execute("SELECT count(*) FROM audit_log").fetchone()[0])
        assert after == before
    finally:
        target.close()


def test_the_command_copies_and_a_node_then_serves_from_postgresql(deployment, postgres_url, sqlite_settings):
    data_dir = str(sqlite_settings.data_dir)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "consult",
            "--data-dir",
            data_dir,
            "migrate-to-postgres",
            "--to",
            postgres_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "visits: 1 rows" in done.stdout and "audit trail" in done.stdout
    assert "s3cret-pw" not in done.stdout + done.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "consult",
            "--data-dir",
            data_dir,
            "migrate-to-postgres",
            "--to",
            "sqlite:///x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert bad.returncode != 0 and "postgresql://" in bad.stderr
