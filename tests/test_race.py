"""The budgeted race of freeze plans (engine/lab/race.py): a real tiny race, its refusals, its page."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.lab.race import run_race
from engine.lab.race_estimate import check_budget
from engine.lab.race_plans import parse_plans, rung_sizes
from engine.lab.race_process import train_race
from engine.lab.race_registry import create_race, create_solo, leaderboard, race_curves, race_runs, race_winner
from engine.runs.store import list_runs

BUDGET = 8.0  # 3 plans x 3 rungs x MIN_SLICE_S (4.5 s) and the tiny set-up (0.5-2 s on a busy box) with room
PLANS = ("fe", "last-1", "full")


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    """One finished race: test_resnet (random init), 100 digits at 32 px, three plans, 5 s."""
    root = tmp_path_factory.mktemp("race-runs")
    base = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=10,
                       num_workers=0, batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from two; on a busy box a second thread stalls each step
    try:
        runs = create_race(root, base, PLANS, BUDGET)  # its budget checked on a probe with the race's one thread
        return root, runs, train_race(runs)
    finally:
        torch.set_num_threads(threads)


def test_rungs_halve_the_plans():
    assert rung_sizes(5) == [5, 3, 2, 1]
    assert rung_sizes(3) == [3, 2, 1]
    assert rung_sizes(2) == [2, 1]
    assert rung_sizes(4, eta=3) == [4, 2, 1]


def test_a_race_eliminates_by_rungs_and_its_winner_is_a_normal_run(raced):
    from engine.outputs.evaluate import evaluate_run

    root, runs, result = raced
    assert result.status == "finished"
    board = result.leaderboard
    assert [row["place"] for row in board] == [1, 2, 3]
    assert [row["winner"] for row in board] == [True, False, False]
    by_id = {r.run_id: r for r in runs}

    def key(row, rung):  # the ranking: validation accuracy at the rung's end, then the lower loss
        m = by_id[row["run_id"]].metrics()[rung]
        return (-m["val_acc"], m["val_loss"])

    if not result.out_of_time:  # the budget sufficed for every slice of every rung (a quiet machine)
        assert result.rungs == result.rungs_planned == 3
        # 3 plans -> 2 -> 1: one out after rung 1, one after rung 2, the winner trained in all three
        assert [row["out_after_rung"] for row in board] == [None, 2, 1]
        assert [row["rungs"] for row in board] == [3, 2, 1]
        assert [row["epochs"] for row in board] == [3, 2, 1]  # in a race an epoch is a slice
        assert key(board[2], 0) >= max(key(board[0], 0), key(board[1], 0))
        assert key(board[1], 1) >= key(board[0], 1)
        # the LR is constant while plans race each other; in the last rung the winner, alone, anneals by the clock
        for row in board:
            lrs = [m["lr"] for m in by_id[row["run_id"]].metrics()]
            raced_lrs = lrs[:-1] if row["winner"] else lrs
            assert all(lr == lrs[0] for lr in raced_lrs), lrs
        lrs = [m["lr"] for m in by_id[board[0]["run_id"]].metrics()]
        assert all(lrs[-1][group] < 0.5 * lrs[0][group] for group in lrs[0]), lrs
    else:  # the budget ran out first (fixed costs of a busy machine): ranked as they stood, one winner
        assert "budget ran out" in by_id[board[0]["run_id"]].status().reason
        last = [row for row in board[1:] if row["out_after_rung"] == result.rungs and row["epochs"]]
        assert all(key(board[0], -1) <= key(row, -1) for row in last)

    winner = race_winner(runs)
    assert winner is not None and winner.run_id == board[0]["run_id"] == result.winner
    status = winner.status()
    assert status.state == "finished" and "race winner" in status.reason
    assert winner.config()["epochs"] == len(winner.metrics()) == board[0]["rungs"]  # resumable like any run
    assert winner.train_state_path.is_file() and winner.checkpoint("best").is_file()
    report = evaluate_run(winner)  # what the Evaluate page and `eval` open
    assert report.val_acc == pytest.approx(winner.checkpoint_meta("best")["val_acc"])
    # calibrated at its finish as any run is (engine/training/calibration.py), on its best checkpoint
    assert status.calibration and status.calibration["temperature"] > 0, status.calibration
    assert status.calibration["epoch"] == winner.checkpoint_meta("best")["epoch"]
    assert all(r.status().state == ("finished" if r.metrics() else "cancelled") for r in runs)
    assert sorted(r.run_id for r in race_runs(root, result.group)) == sorted(r.run_id for r in runs)
    with pytest.raises(EngineError, match="already run"):  # a race is run once; its runs are kept as they are
        run_race(runs)


def test_a_race_keeps_its_budget_within_the_stated_slack(raced):
    """Every slice ends by its deadline plus what the docstring allows: its setup (first slice), one
    more step (the deadline is checked before a step), and the evaluation + commit; the curves' x
    values are seconds since the race started, each at or before its slice's end."""
    _root, runs, result = raced
    from engine.core.files import read_json

    ends = []
    for run in runs:
        race = read_json(run.status_path)["race"]
        if race["setup"] and race["slices"]:  # set up before the rungs (unless the budget ran out first)
            assert race["setup"][1] <= race["slices"][0]["start"] + 0.01
        for piece in race["slices"]:
            slack = piece["setup_s"] + 2 * piece["step_s"] + piece["close_s"] + 0.5
            late = piece["end"] - max(piece["deadline"], piece["start"])
            assert late <= slack, (run.config()["label"], piece)
            ends.append(piece["end"])
        xs = [m["elapsed_s"] for m in run.metrics()]
        assert xs == sorted(xs) and all(0 < x <= max(ends) for x in xs)
    # no slice starts after the budget (a hard stop) and none is given a deadline past it
    for piece in (p for r in runs for p in read_json(r.status_path)["race"]["slices"]):
        assert piece["start"] < BUDGET + 0.05 and piece["deadline"] <= BUDGET + 0.05, piece
    points = race_curves(runs)
    assert len(points) == sum(len(r.metrics()) for r in runs) and {p["strategy"] for p in points} <= {
        "feature extraction", "last 1 stage", "full fine-tune"}
    assert result.seconds <= max(p["end"] for r in runs for p in read_json(r.status_path)["race"]["slices"]) + 2


def test_refusals_are_one_clear_sentence():
    with pytest.raises(EngineError, match="at least two plans"):
        parse_plans("full")
    with pytest.raises(EngineError, match="Unknown plan"):
        parse_plans("fe,warp")
    with pytest.raises(EngineError, match="named twice"):
        parse_plans("fe,fe")
    assert parse_plans(None) == ("fe", "last-1", "last-2", "full", "gradual")
    for bad in (float("nan"), float("inf"), "120", True):
        with pytest.raises(EngineError, match="finite number of seconds"):
            check_budget(bad, 3)
    for bad in (0, -5):
        with pytest.raises(EngineError, match="more than 0 seconds"):
            check_budget(bad, 3)
    with pytest.raises(EngineError, match="too small to race 5 plans"):
        check_budget(3, 5)
    assert check_budget(10, 5) == 10.0


@pytest.mark.parametrize("args, message", [
    (["--budget", "nan"], "finite number of seconds"),
    (["--budget", "0"], "more than 0 seconds"),
    (["--budget", "2"], "cannot give each of the 5 plans one slice"),  # the probe names the least
    (["--plans", "full"], "at least two plans"),
    (["--eta", "1"], "must be between 2 and 10"),
    (["--plans", "fe,sideways"], "Unknown plan"),
    (["--plans", ""], "No plans given"),  # not "all five"
    (["--budget", "soon"], "invalid float value"),
    (["--data", "nosuch", "--plans", "fe,full", "--budget", "5"], "Unknown data"),  # refused in the race: removed
])
def test_cli_refuses_before_anything_is_on_disk(tmp_path, capsys, args, message):
    from engine.cli import main

    out = tmp_path / "runs"
    try:
        code = main(["race", "--model", "timm:test_resnet", "--weights", "none", "--out", str(out), *args])
    except SystemExit as exc:  # argparse's own refusals (engine/cli.py _Parser: one line, code 2)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list_runs(out)


def test_compare_page_shows_the_race_and_starts_one(raced, tmp_path, monkeypatch):
    """The leaderboard, the per-second curves and the winner; 'Start race' queues a background race
    (cancelled here at once: its training is the test above)."""
    import shutil

    from engine.runs.background import request_cancel, wait_for
    from tests.test_app import by_label, page

    root, runs, result = raced
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    monkeypatch.setenv("WORKBENCH_RUNS", str(copy))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    at = page("compare.py")
    at.run()
    assert not at.exception
    assert by_label(at.selectbox, "Race").value == result.group
    assert any("Winner: **" in s.value and result.winner in s.value for s in at.success)
    board = at.dataframe[0].value
    assert list(board["place"]) == [1, 2, 3] and board["winner"].tolist() == [True, False, False]
    chart = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    assert "seconds since the race started" in chart
    assert json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["yaxis"]["range"] == [0, 1]  # accuracy: 0..1
    assert "reason" in board.columns and not board.isna().any().any()  # no "None" on screen
    assert "None" not in " ".join(map(str, board.to_numpy().ravel()))
    assert any(f"Set-up (data, models, feature passes): {result.setup_s:.1f} s of the {BUDGET:g} s budget" in c.value
               for c in at.caption)
    by_label(at.button, "Open the winner on the Evaluate page").click().run()
    assert at.session_state["selected_run"] == result.winner

    assert not at.error and "race_estimate" not in at.session_state  # a visit probes nothing
    by_label(at.multiselect, "Plans").set_value(["fe", "full"])
    by_label(at.number_input, "Budget (seconds)").set_value(2)  # 2 rungs x 2 plans x 0.5 s, and no set-up
    by_label(at.number_input, "Image size").set_value(32)
    at.run()
    assert not at.exception
    refusal = " ".join(e.value for e in at.error)  # beside the button, before any click
    assert "cannot give each of the 2 plans one slice" in refusal and "Budget (seconds)" in refusal, refusal
    least = int(re.search(r"at least (\d+) s", refusal).group(1))
    assert least > 2 and by_label(at.button, "Start race").disabled
    assert any(f"the least budget that gives each a slice in the first rung is {least} s" in c.value
               for c in at.caption)
    assert at.session_state["race_group"] == result.group
    assert sorted(r.run_id for r in list_runs(copy)) == sorted(r.run_id for r in runs)  # nothing written
    by_label(at.number_input, "Budget (seconds)").set_value(least).run()
    assert not at.error and not by_label(at.button, "Start race").disabled  # the least named is accepted
    by_label(at.button, "Start race").click().run()
    assert not at.exception and not at.error
    group = at.session_state["race_group"]
    assert group != result.group
    started = race_runs(copy, group)
    assert [r.config()["label"] for r in started] == ["feature extraction", "full fine-tune"]
    for run in started:
        request_cancel(run)
    for run in started:
        assert wait_for(run, timeout_s=120).state == "cancelled"
    assert leaderboard(started)[0]["winner"] is False


def test_gradual_unfreezing_counts_passes_over_the_data_not_slices(tmp_path):
    """A plan given one slice (the whole budget alone) still unfreezes: its epochs are passes."""
    from engine.models.factory import create_model

    base = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=10,
                       num_workers=0, batch_size=16)
    runs = create_solo(tmp_path, base, "gradual", 3.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_race(runs)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "finished"
    (row,) = runs[0].metrics()  # one slice, one epoch: 80 training images, passed over many times in 3 s
    model = create_model("timm:test_resnet", weights="none", class_names=[str(i) for i in range(10)]).module
    everything = sum(p.numel() for p in model.parameters())
    assert row["trainable_params"] == everything  # the last stage joined too
    # resumed as any run (its epochs now ordinary passes): the plan does not go back to the head only of
    # its epoch count, and the saved optimizer, holding every stage, fits
    from engine.runs.store import extend_run
    from engine.training.run import train_run

    extend_run(runs[0], 3)
    result = train_run(runs[0], resume=True)
    assert result.status == "finished", result.reason
    assert [m["trainable_params"] for m in runs[0].metrics()] == [everything] * 3


def test_each_plan_is_sized_with_the_others_in_memory(tmp_path, monkeypatch):
    """Every plan stays in memory while one trains, so a plan's slice leaves room for the plans set up
    after it (weights, gradients, AdamW moments) and for the state of those before it: under one
    memory budget the race's first plan gets a smaller slice than the same plan set up alone."""
    import time

    import engine.training.micro
    from engine.lab.race_lane import Lane
    from engine.models.factory import create_model
    from engine.training.micro import HEADROOM, slice_cost

    process = 900_000_000  # held still: a tiny model's slices are smaller than RSS jitter
    monkeypatch.setattr(engine.training.micro, "current_rss", lambda: process)
    handle = create_model("timm:test_resnet", weights="none", num_classes=10)
    cost = slice_cost(handle.module, (3, 64, 64), torch.device("cpu"))
    weights = sum(p.numel() * p.element_size() for p in handle.module.parameters())
    budget = process + 3 * weights + HEADROOM * cost.per_image * 30.5  # a lone full fine-tune: slices of 30
    base = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=64, max_per_class=10,
                       num_workers=0, batch_size=32, memory_budget=str(int(budget)))
    alone = Lane(create_solo(tmp_path / "solo", base, "full", 5.0)[0], time.perf_counter())
    assert alone.set_up(lambda: False) and alone.runner.batches.micro_batch == 30
    runs = create_race(tmp_path / "race", base, ("full", "last-1", "fe"), 8.0)  # never raced: only set up
    first = Lane(runs[0], time.perf_counter(), before=0, after=2)
    assert first.set_up(lambda: False)
    expected = int((budget - process - 3 * weights - 8 * weights) // (HEADROOM * cost.per_image))
    assert first.runner.batches.micro_batch == expected < 30


def test_a_race_started_again_follows_its_new_process(tmp_path):
    """A race cancelled before its first score can be started again (``race --group``): its runs
    then read as running in this process, not as interrupted by the earlier, dead one."""
    import subprocess
    import sys

    base = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=10,
                       num_workers=0, batch_size=16)
    runs = create_race(tmp_path, base, ("fe", "full"), 5.0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for run in runs:  # what an earlier race process cancelled in its setup leaves
        run.write_status(state="running", pid=dead.pid, pid_start=1.0)
    seen = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_race(runs, say=lambda _line: seen.append([r.status().active for r in runs]))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "finished" and seen[0] == [True, True]
    assert sorted(r.status().state for r in runs) == ["finished", "finished"]


TINY = dict(model="timm:test_resnet", weights="none", data="digits", num_workers=0)


def test_the_estimate_names_the_least_budget_and_check_budget_keeps_to_it():
    """The probe's set-up and slices give one least budget: the refusal names it, and it is accepted."""
    from engine.lab.race_estimate import estimate_race

    base = TrainConfig(**TINY, image_size=32, max_per_class=10, batch_size=16)
    estimate = estimate_race(base, PLANS)
    assert (estimate.train_images, estimate.val_images) == (80, 20)
    assert set(estimate.plans) == set(PLANS) and estimate.setup_s > 0
    # feature extraction and the last stage pass every image through their frozen part at set-up; full does not
    assert estimate.plans["fe"].setup_s > estimate.plans["full"].setup_s
    assert estimate.plans["full"].slice_s > estimate.plans["fe"].slice_s  # it trains and evaluates on images
    least = estimate.least_budget()
    assert least >= estimate.setup_s + 3 * 3 * 0.5  # 3 rungs, every plan at least MIN_SLICE_S in each
    between = (3 * 3 * 0.5 + least) / 2  # enough for the rungs alone, not with the set-up
    named = int(re.search(r"at least (\d+) s", _refusal(between, estimate)).group(1))
    assert named == math.ceil(least) and check_budget(named, 3, estimate=estimate) == named


def _refusal(budget, estimate):
    with pytest.raises(EngineError, match="cannot give each of the 3 plans one slice") as caught:
        check_budget(budget, 3, estimate=estimate)
    return str(caught.value)


def test_cli_refuses_a_budget_the_set_up_eats_before_anything_is_written(tmp_path, capsys):
    """1,797 digits at 96 px: feature extraction and the last stage each pass every image once at set-up,
    which 5 s (above the 4.5 s the rungs alone need) cannot hold with a slice per plan."""
    from engine.cli import main

    out = tmp_path / "runs"
    code = main(["race", "--model", "timm:test_resnet", "--weights", "none", "--image-size", "96", "--plans",
                 "fe,last-1,full", "--budget", "5", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot give each of the 3 plans one slice" in err and "--budget" in err
    assert int(re.search(r"at least (\d+) s", err).group(1)) > 5
    assert not out.exists() or not any(out.iterdir())


def _raced_without_the_check(root, plans, budget, estimate=None):
    """A race whose budget was never checked (the estimate can be wrong: the machine got busier), raced."""
    from engine.lab.race_registry import _create

    base = TrainConfig(**TINY, image_size=32, max_per_class=10, batch_size=16)
    runs = _create(root, base, plans, budget, 2, None, "race", estimate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return runs, train_race(runs)
    finally:
        torch.set_num_threads(threads)


def _no_winner_anywhere(runs, result):
    from engine.lab.race_registry import race_record

    assert result.winner is None and race_winner(runs) is None and result.reason.startswith("No winner: ")
    board = leaderboard(runs)
    assert not any(row["winner"] for row in board) and all(row["place"] is None for row in board)
    assert all(row["state"] == "cancelled" and row["reason"] for row in board)  # each says why, on the board
    assert not any(r.metrics() for r in runs)  # nothing trained
    assert race_record(runs)["outcome"] == result.reason and race_record(runs)["setup_s"] == result.setup_s


def test_a_budget_the_set_up_took_whole_ends_without_a_winner_saying_why(tmp_path, monkeypatch):
    runs, result = _raced_without_the_check(tmp_path / "runs", ("fe", "last-1", "full"), 0.05)
    _no_winner_anywhere(runs, result)
    assert "not set up" in result.reason and re.search(r"at least \d+ s", result.reason)

    from tests.test_app import page  # the Compare page says the same, and each plan's reason

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    at = page("compare.py")
    at.run()
    assert not at.exception and not at.success  # no "Winner:"
    assert any(w.value == result.reason for w in at.warning)
    board = at.dataframe[0].value
    assert set(board["reason"]) == {r.status().reason for r in runs} and all(board["reason"])
    assert "None" not in " ".join(map(str, board.to_numpy().ravel()))
    assert any(f"{result.setup_s:.1f} s of the 0.05 s budget" in c.value for c in at.caption)


def test_a_race_whose_set_up_leaves_too_little_for_a_slice_each_trains_nothing(tmp_path):
    """Every plan set up, but what is left cannot hold one step and one evaluation of each (here the
    estimate recorded says full fine-tuning's step takes 100 s): no plan trains, none wins."""
    from engine.lab.race_estimate import PlanCost, RaceEstimate

    slow = RaceEstimate({"fe": PlanCost(0.01, 0.001, 0.01), "full": PlanCost(0.01, 100.0, 0.01)}, 80, 20, 1.0)
    runs, result = _raced_without_the_check(tmp_path, ("fe", "full"), 4.0, slow)
    _no_winner_anywhere(runs, result)
    assert "one slice of each needs about" in result.reason
    least = int(re.search(r"at least (\d+) s", result.reason).group(1))
    assert least >= result.setup_s + 2 * 100  # 2 rungs, each with a 100 s step of full fine-tuning in it


def test_a_plan_that_finished_no_slice_is_never_the_winner(raced):
    _root, runs, result = raced
    untrained = next(r for r in runs if r.run_id != result.winner)
    saved = untrained.metrics_path.read_bytes()
    try:
        untrained.metrics_path.write_text("")  # as if it never closed a slice, though marked winner
        untrained.write_status(race_winner=True)
        assert race_winner(runs).run_id == result.winner
        row = next(r for r in leaderboard(runs) if r["run_id"] == untrained.run_id)
        assert row["winner"] is False and row["place"] is None
    finally:
        untrained.metrics_path.write_bytes(saved)
        untrained.write_status(race_winner=False)


def test_a_race_takes_the_idle_cores_at_most_what_its_caller_runs_with(raced):
    """Two threads on a busy 2-core box stall at every barrier (set-up 66 s against 16 s on one): a race
    takes the cores idle when its turn comes, never more than its caller's count, and records it."""
    import os

    from engine.lab.race_estimate import idle_cores, race_threads
    from engine.lab.race_registry import race_record

    idle = idle_cores(0.1)
    assert idle is None or 0.0 <= idle <= (os.cpu_count() or 1) + 0.01
    assert 1 <= race_threads() <= torch.get_num_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert race_threads() == 1
    finally:
        torch.set_num_threads(threads)
    _root, runs, _result = raced
    assert race_record(runs)["threads"] == 1  # the fixture raced on one thread
