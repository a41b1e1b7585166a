"""bench/surge.py, small: a real server, a few dozen patients racing for a handful of slots.
Every slot is booked once (counted in the database), nobody gets an error, losers get clear
refusals or the "no time left" page, and the figures issue 15 asks for are in the JSON line.
The full surge (5,000 patients) is a benchmark, not part of the suite."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness.server import REPO_ROOT


def test_a_small_surge_books_every_slot_once_without_errors():
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "surge.py"),
            *("--patients", "80", "--slots", "12", "--window", "1", "--connections", "40"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["booked"] == 12 and result["slots_left"] == 0
    assert result["double_bookings"] == 0 and result["acked_missing"] == 0
    assert result["errors"] == 0 and result["starved"] == 0
    assert result["requests"]["page"] == 80 and result["requests"]["hold"] >= 12
    assert result["server_cpu_ms_per_request"] > 0
    for key in ("refused", "p50_ms", "p99_ms", "page_p99_ms", "load_before", "load_after"):
        assert key in result, key
