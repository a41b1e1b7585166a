"""Move the whole test run into a private network namespace.

Browser and WebRTC tests must never reach a real network (Chromium calls Google on its own,
aiortc defaults to a public STUN server). The test process unshares its network namespace
before any thread starts, so every thread and child process (the server, Chromium, coturn)
inherits it. Inside: loopback plus a port-less bridge with 10.99.0.1/24, which gives aioice and
Chromium a non-loopback address to gather host candidates from.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

CLONE_NEWNET = 0x40000000
BRIDGE = "br0"
BRIDGE_ADDR = "10.99.0.1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def enter_private_netns() -> str:
    """Unshare the network namespace of this process; return the bridge address."""
    if os.environ.get("CONSULT_TEST_NETNS") == os.getpid().__str__():
        return BRIDGE_ADDR
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(
            f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}; the tests must run as root "
            "(or with CAP_SYS_ADMIN) so that they can never reach a real network"
        )
    _ip("link", "set", "lo", "up")
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    os.environ["CONSULT_TEST_NETNS"] = str(os.getpid())
    return BRIDGE_ADDR
