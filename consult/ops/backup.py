"""Consistent online backup: the SQLite backup API for the database, then the files."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

FILE_DIRS = ("uploads", "recordings", "keys")
FILES = ("secrets.json", "consult.toml")


def backup(data_dir: Path, target: Path) -> dict[str, int]:
    source_db = data_dir / "consult.db"
    if not source_db.exists():
        raise FileNotFoundError(f"no database at {source_db}; run 'consult init' first")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; choose a new directory")
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    src = sqlite3.connect(str(source_db))
    dst = sqlite3.connect(str(target / "consult.db"))
    try:
        with dst:
            src.backup(dst)
    finally:
        dst.close()
        src.close()
    copied = 0
    for name in FILE_DIRS:
        d = data_dir / name
        if d.is_dir():
            shutil.copytree(d, target / name, copy_function=shutil.copy2)
            copied += sum(1 for p in (target / name).rglob("*") if p.is_file())
    for name in FILES:
        if (data_dir / name).is_file():
            shutil.copy2(data_dir / name, target / name)
            copied += 1
    return {"database_bytes": (target / "consult.db").stat().st_size, "files": copied}
