"""Programs and fonts the tests need, and the Debian package each comes from.

These dicts are the one list: scripts/install-test-deps.sh (run by `make test` and `.ci/run`)
reads them and installs whatever is missing, so keep one `"name": "package",` entry a line
(tests/test_install_deps.py checks that the script reads exactly these). NPM_PACKAGES are the
npm packages of the tests (axe-core), installed at their pinned versions under NPM_PREFIX;
`require_npm_package(name)` fails a test that needs one with the command that installs it.

A run that includes browser or WebRTC tests checks all of them when it starts (tests/conftest.py:
`missing_packages`) and stops naming the packages to install; a test that needs a program calls
`require_program(name)`, which fails the same way instead of a bare FileNotFoundError deep
inside a fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# program -> Debian package
PROGRAMS = {
    "chromium": "chromium",
    "firefox-esr": "firefox-esr",  # the second engine (tests/harness/firefox.py)
    "turnserver": "coturn",
    "ip": "iproute2",
    "iptables": "iptables",
    "tc": "iproute2",  # tests/harness/impair.py: rate caps
    "ss": "iproute2",  # tests/harness/impair.py: resetting TCP connections
    "nginx": "nginx",
    "fc-list": "fontconfig",  # the font check below
    "setpriv": "util-linux",  # tests/test_architecture.py: unit tests run without root's capabilities
    "npm": "npm",  # installs NPM_PACKAGES below (Debian's npm brings nodejs)
    "initdb": "postgresql",  # tests/harness/postgres.py: a throwaway PostgreSQL (pg_bin_dirs)
    "pg_ctl": "postgresql",
    "haproxy": "haproxy",  # tests/harness/haproxy.py: deploy/haproxy.cfg in front of two nodes
}

# fontconfig language -> Debian package with a font for it (any installed font for it will do):
# Chinese pages must render as text, not boxes, in screenshots.
FONTS = {
    "zh-cn": "fonts-wqy-microhei",
}

# npm package -> exact version, installed with npm into NPM_PREFIX (in the repository, ignored by
# git) by the same script. The app never serves them: the harness hands them to the page itself.
NPM_PACKAGES = {
    "axe-core": "4.10.2",  # tests/harness/axe.py: WCAG checks of the patient pages
}
NPM_PREFIX = ".cache/npm"
ROOT = Path(__file__).resolve().parents[2]

INSTALL_HINT = "`make test` as root installs it (scripts/install-test-deps.sh)"
_SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
# Debian keeps PostgreSQL's server programs (initdb, pg_ctl, postgres) out of PATH, one directory
# per major version; the newest installed wins (scripts/install-test-deps.sh looks there too).


def pg_bin_dirs() -> list[str]:
    """The installed PostgreSQL versions' program directories, newest first."""
    dirs = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.is_dir()]
    dirs.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    return [str(p) for p in dirs]


def find_program(name: str) -> str | None:
    """On PATH, in an sbin directory (not on an ordinary user's PATH: nginx, iptables), or in
    PostgreSQL's versioned program directory (initdb, pg_ctl)."""
    found = shutil.which(name) or shutil.which(name, path=_SBIN)
    if found is None and pg_bin_dirs():
        found = shutil.which(name, path=os.pathsep.join(pg_bin_dirs()))
    return found


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


def npm_package_dir(name: str) -> Path:
    return ROOT / NPM_PREFIX / "node_modules" / name


def npm_version(name: str) -> str | None:
    """The version of npm package `name` installed under NPM_PREFIX, or None."""
    try:
        return json.loads((npm_package_dir(name) / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


def require_npm_package(name: str) -> Path:
    """The installed package's folder, or a clear test failure saying how to install it."""
    want = NPM_PACKAGES[name]
    have = npm_version(name)
    if have != want:
        state = "is not installed" if have is None else f"is version {have}, not {want}"
        pytest.fail(
            f"npm package {name} {state} under {NPM_PREFIX}: "
            f"`npm install --prefix {NPM_PREFIX} {name}@{want}`; {INSTALL_HINT}",
            pytrace=False,
        )
    return npm_package_dir(name)
