"""The engine's layering, checked from the source: imports flow downward and never in a circle.

The layers are the ones engine/__init__.py describes. A module may import from its own package and
from packages on a lower layer. Imports inside functions count too: a lazy import that dodges a
cycle is still a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "engine"
LAYERS = {
    "core": 0,
    "models": 1, "anatomy": 1,
    "freeze": 2, "data": 2,
    "config": 3,
    "runs": 4,
    "training": 5,
    "outputs": 6,
    "lab": 7, "cluster": 7,
    "cli": 8, "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_imports(path: Path) -> set[str]:
    """Every engine module ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "engine"}
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {module_name(p): engine_imports(p) for p in ENGINE.rglob("*.py")}


def test_every_engine_package_has_a_layer():
    packages = {package_of(m) for m in GRAPH} - {""}
    assert packages <= set(LAYERS), f"give these a layer in engine/__init__.py and here: {packages - set(LAYERS)}"


def test_imports_only_flow_downward():
    upward = []
    for module, imports in GRAPH.items():
        here = package_of(module)
        if not here:
            continue
        for target in imports:
            there = package_of(target)
            if there and there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    def visit(module: str, trail: list[str]) -> list[str] | None:
        if module in trail:
            return trail[trail.index(module):] + [module]
        for target in sorted(GRAPH.get(module, ())):
            if target in GRAPH and target != module:
                cycle = visit(target, trail + [module])
                if cycle:
                    return cycle
        return None

    for module in GRAPH:
        cycle = visit(module, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("forbidden", ["streamlit", "views", "ui", "pages"])
def test_the_engine_never_imports_the_app(forbidden):
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n.split(".")[0] == forbidden for n in names):
                offenders.append(str(path.relative_to(ENGINE.parent)))
    assert not offenders


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above can fail: a core module importing the training loop is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from engine.training.loop import fit\n")
    assert engine_imports(bad) == {"engine.training.loop"}
    assert LAYERS[package_of("engine.training.loop")] > LAYERS[package_of("engine.core.bad")]


# ------------------------------------------------------------------ one loop, one lifecycle (issue 27)
def _calls(path: Path) -> set[str]:
    """The names ``path`` calls (``f(...)`` and ``x.f(...)`` both give ``f``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            found.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return found


def _sources() -> list[Path]:
    root = ENGINE.parent
    return [*sorted(ENGINE.rglob("*.py")), *sorted((root / "ui").glob("*.py")), *sorted((root / "views").glob("*.py")),
            root / "streamlit_app.py"]


# where a group's planned LR is made, read by the schedules, and (the standalone script) both
PLANNED_LR_HOMES = {"engine/freeze/plan.py", "engine/training/policies.py", "engine/outputs/script_template.py"}


def test_one_training_loop():
    """The steps are called by the trainer only (fit, a race's slices and the LR finder go through
    Trainer.train_pass); a group's planned LR (``initial_lr``) is written where groups are made
    (engine/freeze/plan.py) and read by the LR policies, never rewritten to steer a loop (the LR finder
    did); the race's scheduler stays a scheduler."""
    steps = sorted(str(p.relative_to(ENGINE.parent)) for p in _sources()
                   if "train_steps" in _calls(p) and p.name != "trainer.py")
    assert not steps, f"training steps driven outside engine/training/trainer.py: {steps}"
    rewrites = sorted(str(p.relative_to(ENGINE.parent)) for p in _sources()
                      if '"initial_lr"' in p.read_text()
                      and p.relative_to(ENGINE.parent).as_posix() not in PLANNED_LR_HOMES)
    assert not rewrites, f"initial_lr touched outside {sorted(PLANNED_LR_HOMES)}: {rewrites}"
    race = (ENGINE / "lab" / "race.py").read_text().splitlines()
    assert len(race) <= 400, f"engine/lab/race.py is {len(race)} lines: it schedules; the rest lives beside it"


def test_one_run_lifecycle():
    """Only engine/runs/ takes the device lock or joins its queue (engine/runs/lifecycle.py is the way in)."""
    taking = {"wait_for_device", "acquire", "take_the_device_now"}
    outside = sorted(f"{p.relative_to(ENGINE.parent)}: {sorted(_calls(p) & taking)}" for p in _sources()
                     if _calls(p) & taking and not p.is_relative_to(ENGINE / "runs")
                     and not (p.name == "cli.py" and _calls(p) & taking == {"take_the_device_now"}))
    assert not outside, f"the device taken outside engine/runs/: {outside}"
