"""The throwaway PostgreSQL of the test harness (tests/harness/postgres.py): it starts, answers
psycopg over TCP and the unix socket, gives each test its own database, and is not root."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from tests.harness.postgres import TEMPLATE_DB, PostgresServer

_seen: dict[str, str] = {}


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError(f"no Uid line for pid {pid}")


def test_a_query_works_over_tcp_and_the_socket(postgres_server: PostgresServer, postgres_url: str):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
        conn.execute("INSERT INTO t (id, note) VALUES (%s, %s)", (1, "复诊"))
        assert conn.execute("SELECT note FROM t WHERE id = 1").fetchone() == ("复诊",)
        server_version = conn.execute("SHOW server_version").fetchone()[0]
        assert int(server_version.split(".")[0]) >= 13  # DROP DATABASE ... WITH (FORCE)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    dbname = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_server.socket_url(dbname)) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)


@pytest.mark.parametrize("turn", ["first", "second"])
def test_two_tests_get_two_separate_databases(postgres_server: PostgresServer, postgres_url: str, turn: str):
    dbname = postgres_url.rsplit("/", 1)[1]
    assert dbname in postgres_server.databases()
    for other_turn, other in _seen.items():
        assert other != dbname, f"the {other_turn} test had the same database"
        assert other not in postgres_server.databases(), "the earlier test's database was not dropped"
    _seen[turn] = dbname
    with psycopg.connect(postgres_url) as conn:
        # Empty, as the template is: nothing an earlier test created is here.
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE left_behind (id INTEGER)")


def test_the_server_is_not_root(postgres_server: PostgresServer):
    assert postgres_server.pid is not None
    uid = _uid_of(postgres_server.pid)
    assert uid != 0
    if os.geteuid() == 0:
        import pwd

        assert pwd.getpwuid(uid).pw_name == "postgres"
        assert postgres_server.data_dir.stat().st_uid == uid
    with postgres_server.connect() as conn:
        assert TEMPLATE_DB in {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_a_second_server_listens_where_it_is_told_and_goes_away_when_stopped():
    server = PostgresServer(host="127.0.0.1")
    with server:
        directory = server.directory
        assert directory is not None and (directory / f".s.PGSQL.{server.port}").exists()
        name = server.create_database()
        with psycopg.connect(server.url(name)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
        pid = server.pid
    assert not server.running
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not directory.exists()
