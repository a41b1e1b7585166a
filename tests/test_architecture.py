"""The shape of the code, checked: no import cycles, layers respected, no SQL in views.

Static: every module under consult/ and signaling/ (every subfolder) is parsed, never imported.
An import inside ``if TYPE_CHECKING:`` is for type checkers only and does not count; a lazy import
inside a function does (it is still a dependency, only hidden).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("consult", "signaling")

# Packages of consult/, lowest first. A domain module may import only from its own rank or lower;
# `core` imports no domain package. Views sit on top of every domain: a view module may import
# any package's domain modules, but no other package's views. `consult.app` (the composition
# root) and `ops` (the CLI, demo data, backups) sit above them all.
LAYERS: dict[str, int] = {
    "core": 0,
    "audit": 1,
    "accounts": 1,
    "sessionlog": 1,
    "payments": 2,
    "clinical": 2,
    "booking": 3,
    "calls": 4,
    "app": 5,
    "ops": 6,
}

SQL_CALLS = {
    "execute",
    "executemany",
    "executescript",
    "query",
    "query_one",
    "insert",
    "insert_all",
    "upsert",
}
SQL_TEXT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|PRAGMA|REPLACE|CREATE|DROP|ALTER)\s")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not _type_checking_block(child):
                stack.append(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports at run time (resolved to modules, not names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from pkg import sub` depends on pkg.sub; `from pkg.mod import thing` on pkg.mod.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names
            ]
        for target in targets:
            while target and target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "consult" or len(parts) < 2 or parts[1] == "__main__":
        return None
    return parts[1]


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports_and_skips_type_checking(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from consult.core import db\n"
        "def f():\n    from consult.booking import holds\n"
    )
    modules = {"consult.core.db": path, "consult.booking.holds": path, "consult.x": path}
    assert imports_of("consult.x", path, modules) == {"consult.booking.holds"}


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycles_between_consult_packages(graph: dict[str, set[str]]) -> None:
    """Between domain modules: views sit on top of every package (a booking page may show a call
    link), so they are left out here and checked by the view rules below."""
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        source = package_of(module)
        if source is None or is_view_module(module):
            continue
        for dep in deps:
            target = package_of(dep)
            if target is not None and target != source:
                packages.setdefault(source, set()).add(target)
    cycle = find_cycle(packages)
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])


def test_every_consult_module_belongs_to_a_layer() -> None:
    for module in all_modules():
        package = package_of(module)
        if module.startswith("consult.") and module != "consult.__main__":
            assert package in LAYERS, f"{module}: add its package to LAYERS (and docs/architecture.md)"


def test_packages_import_only_their_own_layer_or_lower(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, deps in graph.items():
        source = package_of(module)
        if source is None or is_view_module(module):
            continue
        for dep in deps:
            target = package_of(dep)
            if target is not None and target != source and LAYERS[target] > LAYERS[source]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "a lower layer imports a higher one:\n" + "\n".join(wrong)


def is_view_module(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return module.startswith("consult.") and (last == "views" or last.endswith("_views"))


def test_signaling_never_imports_consult(graph: dict[str, set[str]]) -> None:
    wrong = [
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if module.split(".")[0] == "signaling"
        for dep in deps
        if dep.split(".")[0] == "consult"
    ]
    assert not wrong, wrong
    # And no string-based import either (importlib, __import__) anywhere under signaling/.
    for path in (ROOT / "signaling").rglob("*.py"):
        assert "consult" not in re.findall(r"import_module\(\s*['\"](\w+)", path.read_text()), path


def test_only_the_composition_root_imports_views(graph: dict[str, set[str]]) -> None:
    wrong = [
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if module != "consult.app"
        for dep in deps
        if (is_view_module(dep) and package_of(dep) != package_of(module))
        or (is_view_module(dep) and not is_view_module(module))
    ]
    assert not wrong, "a lower layer imports views:\n" + "\n".join(wrong)


def sql_in(path: Path) -> list[str]:
    """Where a module runs SQL itself: a cursor/sqlite-utils call, or an SQL statement literal."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in SQL_CALLS
        ):
            found.append(f"{where}:{node.lineno}: .{node.func.attr}(...)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_TEXT.match(node.value):
            found.append(f"{where}:{node.lineno}: {node.value.strip()[:40]!r}")
    return found


def test_the_sql_detector_sees_sql(tmp_path: Path) -> None:
    path = tmp_path / "views.py"
    path.write_text(
        "async def v(db):\n"
        "    await db.query('SELECT 1')\n"
        "    await db.execute_write_fn(lambda d: d.execute('x'))\n"
        "    return 'Delete this report?'\n"
    )
    found = sql_in(path)
    assert len(found) == 3 and not any("Delete" in f for f in found), found


def test_views_run_no_sql() -> None:
    views = [path for name, path in all_modules().items() if is_view_module(name)]
    assert len(views) >= 10, views
    found = [hit for path in views for hit in sql_in(path)]
    assert not found, "SQL in a view module (move it into the domain):\n" + "\n".join(found)


def test_background_jobs_start_in_the_app_factory() -> None:
    """cleanup_ctx and on_startup belong to consult.app, not to view modules."""
    for name, path in all_modules().items():
        if is_view_module(name):
            text = path.read_text(encoding="utf-8")
            assert "cleanup_ctx" not in text and "on_startup" not in text, name


def test_benchmarks_do_not_import_tests() -> None:
    for path in (ROOT / "bench").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    names = [alias.name for alias in node.names]
                assert not any(n.split(".")[0] == "tests" for n in names), path


def test_no_testing_helpers_in_production_code() -> None:
    for name in all_modules():
        assert "inmemory" not in name.replace("_", "").lower() or "testing" in name, name


def test_architecture_doc_names_every_package() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    on_disk = {p.name for p in (ROOT / "consult").iterdir() if (p / "__init__.py").exists()}
    assert on_disk == set(LAYERS) - {"app"}, on_disk
    for package in on_disk:
        assert f"consult/{package}/" in doc, f"docs/architecture.md does not describe consult/{package}/"
        assert f"{package}/" in readme, f"README's architecture section does not name {package}/"
    for module in re.findall(r"`(consult(?:/\w+)+\.py)`", doc + readme):
        assert (ROOT / module).exists(), f"docs name {module}, which does not exist"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) drops capabilities")
def test_unit_tests_need_no_root() -> None:
    """Only browser and WebRTC tests enter the private network namespace: collecting the booking
    tests without CAP_SYS_ADMIN (as an ordinary user would) needs none, and a run that would need
    it says why instead of failing obscurely."""
    env = {k: v for k, v in os.environ.items() if k != "CONSULT_TEST_NETNS"}
    drop = ["setpriv", "--bounding-set=-sys_admin,-net_admin", "--inh-caps=-sys_admin,-net_admin"]
    if os.geteuid() != 0:
        drop = []
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only"]
    unit = subprocess.run(
        [*drop, *pytest_cmd, "tests/test_booking.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "test_cancel_rules_and_refunds" in unit.stdout
    if drop:
        browser = subprocess.run(
            [*drop, *pytest_cmd, "tests/test_harness.py"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert browser.returncode != 0
        assert "must run as root" in browser.stdout + browser.stderr
