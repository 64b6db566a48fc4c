"""Short pieces, checked from the source (issue 27, point 3), over engine/, ui/, views/ and streamlit_app.py:

- no function over 80 lines, but in the two standalone templates (they are whole scripts on purpose);
- no function in engine/training/ or engine/lab/ with more than 10 parameters (self and cls not counted);
- no module imports another module's private name (``from engine.x import _name``).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("engine", "ui", "views", "streamlit_app.py")
PROJECT_PACKAGES = ("engine", "ui", "views", "streamlit_app")
MAX_LINES = 80
MAX_PARAMS = 10
LONG_ALLOWED = {"engine/outputs/script_template.py", "engine/outputs/predict_onnx_script.py"}  # standalone scripts
PARAMS_CHECKED = ("engine/training/", "engine/lab/")

def source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    assert files, "no source files found"
    return files


def functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method in ``tree``, nested ones too, with its dotted name (Class.method, outer.inner)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + child.name, child))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return len([n for n in names if n not in ("self", "cls")])


def private_imports(tree: ast.AST) -> list[tuple[str, str]]:
    """(module, name) for each ``from <project module> import _name`` (one leading underscore, not a dunder)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = "." * node.level + (node.module or "")
        if not (node.level or module.split(".")[0] in PROJECT_PACKAGES):
            continue
        found += [(module, a.name) for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def offenders() -> dict[str, dict[str, str]]:
    """Per rule: "path:name" -> what breaks it."""
    found: dict[str, dict[str, str]] = {"long": {}, "params": {}, "private": {}}
    for path in source_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for name, fn in functions(tree):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_LINES and rel not in LONG_ALLOWED:
                found["long"][f"{rel}:{name}"] = f"{lines} lines (line {fn.lineno})"
            if rel.startswith(PARAMS_CHECKED) and parameter_count(fn) > MAX_PARAMS:
                found["params"][f"{rel}:{name}"] = f"{parameter_count(fn)} parameters (line {fn.lineno})"
        for module, name in private_imports(tree):
            found["private"][f"{rel}:{name}"] = f"from {module} import {name}"
    return found


FOUND = offenders()


def _listed(rule: str) -> str:
    return "\n".join(f"  {key}: {why}" for key, why in sorted(FOUND[rule].items()))


def test_no_function_over_80_lines():
    bad = _listed("long")
    assert not bad, f"functions over {MAX_LINES} lines (split them into named steps):\n{bad}"


def test_no_training_or_lab_function_over_10_parameters():
    bad = _listed("params")
    assert not bad, (f"functions in engine/training/ or engine/lab/ with more than {MAX_PARAMS} parameters "
                     f"(group them in a dataclass):\n{bad}")


def test_no_private_name_imported_from_another_module():
    bad = _listed("private")
    assert not bad, f"private names imported from another module (make them public where they live):\n{bad}"


def test_the_checks_see_what_they_look_for():
    """The rules above can fail: a long function, a long parameter list and a private import are all caught."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    params = ", ".join(f"p{i}" for i in range(MAX_PARAMS))
    tree = ast.parse(f"class C:\n    def m(self, {params}, *rest):\n        pass\n"
                     f"def long():\n{body}\n"
                     "def f():\n    from engine.training.run import _hidden, __version__, public\n"
                     "from numpy import _private\nfrom .sibling import _near\n")
    found = {name: fn for name, fn in functions(tree)}
    assert set(found) == {"C.m", "long", "f"}
    assert parameter_count(found["C.m"]) == MAX_PARAMS + 1
    assert found["long"].end_lineno - found["long"].lineno + 1 == MAX_LINES + 1
    assert set(private_imports(tree)) == {("engine.training.run", "_hidden"), (".sibling", "_near")}
