"""What `consult.core.pg.translate` rewrites in the domain's SQLite dialect for PostgreSQL, and
what it leaves alone (string literals). The statements themselves run on PostgreSQL in every
test of the suite under CONSULT_TEST_ENGINE=postgresql."""

from __future__ import annotations

import pytest

from consult.core.pg import translate


@pytest.mark.parametrize(
    ("sqlite", "postgresql"),
    [
        ("SELECT * FROM t WHERE a = ? AND b = :b", "SELECT * FROM t WHERE a = %s AND b = %(b)s"),
        ("SELECT 1 WHERE name LIKE ? ESCAPE '\\'", "SELECT 1 WHERE name ILIKE %s ESCAPE '\\'"),
        ("SELECT max(a, b), min(c, ?)", "SELECT GREATEST(a, b), LEAST(c, %s)"),
        ("SELECT group_concat(name, ', ') FROM t", "SELECT string_agg(name, ', ') FROM t"),
        (
            "SELECT sum(length(CAST(data AS BLOB)) + length(name)) FROM e",
            "SELECT sum(octet_length(data) + length(name)) FROM e",
        ),
        ("SELECT CAST(x AS REAL)", "SELECT CAST(x AS DOUBLE PRECISION)"),
        # Literals are data: neither rewritten nor taken for placeholders; % is escaped for psycopg.
        ("SELECT 'a LIKE ? :x group_concat(' || '100%'", "SELECT 'a LIKE ? :x group_concat(' || '100%%'"),
    ],
)
def test_translate(sqlite: str, postgresql: str) -> None:
    assert translate(sqlite) == postgresql
