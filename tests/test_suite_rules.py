"""Rules of the suite itself, checked on its source."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def suite_files() -> list[str]:
    found = []
    for folder, _, files in os.walk(TESTS):
        found += [
            os.path.join(folder, f) for f in files if f.startswith("test_") and f.endswith(".py")
        ]
    return sorted(found)


def imported_test_modules(path: str) -> list[str]:
    """Names of ``test_*`` modules that the file imports, at any depth (inside functions too)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return [n for n in names if any(part.startswith("test_") for part in n.split("."))]


def test_no_test_module_imports_another() -> None:
    # A helper imported from another test module makes a result depend on collection order
    # (and collects that module's tests twice): shared helpers live in support modules.
    modules = suite_files()
    assert len(modules) > 50, modules
    offenders = {
        os.path.relpath(p, TESTS): found for p in modules if (found := imported_test_modules(p))
    }
    assert not offenders, f"test modules importing test modules: {offenders}"


def test_the_check_sees_an_import_inside_a_function(tmp_path) -> None:
    source = tmp_path / "test_x.py"
    source.write_text(
        "def f():\n    from test_security import raw_request\n    import tests.test_y\n"
    )
    assert imported_test_modules(str(source)) == ["test_security", "tests.test_y"]


PROBE = """
from services import missing, needs


@needs(False, reason="no frobnicator at /usr/bin/frobnicator")
def test_marked():
    pass


def test_called():
    missing("no widget server")
"""


def test_a_missing_binary_skips_here_and_fails_under_ci(tmp_path) -> None:
    (tmp_path / "test_probe.py").write_text(PROBE)
    # Under CI the marked test errors in its setup and the called one fails: both go red.
    for ci, outcomes in (("", ["2 skipped"]), ("true", ["1 failed", "1 error"])):
        env = {**os.environ, "PYTHONPATH": TESTS, "CI": ci}
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:randomly"]
            + ["-p", "no:cacheprovider", "-q", "-rfs", "test_probe.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = run.stdout + run.stderr
        assert all(outcome in out for outcome in outcomes), out
        assert (run.returncode == 0) == (ci == ""), out
        assert "no frobnicator at /usr/bin/frobnicator" in out and "no widget server" in out, out
