"""Counting what only the garbage collector could free (tests of reference cycles)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """What exists on entry is frozen (not counted) and the collector is off until exit, so
    every cycle made inside is still there for `cyclic_garbage` to find."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def cyclic_garbage() -> list:
    """Every object only the collector could free now (kept for the caller, then cleared)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
