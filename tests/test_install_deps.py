"""scripts/install-test-deps.sh (run by `make test` and .ci/run) installs what the harness needs:
it reads tests/harness/programs.py, so the two cannot drift apart. Only --list and --check run
here: nothing is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import programs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-test-deps.sh"
BOOTSTRAP = ["program make make", "program python3 python3", "module ensurepip python3-venv"]


def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_the_script_checks_exactly_what_programs_py_lists():
    listed = run(SCRIPT, "--list")
    assert listed.returncode == 0, listed.stderr
    expected = [
        *BOOTSTRAP,
        *(f"program {name} {package}" for name, package in programs.PROGRAMS.items()),
        *(f"font {language} {package}" for language, package in programs.FONTS.items()),
        *(f"npm {name} {version}" for name, version in programs.NPM_PACKAGES.items()),
    ]
    assert listed.stdout.splitlines() == expected


def test_check_agrees_with_the_harness_and_names_what_is_missing():
    checked = run(SCRIPT, "--check")
    missing = [p for name, p in programs.PROGRAMS.items() if programs.find_program(name) is None]
    missing += [p for language, p in programs.FONTS.items() if not programs.has_font(language)]
    npm_missing = [
        f"{name}@{version}"
        for name, version in programs.NPM_PACKAGES.items()
        if programs.npm_version(name) != version
    ]
    if missing or npm_missing:
        assert checked.returncode == 1, checked.stdout
        for package in missing:
            assert f"Debian package {package}" in checked.stdout
        for package in npm_missing:
            assert f"npm package {package} under {programs.NPM_PREFIX}" in checked.stdout
    else:
        assert checked.returncode == 0, checked.stdout
        assert checked.stdout.splitlines()[-1] == "test dependencies: all present"


def test_a_missing_program_is_named_and_check_installs_nothing(tmp_path):
    # A copy of the script beside a programs.py that lists a program no machine has.
    (tmp_path / "scripts").mkdir()
    (tmp_path / "tests" / "harness").mkdir(parents=True)
    shutil.copy(SCRIPT, tmp_path / "scripts" / SCRIPT.name)
    source = (ROOT / "tests" / "harness" / "programs.py").read_text()
    source, n = re.subn(
        r"^PROGRAMS = \{\n",
        'PROGRAMS = {\n    "no-such-program-x": "no-such-package-x",\n',
        source,
        flags=re.M,
    )
    assert n == 1
    (tmp_path / "tests" / "harness" / "programs.py").write_text(source)
    checked = run(tmp_path / "scripts" / SCRIPT.name, "--check")
    assert checked.returncode == 1
    assert "MISSING  program no-such-program-x: Debian package no-such-package-x" in checked.stdout
    assert "apt-get install no-such-package-x" in checked.stdout.splitlines()[-1]
    assert "installing" not in checked.stdout


def test_make_test_and_ci_use_the_script():
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)[1]
    assert test_recipe.splitlines()[0].strip() == "bash scripts/install-test-deps.sh"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/install-test-deps.sh" in ci
    assert "apt-get" not in ci  # one place installs packages


def test_a_missing_npm_package_fails_the_test_naming_the_install_command(monkeypatch):
    monkeypatch.setitem(programs.NPM_PACKAGES, "axe-core", "0.0.1-not-this-one")
    with pytest.raises(pytest.fail.Exception) as failed:
        programs.require_npm_package("axe-core")
    message = str(failed.value)
    assert f"npm install --prefix {programs.NPM_PREFIX} axe-core@0.0.1-not-this-one" in message
    assert "scripts/install-test-deps.sh" in message
