"""The chaos run of tests/test_fault_injection.py is bench/chaos.py's, loaded from its file.

One engine for both budgets: the test runs a few kills, the benchmark many. Benchmarks never
import tests/ (test_architecture.py); the test importing the benchmark's module is the other
direction. bench/ is not a package, so the module is loaded by path under the name
``bench_chaos``; it imports only consult, signaling and third-party packages at import time.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH_CHAOS = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"


def load_chaos():
    name = "bench_chaos"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_CHAOS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


chaos = load_chaos()
