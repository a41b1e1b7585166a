"""Pieces the HTTP benchmarks share (each benchmark is still one command of its own)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp


async def wait_ready(base: str, proc: subprocess.Popen, within: float = 60) -> None:
    """Wait until the server process answers /healthz, or fail with why it did not."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            try:
                async with s.get(base + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not become ready")
