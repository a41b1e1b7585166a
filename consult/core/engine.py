"""Which database a deployment uses: SQLite in the data directory, or PostgreSQL by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from consult.core.db import Database
from consult.core.pg import PgDatabase


def database_path(settings: Any) -> Path:
    """Where the embedded SQLite database lives (used when ``database_url`` is empty)."""
    return Path(settings.data_dir) / "consult.db"


def open_database(settings: Any, **kwargs: Any) -> Database:
    """The database `settings` name: PostgreSQL when ``database_url`` is set, else SQLite."""
    url = getattr(settings, "database_url", "")
    if url:
        return PgDatabase(url, **kwargs)
    return Database(database_path(settings), **kwargs)
