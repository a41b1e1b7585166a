"""What ``/healthz`` reports: the writer's state, reads, and free space under the data directory.

Unhealthy (503) when the writer is not connected (it is retrying; writes fail fast meanwhile),
when a read fails, or when the data directory's disk has less free space than
``disk_min_free_mb``: a full disk turns every write into a 507, so it is reported before then.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from consult.core.db import Database

MB = 1024 * 1024
FIRST_CONNECT_WAIT_S = 1.0


def disk_status(data_dir: Path, min_free_mb: float) -> dict[str, Any]:
    usage = shutil.disk_usage(data_dir)
    min_free = int(min_free_mb * MB)
    return {
        "ok": usage.free >= min_free,
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "min_free_bytes": min_free,
    }


async def check(db: Database, data_dir: Path, min_free_mb: float) -> tuple[bool, dict[str, Any]]:
    """``(healthy, report)``; never raises."""
    db.start_writer()
    if not db.writer_attempted.is_set():  # a writer just started: let it try to connect once
        await asyncio.to_thread(db.writer_attempted.wait, FIRST_CONNECT_WAIT_S)
    writer = db.status.as_dict()
    # /healthz needs no sign-in: the error's text (it may name paths) goes to the log, not here.
    writer.pop("error", None)
    writer["ok"] = writer["state"] == "up"

    reads: dict[str, Any] = {"ok": True}
    try:
        await db.query_one("SELECT 1")
    except Exception as exc:
        reads = {"ok": False, "error": type(exc).__name__}

    try:
        disk = await asyncio.to_thread(disk_status, data_dir, min_free_mb)
    except OSError as exc:
        disk = {"ok": False, "error": exc.strerror or type(exc).__name__}

    healthy = writer["ok"] and reads["ok"] and disk["ok"]
    return healthy, {"ok": healthy, "writer": writer, "reads": reads, "disk": disk}
