"""The package as a whole: tests/ mirrors it, and its core speaks Python.

The core speaks Python: no string in a core module names a command-line flag.

Core errors and reports name parameters in backquotes (`num_candidates`); the CLI shows
them as its flags. Docstrings and comments may talk about the command line; strings that
reach a user (messages, reports) may not. cli/ is the command line; apps/ (the demo) prints
the commands a user can type.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
COMMAND_LINE = ("cli", "apps")


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function, field)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        for stmt in body if isinstance(body, list) else []:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                found.add(id(stmt.value))
    return found


def flag_strings(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            where = f"{path.relative_to(root)}:{node.lineno}"
            hits += [f"{where}: {flag}" for flag in FLAG.findall(node.value)]
    return hits


def test_no_core_module_has_a_flag_in_a_string():
    core = [
        p for p in (REPO / "convcli").rglob("*.py")
        if p.relative_to(REPO / "convcli").parts[0] not in COMMAND_LINE
    ]  # fmt: skip
    assert len(core) > 20
    hits = [hit for path in sorted(core) for hit in flag_strings(path)]
    assert hits == []


def test_the_check_sees_a_flag_in_a_message_not_in_a_docstring(tmp_path):
    bad = tmp_path / "module.py"
    bad.write_text('"""Docstrings may say --resume."""\nMESSAGE = f"use --resume {1}"\n')
    assert flag_strings(bad, tmp_path) == ["module.py:2: --resume"]


# Tests of the whole rather than of one module.
WHOLE = {"tests/test_package.py", "tests/test_readme.py"}


def test_tests_mirror_the_package():
    """tests/a/b/test_x.py tests convcli/a/b/x.py (or the package convcli/a/b/x/), so the
    tests of a module are found in one place."""
    strays = []
    for test in sorted((REPO / "tests").rglob("test_*.py")):
        relative = test.relative_to(REPO / "tests")
        module = REPO / "convcli" / relative.parent / relative.name.removeprefix("test_")
        if str(test.relative_to(REPO)) not in WHOLE and not (
            module.is_file() or module.with_suffix("").is_dir()
        ):
            strays.append(str(test.relative_to(REPO)))
    assert strays == [], "tests without a module of that name and place"
