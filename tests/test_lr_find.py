"""The learning-rate finder on real data and a real (tiny) model: the sweep, the plan it respects,
the suggestion and its rule, and that nothing is written."""
from __future__ import annotations

import json
import math
import time

import pytest

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.freeze.plan import FreezePlan
from engine.lab.lr_find import RULE, lr_find, suggest

BASE = dict(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
            max_per_class=20, num_workers=0, epochs=1)


@pytest.fixture(scope="module")
def full_sweep():
    config = TrainConfig(**BASE, plan=FreezePlan.full(head_lr=1e-3, backbone_lr_ratio=0.1).to_dict())
    points = []
    sweep = lr_find(config, start_lr=1e-5, end_lr=10.0, steps=40, on_point=lambda *p: points.append(p))
    return config, sweep, points


def test_the_sweep_is_exponential_and_ends_on_its_own(full_sweep, tmp_path):
    _config, sweep, points = full_sweep
    assert 5 <= len(sweep.lrs) <= 40 and len(sweep.losses) == len(sweep.smoothed) == len(sweep.lrs)
    assert sweep.lrs[0] == pytest.approx(1e-5)
    ratios = [b / a for a, b in zip(sweep.lrs, sweep.lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios)) and ratios[0] == pytest.approx((10 / 1e-5) ** (1 / 39))
    assert [p[0] for p in points] == list(range(1, len(sweep.lrs) + 1))  # one point per optimizer step
    assert sweep.ended.startswith(("the loss blew up", "reached the end LR", "the loss became infinite"))
    assert all(math.isfinite(x) for x in sweep.losses[:5])  # more than one pass over 256 training images


def test_the_suggestion_follows_the_stated_rule(full_sweep):
    _config, sweep, _ = full_sweep
    assert sweep.rule == RULE and "steepest" in sweep.rule
    assert sweep.suggestion is not None and 1e-5 < sweep.suggestion < 10
    low = min(range(len(sweep.smoothed)), key=sweep.smoothed.__getitem__)
    assert sweep.suggestion <= sweep.lrs[low]  # before the minimum
    assert sweep.min_over_10 == pytest.approx(sweep.lrs[low] / 10)
    at = sweep.lrs.index(sweep.suggestion)
    assert sweep.smoothed[min(low, at + 3)] < sweep.smoothed[0]  # the loss is falling there


def test_the_plan_is_respected_groups_keep_their_ratio_and_frozen_backbones_use_the_cache(full_sweep):
    config, sweep, _ = full_sweep
    head = [lr for name, lr in sweep.group_lrs.items() if name.startswith("head")]
    backbone = [lr for name, lr in sweep.group_lrs.items() if not name.startswith("head")]
    assert head and backbone and max(backbone) == pytest.approx(0.1 * head[0])  # the stage just below the head
    assert head[0] == pytest.approx(sweep.lrs[-1])
    frozen = TrainConfig(**BASE, plan=FreezePlan.feature_extraction(head_lr=1e-2).to_dict())
    fe = lr_find(frozen, start_lr=1e-4, end_lr=1.0, steps=10)
    assert fe.feature_cache and 0 < fe.trainable_params < sweep.trainable_params
    assert set(fe.group_lrs) == {name for name in fe.group_lrs if name.startswith("head")}


def test_nothing_is_written_and_bad_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    config = TrainConfig(**BASE, plan=FreezePlan.feature_extraction(head_lr=1e-2).to_dict())
    lr_find(config, start_lr=1e-3, end_lr=1.0, steps=5)
    assert not (tmp_path / "runs").exists()
    for kw, phrase in ((dict(start_lr=1.0, end_lr=1e-3), "start LR < end LR"), (dict(steps=2), "5 to 10,000 steps"),
                       (dict(end_lr=math.inf), "start LR < end LR"),
                       (dict(end_lr=1e308), "between 1e-12 and 1000"),  # its steps overflowed to an LR of inf
                       (dict(start_lr=1e-15), "between 1e-12 and 1000")):
        with pytest.raises(EngineError, match=phrase):
            lr_find(config, **kw)


def test_suggest_needs_a_falling_loss():
    assert suggest([1e-3, 1e-2], [1.0, 0.9]) == (None, None)
    lrs = [10 ** (-5 + i / 2) for i in range(10)]
    rising = [1.0 + i for i in range(10)]
    assert suggest(lrs, rising)[0] is None  # never falls: no suggestion, only the minimum rule


def test_training_at_the_suggestion_beats_the_bottom_of_the_sweep(full_sweep):
    """The point of the finder: the suggested LR learns; the sweep's lowest LR barely moves."""
    from engine.training.loop import fit

    config, sweep, _ = full_sweep
    accs = {}
    for name, lr in (("suggested", sweep.suggestion), ("lowest", sweep.lrs[0])):
        trial = TrainConfig(**{**BASE, "epochs": 3}, plan=FreezePlan.full(head_lr=lr, backbone_lr_ratio=0.1).to_dict())
        accs[name] = fit(trial).best_val_acc
    assert accs["suggested"] > accs["lowest"] + 0.1, accs


def test_the_cli_sweeps_and_says_the_rule_and_refuses_nonsense():
    from tests.hostile._cli import engine

    args = ["lr-find", "--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "16",
            "--max-per-class", "20", "--workers", "0", "--steps", "20", "--start-lr", "1e-5", "--end-lr", "10"]
    ran = engine(*args, "--json")
    assert ran.rc == 0, ran.err[-2000:]
    result = json.loads(ran.out)
    assert len(result["lrs"]) == len(result["losses"]) >= 5 and result["rule"] == RULE
    text = engine(*args)
    assert "suggested head LR" in text.out or "no suggestion" in text.out
    engine(*args[:-4], "--start-lr", "1", "--end-lr", "1e-3").assert_one_line_error("start LR < end LR")


def _until(job, states, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = job.read()
        if data.get("state") in states:
            return data
        time.sleep(0.2)
    log = job.path.with_suffix(".log")
    raise AssertionError(f"{job.read()} {log.read_text()[-2000:] if log.exists() else ''}")


def test_a_background_sweep_waits_its_turn_reports_and_can_be_cancelled_in_line():
    from engine.lab.lr_find import start_sweep
    from engine.runs.locks import device_lock

    config = TrainConfig(**BASE, plan=FreezePlan.feature_extraction(head_lr=1e-2).to_dict())
    with device_lock("cpu", holder="a training"):  # the device is busy: the sweep queues
        waiting = start_sweep(config, steps=10, start_lr=1e-4, end_lr=1.0)
        queued = _until(waiting, ("queued",))
        deadline = time.monotonic() + 60
        while "in line" not in waiting.read().get("reason", "") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "number 1 in line for the device" in waiting.read()["reason"], queued
        waiting.cancel()
        assert "waiting in the queue" in _until(waiting, ("cancelled", "failed", "finished"))["reason"]
    job = start_sweep(config, steps=10, start_lr=1e-4, end_lr=1.0)
    done = _until(job, ("finished", "failed", "cancelled"))
    assert done["state"] == "finished", done
    assert len(done["points"]) == len(done["sweep"]["lrs"]) >= 5 and done["sweep"]["feature_cache"]


def test_the_training_page_sweeps_in_the_background_and_applies_the_suggestion(tmp_path, monkeypatch):
    from engine.lab.lr_find import SweepJob
    from tests.test_app import page
    from ui.lr_finder import JOB

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    at = page("training.py")
    at.run()
    for label, value in (("Image size", 32), ("Batch size", 16), ("Max images per class (0: all)", 20),
                         ("Sweep steps", 20)):
        next(n for n in at.number_input if n.label == label).set_value(value)
    at.run()
    next(b for b in at.button if b.label == "Start the sweep").click()
    at.run()
    assert not at.exception
    job = SweepJob(at.session_state[JOB])
    done = _until(job, ("finished", "failed", "cancelled", "interrupted"))
    assert done["state"] == "finished", done
    at.run()
    suggestion = done["sweep"]["suggestion"]
    assert suggestion is not None
    apply = next(b for b in at.button if b.label.startswith("Use ") and b.label.endswith("as the head LR"))
    apply.click()
    at.run()
    assert not at.exception
    assert at.session_state["freeze_plan"]["head_lr"] == pytest.approx(float(f"{suggestion:.2e}"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing saved to a run
