"""The README tells the truth: its methods table is the one the code makes, its test command is the
one CI runs, and the fast lane it documents exists (the marker, and slow entries naming real tests)."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from conftest import SLOW_TESTS

REPOSITORY = Path(__file__).resolve().parents[1]
README = (REPOSITORY / "README.md").read_text(encoding="utf-8")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPOSITORY / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_methods_table_is_the_one_the_registry_and_the_catalogue_make():
    from BrainLesionSAMLib.methods import method_names

    readme_methods = load_script("readme_methods")
    table = readme_methods.readme_table(README)
    assert table == readme_methods.methods_table(), \
        "README.md's methods table is out of date: run .venv/bin/python scripts/readme_methods.py --write"
    assert [f"`{name}`" for name in method_names()] == [row.split(" | ")[0][2:] for row in table.splitlines()[2:]]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPOSITORY / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    section = README[README.index("Run the whole test suite"):]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    assert command == ci
    assert command.endswith("-m pytest Testing"), "CI runs everything, slow tests too"


def test_the_fast_lane_is_documented_and_its_marker_registered():
    assert '.venv/bin/python -m pytest Testing -m "not slow"' in README
    # Both durations are measured figures, written as "<m> min <s> s ... for <n> tests"
    assert re.search(r"\d+ min \d+ s for \d+ tests", README)
    assert re.search(r"\d+ min \d+ s in all, for \d+ tests with \d+ slow ones left out", README)
    assert "FAST_LANE_FIGURE" not in README
    pyproject = (REPOSITORY / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'markers = \["slow: ', pyproject)


def test_every_slow_entry_names_a_test_that_exists():
    missing = []
    for entry in SLOW_TESTS:
        file_name, _, function = entry.partition("::")
        path = REPOSITORY / "Testing" / file_name
        if not path.is_file():
            missing.append(entry)
            continue
        if function:
            names = {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if function not in names:
                missing.append(entry)
    assert missing == [], "SLOW_TESTS in Testing/conftest.py names tests that do not exist (renamed?)"
