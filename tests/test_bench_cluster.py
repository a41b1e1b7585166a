"""bench/cluster.py is runnable: `--help` loads every module it needs (bench/cluster_parts.py,
bench/booking.py, consult) and says what each figure measures. The run itself is a benchmark
(PostgreSQL, HAProxy, two nodes, minutes on two cores): not part of the suite."""

from __future__ import annotations

import subprocess
import sys

from tests.harness.server import REPO_ROOT


def test_cluster_bench_help_names_every_figure():
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "cluster.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for figure in (
        "bookings_per_s_1_node",
        "bookings_per_s_2_nodes",
        "double_bookings_",
        "relay_p99_ms_1_node",
        "relay_p99_ms_2_nodes",
        "failover_haproxy_down_s",
        "failover_first_readmitted_s",
        "failover_s",
        "--quick",
    ):
        assert figure in done.stdout, figure


RENDER = """
import sys
sys.path.insert(0, "bench")
from pathlib import Path
from cluster_parts import render_config
print(render_config(host="127.0.0.1", port=8443, redirect_port=8080, pem=Path("/x.pem"),
                    nodes=[("127.0.0.1", 9001), ("127.0.0.1", 9002)]))
"""


def test_cluster_bench_renders_the_shipped_haproxy_config():
    """The benchmark's copy of the harness's rendering still finds every line it replaces (in a
    process of its own: bench/ modules import each other by bare names such as `common`)."""
    done = subprocess.run(
        [sys.executable, "-c", RENDER],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "bind 127.0.0.1:8443 ssl crt /x.pem" in done.stdout
    assert done.stdout.count("server node2 127.0.0.1:9002 check") == 2
