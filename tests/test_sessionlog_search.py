"""The admin's patient search (name, phone) with its index finds exactly what the scan found.

Migration 0021_user_search gave the search an index: an FTS5 trigram table on SQLite, pg_trgm on
PostgreSQL. `REFERENCE` is the search as it was before, a LIKE over every account; each text
below must give the same patients, in the same order, through `_search_targets` as through it,
on whichever engine the suite runs (CONSULT_TEST_ENGINE=postgresql for the second).
"""

from __future__ import annotations

import re

import pytest

from consult.accounts import users as accounts
from consult.sessionlog import queries
from tests.harness.engine import on_postgresql

# Today's search before the index (queries._search_targets of 0020), with the one change that
# the 500 it keeps are the first by id on both engines (PostgreSQL's LIMIT alone picks any 500).
REFERENCE = (
    "SELECT id FROM users WHERE role = 'patient' AND (display_name LIKE ? ESCAPE '\\'{phone})"
    " ORDER BY id LIMIT 500"
)

NAMES = [
    ("王伟", "13800000001"),
    ("王伟明", "13800000002"),
    ("李娜", "13800000003"),
    ("张三丰", "13800000004"),
    ("欧阳娜娜", "13812345678"),
    ("Li Lei", "13900000001"),
    ("LI LEI", "13900000002"),
    ("li lei", "13900000003"),
    ("Lily", "13900000004"),
    ("O'Brien", "13900000005"),
    ('Say "hi"', "13900000006"),
    ("100% Zhang", "13900000007"),
    ("100 Zhang", "13900000008"),
    ("a_b", "13900000009"),
    ("axb", "13900000010"),
    ("a%b", "13900000011"),
    ("back\\slash", "13900000012"),
    ("Émile", "13900000013"),
    ("émile", "13900000014"),
    ("ÉMILE", "13900000015"),
    ("Straße", "13900000016"),
    ("ＡＢＣ全角", "13900000017"),
    ("ａｂｃ全角", "13900000018"),
    ("\u212aelvin", "13900000019"),  # KELVIN SIGN, which Unicode folds to "k"
    ("Kelvin", "13900000020"),
    ("İstanbul", "13900000021"),
    ("istanbul", "13900000022"),
    ("Zhang Wei 张伟", "13900000023"),
    ("🙂 Smile", "13900000024"),
    ("Patient 123", "13900000025"),
    ("Patient 1234", "13900000026"),
    ("Patient 12345", "13900000027"),
    ("Ab", "13600000000"),
    ("x", "+86 137 0000 0001"),
]

TEXTS = [
    # names, whole and in part, every case
    "王伟",
    "王",
    "伟明",
    "王伟明",
    "娜娜",
    "张三丰",
    "三丰",
    "欧阳",
    "Li Lei",
    "li lei",
    "LI LEI",
    "lI lE",
    "Lei",
    "lei",
    "Li",
    "L",
    "i l",
    "Émile",
    "émile",
    "ÉMILE",
    "mile",
    "MILE",
    "émi",
    "ÉMI",
    "Emile",
    "Straße",
    "STRASSE",
    "aße",
    "ＡＢＣ",
    "ａｂｃ",
    "abc",
    "全角",
    "ｂｃ全",
    "kelvin",
    "KELVIN",
    "elv",
    "\u212aelvin",
    "\u212ael",
    "İst",
    "ist",
    "IST",
    "stanbul",
    "张伟",
    "Wei 张",
    "🙂",
    "🙂 S",
    "smile",
    "O'Brien",
    "'Br",
    'Say "hi"',
    '"hi"',
    '"',
    "Patient 123",
    "Patient 1234",
    "tient 12",
    # LIKE's own characters are themselves
    "%",
    "%%",
    "_",
    "a_b",
    "a%b",
    "100%",
    "% Z",
    "0% Zhang",
    "_b",
    "\\",
    "back\\s",
    "k\\",
    # numbers: the phone (4 or more digits once spaces, brackets, + and - go), a visit id
    "123",
    "1234",
    "12345",
    "0000",
    "000",
    "13800000001",
    "138 0000 0001",
    "(138) 0000-0001",
    "+86",
    "137 0000",
    "0000 0001",
    "86 137",
    "5678",
    "9000000",
    "13900000025",
    # nothing
    "nobody at all",
    "zzz",
    "王五",
]


@pytest.fixture
def people(database):
    def fn(db) -> dict[str, int]:
        ids = {}
        for name, phone in NAMES:
            ids[name] = accounts.create_user_sync(
                db, role="patient", display_name=name, password_hash="!", phone=phone
            )
        # Staff are never found, whatever their name.
        for n, name in enumerate(("Li Lei", "王伟", "Dr Émile")):
            accounts.create_user_sync(
                db, role="doctor", display_name=name, password_hash="!", username=f"dr{n}"
            )
        return ids

    return database.write_sync(fn)


def reference(db, q: str) -> list[int]:
    """Patient ids the pre-index search finds for ``q`` (its code, run as it was)."""
    digits = re.sub(r"[\s()+-]", "", q)
    like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    params = [like]
    phone = ""
    if digits.isdigit() and len(digits) >= 4:
        phone = " OR phone LIKE ?"
        params.append(f"%{digits}%")
    return [r[0] for r in db.execute(REFERENCE.format(phone=phone), params).fetchall()]


def both(database, q: str) -> tuple[list[int], list[int]]:
    return database.read_sync(lambda db: (queries._search_targets(db, q)[0], reference(db, q)))


def test_indexed_search_finds_what_the_scan_found(database, people):
    found_any = 0
    for q in TEXTS:
        indexed, scanned = both(database, q)
        assert indexed == scanned, q
        found_any += bool(scanned)
    assert found_any > len(TEXTS) // 2  # most texts find someone: the comparison is not of empties
    # A few answers written out, so that both sides cannot be wrong together.
    assert both(database, "Li Lei")[0] == [people["Li Lei"], people["LI LEI"], people["li lei"]]
    assert both(database, "a_b")[0] == [people["a_b"]]
    assert both(database, "100%")[0] == [people["100% Zhang"]]
    assert both(database, "王伟")[0] == [people["王伟"], people["王伟明"]]
    assert both(database, "138 0000 0001")[0] == [people["王伟"]]
    assert both(database, "émile")[0] == [people["émile"]]  # LIKE folds ASCII letters only


def test_more_than_500_matches_give_the_first_500_by_id(database):
    def fn(db) -> list[int]:
        return [
            accounts.create_user_sync(
                db, role="patient", display_name=f"Many Zhou {n}", password_hash="!", phone=f"1350000{n:04d}"
            )
            for n in range(520)
        ]

    ids = database.write_sync(fn)
    for q in ("Many Zhou", "many", "Zhou 5", "13500"):
        indexed, scanned = both(database, q)
        assert indexed == scanned, q
    assert both(database, "Many Zhou")[0] == ids[:500]


def test_index_follows_renames_new_numbers_and_deletions(database, people):
    """The triggers: the product never renames or deletes an account, an operator may."""
    wei = people["王伟"]
    database.write_sync(
        lambda db: db.execute(
            "UPDATE users SET display_name = '王小明', phone = '13711112222' WHERE id = ?", [wei]
        )
    )
    assert both(database, "王伟")[0] == [people["王伟明"]]
    assert both(database, "王小明")[0] == [wei]
    assert both(database, "1111222")[0] == [wei]
    assert both(database, "13800000001")[0] == []
    lone = database.write_sync(
        lambda db: accounts.create_user_sync(
            db, role="patient", display_name="Gone Soon", password_hash="!", phone="13612340000"
        )
    )
    assert both(database, "Gone Soon")[0] == [lone]
    database.write_sync(lambda db: db.execute("DELETE FROM users WHERE id = ?", [lone]))
    for q in ("Gone Soon", "one S", "12340000"):
        indexed, scanned = both(database, q)
        assert indexed == scanned == [], q


@pytest.mark.skipif(on_postgresql(), reason="SQLite's plan: PostgreSQL's is its planner's choice")
def test_search_asks_the_trigram_index_not_every_account(database, people):
    def plan(db, q: str) -> str:
        seen: list[str] = []
        real = db.execute

        class Spy:
            def execute(self, sql, params=()):
                if "users.id" in sql:
                    seen.append(
                        " | ".join(r[3] for r in real("EXPLAIN QUERY PLAN " + sql, params).fetchall())
                    )
                return real(sql, params)

        queries._search_targets(Spy(), q)
        return seen[0]

    long_text = database.read_sync(lambda db: plan(db, "Li Lei"))
    assert "user_search VIRTUAL TABLE" in long_text and "SCAN users" not in long_text, long_text
    short_text = database.read_sync(lambda db: plan(db, "Li"))  # 2 characters: no trigram to ask
    assert "user_search" not in short_text, short_text


@pytest.mark.skipif(not on_postgresql(), reason="PostgreSQL's indexes")
def test_postgresql_has_the_trigram_indexes(database):
    """CI's PostgreSQL (Debian's postgresql-15) ships pg_trgm: the migration made its indexes."""
    names = database.read_sync(
        lambda db: {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'users'")}
    )
    assert {"users_name_trgm", "users_phone_trgm"} <= names, names
