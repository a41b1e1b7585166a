"""Programs and fonts the tests need, and the Debian package each comes from.

These dicts are the one list: scripts/install-test-deps.sh (run by `make test` and `.ci/run`)
reads them and installs whatever is missing, so keep one `"name": "package",` entry a line
(tests/test_install_deps.py checks that the script reads exactly these).

A run that includes browser or WebRTC tests checks all of them when it starts (tests/conftest.py:
`missing_packages`) and stops naming the packages to install; a test that needs a program calls
`require_program(name)`, which fails the same way instead of a bare FileNotFoundError deep
inside a fixture.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

# program -> Debian package
PROGRAMS = {
    "chromium": "chromium",
    "firefox-esr": "firefox-esr",  # the second engine (tests/harness/firefox.py)
    "turnserver": "coturn",
    "ip": "iproute2",
    "iptables": "iptables",
    "nginx": "nginx",
    "fc-list": "fontconfig",  # the font check below
    "setpriv": "util-linux",  # tests/test_architecture.py: unit tests run without root's capabilities
}

# fontconfig language -> Debian package with a font for it (any installed font for it will do):
# Chinese pages must render as text, not boxes, in screenshots.
FONTS = {
    "zh-cn": "fonts-wqy-microhei",
}

INSTALL_HINT = "`make test` as root installs it (scripts/install-test-deps.sh)"
_SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])


def find_program(name: str) -> str | None:
    """On PATH, or in an sbin directory (not on an ordinary user's PATH: nginx, iptables)."""
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def require_program(name: str) -> str:
    """The program's path, or a clear test failure naming the package that provides it."""
    path = find_program(name)
    if path is None:
        package = PROGRAMS.get(name, name)
        pytest.fail(f"`{name}` is not installed: `apt-get install {package}`; {INSTALL_HINT}", pytrace=False)
    return path


def missing_packages() -> list[str]:
    """The packages of PROGRAMS and FONTS this machine lacks (what the script would install)."""
    missing = [package for name, package in PROGRAMS.items() if find_program(name) is None]
    missing += [package for language, package in FONTS.items() if not has_font(language)]
    return list(dict.fromkeys(missing))


def has_font(language: str) -> bool:
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return False
    found = subprocess.run([fc_list, f":lang={language}", "family"], capture_output=True, text=True)
    return found.returncode == 0 and bool(found.stdout.strip())


def require_font(language: str) -> None:
    """Fail clearly when no font can show `language` (screenshots would show boxes)."""
    if not has_font(language):
        package = FONTS.get(language, f"a font for {language}")
        pytest.fail(f"no font for {language}: `apt-get install {package}`; {INSTALL_HINT}", pytrace=False)
