"""Programs the tests run, and the Debian package that `.ci/run` installs each from.

A test that needs one calls `require_program(name)`: when it is missing, the test fails saying
which package to install, instead of a bare FileNotFoundError deep inside a fixture.
"""

from __future__ import annotations

import shutil

import pytest

# program -> Debian package; `.ci/run` installs exactly these (tests/test_ci.py keeps them in step).
PROGRAMS = {
    "chromium": "chromium",
    "turnserver": "coturn",
    "ip": "iproute2",
    "iptables": "iptables",
}


def require_program(name: str) -> str:
    """The program's path, or a clear test failure naming the package that provides it."""
    path = shutil.which(name)
    if path is None:
        package = PROGRAMS.get(name, name)
        pytest.fail(
            f"`{name}` is not installed: `apt-get install {package}` (.ci/run installs it on CI)",
            pytrace=False,
        )
    return path
