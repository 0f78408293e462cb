"""The test suite's own layout, a consistency check (not a behaviour test): `make test` (CI) runs every test file
under tests/, tests/unit/ included, and stops when one is not collected; `make test-fast` runs tests/unit/, the fast
tier; no test file imports another test file or conftest.py (shared code is in tests/helpers.py)."""
import ast
import os
import re

from helpers import NOT_TEST_FILES, REPO, uncollected

TESTS = os.path.join(REPO, "tests")


def _test_files() -> list[str]:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(TESTS) for f in files
                  if f.endswith(".py") and f not in NOT_TEST_FILES)


def _recipe(target: str) -> list[str]:
    """The command lines of a Makefile target."""
    with open(os.path.join(REPO, "Makefile")) as f:
        text = f.read()
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M)
    assert match, f"no target {target} in the Makefile"
    return [line.strip() for line in match.group(1).splitlines()]


def test_make_test_runs_all_of_tests_and_make_test_fast_runs_tests_unit():
    assert _recipe("test") == ["$(PYTHON) -m pytest -q tests"]
    assert _recipe("test-fast") == ["$(PYTHON) -m pytest -q tests/unit"]
    assert os.path.isdir(os.path.join(TESTS, "unit"))


def test_every_file_under_tests_is_a_test_file_pytest_collects():
    """pytest collects test_*.py; any other name would hold tests that never run (conftest.py stops `make test`
    on it too, at collection)."""
    for path in _test_files():
        assert re.fullmatch(r"test_\w+\.py", os.path.basename(path)), path
    assert not any(f == "__init__.py" for _, _, files in os.walk(TESTS) for f in files)  # one module namespace


def test_a_file_make_test_does_not_collect_is_named(tmp_path):
    """What conftest.py checks after `pytest tests` collects: every test file on disk yielded tests."""
    files = _test_files()
    assert uncollected(TESTS, set(files)) == []
    assert uncollected(TESTS, set(files[1:])) == [os.path.relpath(files[0], REPO)]
    (tmp_path / "unit").mkdir()
    (tmp_path / "unit" / "check_loss.py").write_text("def test_loss():\n    pass\n")
    (tmp_path / "helpers.py").write_text("")
    assert uncollected(str(tmp_path), set()) == [os.path.join(tmp_path.name, "unit", "check_loss.py")]


def test_no_test_file_imports_another_test_file_or_conftest():
    test_modules = {os.path.basename(p)[:-3] for p in _test_files()} | {"conftest"}
    for path in [*_test_files(), os.path.join(TESTS, "helpers.py"), os.path.join(TESTS, "stop_driver.py")]:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in test_modules, f"{os.path.relpath(path, REPO)} imports {name}"
