"""The hostile corpus: every case is one test item, generated at test time (no binary blobs).

A case passes only when the outcome is the exact one the product promises: a clear message,
no traceback, bounded memory, nothing lost. The summary line counts the clean cases.
"""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_outcomes: dict[str, str] = {}


def _is_case(item: pytest.Item) -> bool:
    return HERE in Path(str(item.fspath)).resolve().parents or Path(str(item.fspath)).resolve().parent == HERE


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _is_case(item):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[item.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    clean = sum(1 for o in _outcomes.values() if o == "passed")
    terminalreporter.write_line(f"{clean}/{len(_outcomes)} hostile cases clean")


@pytest.fixture(autouse=True)
def private_device_locks(tmp_path_factory, monkeypatch):
    """Trainings in the corpus take the machine-wide device lock in a folder of their own."""
    monkeypatch.setenv("WORKBENCH_LOCKS", str(tmp_path_factory.mktemp("locks")))
