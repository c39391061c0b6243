"""The layering DESIGN.md asks for, checked on the source: the library imports no front end and no
Slicer / Qt / VTK, its modules import each other in no circle (imports inside functions count too),
and the web front end is its own command."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from BrainLesionSAMLib.cli import main

REPOSITORY = Path(__file__).resolve().parents[1]
LIBRARY = REPOSITORY / "BrainLesionSAMLib"
FORBIDDEN = ("BrainLesionSAM", "BrainLesionSAMSlicer", "BrainLesionSAMWeb", "slicer", "qt", "ctk", "vtk",
             "vtkmodules", "trame", "trame_slicer", "PythonQt")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPOSITORY).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[str]:
    """Every module an import statement of ``path`` names (absolute; at any depth in the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return found


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_library_imports_no_front_end_and_no_slicer():
    offending = [f"{module_name(path)} imports {name}" for path in sorted(LIBRARY.rglob("*.py"))
                 for name in imports_of(path) if name.split(".")[0] in FORBIDDEN]
    assert offending == []
    named = [f"{module_name(path)}: {text!r}" for path in sorted(LIBRARY.rglob("*.py"))
             for text in code_strings(path) if "BrainLesionSAMWeb" in text or "BrainLesionSAMSlicer" in text]
    assert named == [], "the library must not load a front end by name either (importlib, a path)"


def code_strings(path: Path) -> list[str]:
    """The string constants of ``path`` that are not docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_import_circle_in_the_library():
    graph = library_graph()
    assert "BrainLesionSAMLib.backbones.base" in graph["BrainLesionSAMLib.backbones.sam_vit"]
    circles = []

    def visit(node, path):
        for target in sorted(graph[node]):
            if target in path:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert circles == []


def test_the_backbone_factory_sits_above_the_backbones():
    from BrainLesionSAMLib import backbones
    from BrainLesionSAMLib.backbones import base

    assert callable(backbones.build_backbone) and not hasattr(base, "build_backbone")


def test_the_web_front_end_is_its_own_command(capsys):
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["brainlesionsam-web"] == "BrainLesionSAMWeb.server:main"
    assert all(not target.startswith("BrainLesionSAMWeb") for name, target in scripts.items()
               if name != "brainlesionsam-web")
    assert main(["web", "--data", "cases/", "--port", "8090"]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "run brainlesionsam-web --data cases/ --port 8090" in message
