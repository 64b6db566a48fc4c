"""``--strategy auto`` (engine/training/auto_plan.py): the advisor and a short race on a sample of the
training split choose the plan before the first epoch, and the run records the choice as its plan."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.config import TrainConfig
from engine.freeze.presets import named_plan
from engine.models.factory import create_model
from engine.runs.store import create_run, extend_run
from engine.training.advice import probe_accuracy, similarity_from_features
from engine.training.auto_plan import (
    PASSES,
    PENDING,
    TIE,
    Candidate,
    candidates_for,
    pick,
    race_passes,
    sample_split,
    why_no_race,
)
from engine.training.loop import fit
from tests.test_cli import run_cli


def test_the_torch_probe_scores_as_scikit_learns_logistic_regression():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:300], order[300:900]
    ours = probe_accuracy(x[train], y[train], x[test], y[test])
    theirs = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000)).fit(
        x[train], y[train]).score(x[test], y[test])
    assert ours > 0.85 and abs(ours - theirs) <= 0.01, (ours, theirs)
    # pixels separate digits well; shuffled labels are at chance
    assert similarity_from_features(x[:400], y[:400], "pixels").verdict == "similar"
    shuffled = np.random.default_rng(1).permutation(y[:400])
    assert similarity_from_features(x[:400], shuffled, "pixels").verdict == "different"


def test_the_sample_is_stratified_and_drawn_from_the_training_split_only():
    labels = [i % 3 for i in range(90)] + [3]  # three classes of 30, one class of a single image
    indices = list(range(1000, 1091))
    fit_part, held = sample_split(indices, labels, seed=0, n_classes=4)
    assert not set(fit_part) & set(held) and set(fit_part) | set(held) <= set(indices)
    by_label = {i: labels[i - 1000] for i in indices}
    for label in range(3):
        assert sum(by_label[i] == label for i in fit_part + held) == 24  # PER_CLASS
        assert sum(by_label[i] == label for i in held) == 8  # a third held out
    assert 1090 in fit_part and 1090 not in held  # a lone image trains, none held out
    assert sample_split(indices, labels, seed=0, n_classes=4) == (fit_part, held)  # seeded


def test_the_pick_keeps_the_advisor_within_the_tie():
    last1, last2 = Candidate("last-1", "last 1", 0.80), Candidate("last-2", "last 2", 0.80 + TIE / 2)
    assert pick([last1, last2], ("last-1", "last-2"))[0] == "last-1"  # within TIE: the advisor's
    better = Candidate("last-2", "last 2", 0.80 + 3 * TIE)
    picked, why = pick([last1, better], ("last-1", "last-2"))
    assert picked == "last-2" and "best on the sample" in why
    assert pick([Candidate("fe", "fe", 0.9), Candidate("last-1", "last 1", 0.5)], ("fe", "last-1"))[0] == "fe"
    failed = Candidate("last-1", "last 1", None, note="diverged")
    assert pick([failed], ("last-1", "last-2")) == ("last-1", "no candidate finished on the sample: the advisor's plan")
    assert pick([failed, last2], ("last-1", "last-2")) == ("last-2", "the advisor's plan did not finish on the sample")
    # the corners: similar -> head vs last stage; little data -> last stage vs two; enough and unlike ImageNet: full
    assert [candidates_for(s, a) for s, a in [("similar", "enough"), ("different", "little"), ("in between", "enough")]] \
        == [("fe", "last-1"), ("last-1", "last-2"), ("full",)]


def test_a_race_runs_only_where_its_result_could_change_the_pick():
    cuts = {"fe": "classifier", "last-1": "blocks.6", "last-2": "blocks.5"}
    similar = ("fe", "last-1")
    assert why_no_race(similar, cuts, held_out=40, probe=1 - 2 * TIE) is None  # the neighbour could win
    # a probe within TIE of perfect: the neighbour cannot beat feature extraction by more than TIE
    assert "probe 0.990" in why_no_race(similar, cuts, held_out=40, probe=0.99)
    assert why_no_race(("last-1", "last-2"), cuts, held_out=40, probe=1.0) is None  # not the advisor's fe
    assert why_no_race(similar, cuts, held_out=40, probe=None) is None  # no probe (one image a class)
    assert why_no_race(similar, cuts, held_out=0, probe=0.5) == "too few images to hold any out"
    assert "full fine-tune" in why_no_race(("full",), cuts, held_out=40, probe=0.5)
    assert "train every plan on images" in why_no_race(similar, dict(cuts, fe=None), held_out=40, probe=0.5)


def test_features_known_for_some_images_are_not_computed_again_and_match_the_pass(default_handle):
    import torch
    from torch.utils.data import DataLoader

    from engine.data.datasets import TransformDataset, load_source
    from engine.data.transforms import eval_transform
    from engine.training.feature_cache import compute_features, inputs_of, known_and_computed

    ds = load_source("digits")
    module, head = default_handle.module, default_handle.spec.head
    dataset = TransformDataset(ds, list(range(0, 40, 2)), eval_transform(default_handle.spec, 64))
    cpu = torch.device("cpu")
    whole = compute_features(module, head, DataLoader(dataset, batch_size=8), cpu, False, lambda: False)
    some = [dataset.indices[i] for i in (1, 4, 5)]
    with torch.inference_mode():
        rows = inputs_of(module, [head, "blocks.6"], torch.stack([dataset.transform(ds.image(i)) for i in some]))
    assert rows["blocks.6"].dim() == 4  # a cut's input keeps its maps
    known = dict(zip(some, rows[head]))
    calls = []
    hook = module.register_forward_pre_hook(lambda _m, inputs: calls.append(len(inputs[0])))
    try:
        mixed = known_and_computed(module, head, dataset, known, {"batch_size": 8}, cpu, False, lambda: False)
    finally:
        hook.remove()
    assert sum(calls) == len(dataset) - len(some)  # only the unknown images ran
    assert torch.equal(mixed[1], whole[1]) and torch.allclose(mixed[0], whole[0], atol=1e-4)


def test_a_run_chooses_its_plan_records_it_and_a_resume_keeps_it(tmp_path):
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=18,
                         epochs=1, num_workers=0, auto_plan=dict(PENDING))
    run = create_run(tmp_path, config.to_dict())
    result = fit(config, run)
    assert result.status == "finished", result.reason
    saved = run.config()
    record = saved["auto_plan"]
    assert record["status"] == "chosen" and record["picked"] in ("fe", "last-1", "last-2", "full")
    assert saved["plan"] == record["plan"] == named_plan(record["picked"], 4).to_dict()
    assert record["advice"]["similarity"] in ("similar", "in between", "different")
    assert record["advice"]["evidence"]["n_images"] == record["sample"]["train"] + record["sample"]["held_out"]
    # 14 training images a class is little data: two plans that train on cached inputs race
    rows = {c["plan"]: c for c in record["candidates"]}
    assert len(rows) == 2 and record["picked"] in rows and record["advice"]["data_amount"] == "little"
    # one epoch of ~140 training images against a sample part of ~100: the race makes one pass, as the run
    sample = record["sample"]
    assert sample["passes"] == 1 == race_passes(1, split_train(run), sample["train"])
    assert all(c["seconds"] > 0 and 0 <= c["val_acc"] <= 1 and c["method"] == "1 pass over the sample's "
               "training part" for c in rows.values())
    # the sample comes from the training split: 18 per class, 80/20 -> at most 15 per class train
    split = json.loads(run.status_path.read_text())["split"]
    assert record["sample"]["train"] + record["sample"]["held_out"] <= split["train"]
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    chosen = [e for e in events if e["event"] == "PlanChosen"]
    assert len(chosen) == 1 and chosen[0]["plan"] == record["picked"]
    assert events.index(chosen[0]) < next(i for i, e in enumerate(events) if e["event"] == "RunStarted")
    assert run.status().auto_plan.startswith("auto plan: ")
    # a resume trains the recorded plan: nothing chosen again
    extend_run(run, 2)
    resumed = fit(TrainConfig.from_dict(run.config()), run, resume=True)
    assert resumed.status == "finished", resumed.reason
    assert run.config()["plan"] == saved["plan"] and run.config()["auto_plan"] == record
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert sum(e["event"] == "PlanChosen" for e in events) == 1


def split_train(run) -> int:
    return json.loads(run.status_path.read_text())["split"]["train"]


def test_the_race_passes_over_its_sample_no_more_than_the_run_over_its_data():
    assert race_passes(epochs=3, train_images=1438, sample_images=160) == PASSES  # digits: 6, as always
    assert race_passes(epochs=1, train_images=24, sample_images=16) == 1  # tiny data, one epoch
    assert race_passes(epochs=2, train_images=24, sample_images=16) == 3
    assert race_passes(epochs=1, train_images=10, sample_images=16) == 1  # at least one


def test_a_cancel_while_choosing_ends_the_run_cancelled(tmp_path):
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=12,
                         epochs=1, num_workers=0, auto_plan=dict(PENDING))
    run = create_run(tmp_path, config.to_dict())
    result = fit(config, run, should_stop=lambda: True)
    assert result.status == "cancelled" and result.reason == "cancelled while choosing the plan"
    assert run.config()["auto_plan"] == PENDING  # nothing chosen: a later resume would choose


@pytest.mark.parametrize("strategy", ["auto", "AUTO"])
def test_the_cli_says_which_plan_it_chose(tmp_path, strategy):
    proc = run_cli("train", "--model", "timm:test_resnet", "--weights", "none", "--data", "digits",
                   "--max-per-class", "9", "--image-size", "32", "--epochs", "1", "--strategy", strategy,
                   "--workers", "0", "--out", str(tmp_path / "runs"), "--json")
    assert proc.returncode == 0, proc.stderr
    line = next(text for text in proc.stderr.splitlines() if text.startswith("auto plan: "))
    assert "sample race" in line and "chosen in" in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["auto_plan"]["status"] == "chosen"


def test_too_few_images_to_hold_any_out_train_the_advisors_plan_without_a_race(tmp_path):
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=3,
                         epochs=1, num_workers=0, auto_plan=dict(PENDING))
    run = create_run(tmp_path, config.to_dict())
    assert fit(config, run).status == "finished"
    record = run.config()["auto_plan"]
    assert record["sample"]["held_out"] == 0 and record["candidates"] == []
    assert record["why"] == "too few images to hold any out: the advisor's plan, no race"
    assert record["advice"]["data_amount"] == "little"  # 2 training images a class


def test_the_lr_finder_sweeps_the_plan_a_training_would_choose():
    from engine.lab.lr_find import lr_find

    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=9,
                         num_workers=0, auto_plan=dict(PENDING))
    sweep = lr_find(config, steps=5)
    assert len(sweep.lrs) == 5, sweep
    # 7 training images a class is little data: the last stage or two race, never the placeholder full plan
    full = sum(p.numel() for p in create_model("timm:test_resnet", weights="none", class_names=list("0123456789"))
               .module.parameters())
    assert 0 < sweep.trainable_params < full, (sweep.trainable_params, full)  # the full plan trains all


def test_settings_that_train_every_plan_on_images_get_the_advisors_plan_without_a_race(tmp_path):
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=9,
                         epochs=1, num_workers=0, augment="flip", auto_plan=dict(PENDING))
    run = create_run(tmp_path, config.to_dict())
    assert fit(config, run).status == "finished"
    record = run.config()["auto_plan"]
    assert record["candidates"] == [] and "train every plan on images" in record["why"]
    advice = record["advice"]
    assert record["picked"] == candidates_for(advice["similarity"], advice["data_amount"])[0]


def test_a_large_feature_pass_runs_a_compiled_graph_with_the_eager_features(default_handle, monkeypatch, tmp_path):
    import copy

    import torch
    from torch.utils.data import DataLoader

    from engine.data.datasets import TransformDataset, load_source
    from engine.data.transforms import eval_transform
    from engine.training import feature_cache
    from engine.training.compiled_pass import CompiledPasses, compiled_extractor
    from engine.training.feature_cache import compute_features, inputs_of

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    built = []  # the real builder, watched: the pass below must have run its graph
    monkeypatch.setattr(feature_cache, "compiled_extractor",
                        lambda *args: built.append(compiled_extractor(*args)) or built[-1])

    ds = load_source("digits")
    module, head = default_handle.module, default_handle.spec.head
    dataset = TransformDataset(ds, list(range(24)), eval_transform(default_handle.spec, 64))
    cpu = torch.device("cpu")
    loader = DataLoader(dataset, batch_size=8)
    eager = compute_features(module, head, loader, cpu, False, lambda: False)
    small = compute_features(module, head, loader, cpu, False, lambda: False, compiled=CompiledPasses(pixels=64 * 64))
    assert built == [] and torch.equal(small[0], eager[0])  # 24 images of 64 px: not worth a build
    passes = CompiledPasses(pixels=64 * 64, run_images=10**6)  # a small pass of a large run: worth a build
    compiled = compute_features(module, head, loader, cpu, False, lambda: False, compiled=passes)
    again = compute_features(module, head, DataLoader(dataset, batch_size=5), cpu, False, lambda: False,
                             compiled=passes)
    assert len(built) == 1 and built[0] is not None  # one build for both passes
    for got in (compiled, again):
        assert torch.equal(eager[1], got[1])
        assert torch.allclose(eager[0], got[0], rtol=1e-3, atol=1e-4)
    # the exported graph is kept for the next run of the same weights and cut (a new head's weights aside)
    graphs = sorted((tmp_path / "cache" / "graphs").glob("*.onnx"))
    assert len(graphs) == 1
    other = copy.deepcopy(module)
    other.get_submodule(head).reset_parameters()
    batch = torch.stack([dataset[i][0] for i in range(8)])
    reread = compiled_extractor(other, [head], batch, lambda b: inputs_of(other, [head], b))
    assert sorted((tmp_path / "cache" / "graphs").glob("*.onnx")) == graphs
    assert torch.allclose(reread(batch)[head].flatten(1), eager[0][:8], rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # a weight before the cut changed: a graph of its own
        other.conv_stem.weight.mul_(1.01)
    assert compiled_extractor(other, [head], batch, lambda b: inputs_of(other, [head], b)) is not None
    assert len(list((tmp_path / "cache" / "graphs").glob("*.onnx"))) == 2
    example = torch.stack([dataset[i][0] for i in range(3)])
    # a cut inside the network compiles too: what comes after it is dropped from the graph
    cut = "blocks.5"
    inside = compiled_extractor(module, [cut, head], example, lambda b: inputs_of(module, [cut, head], b))
    assert inside is not None
    got, want = inside(example[:2]), inputs_of(module, [cut, head], example[:2])
    assert all(torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-4) for k in (cut, head))
    only_cut = CompiledPasses(pixels=64 * 64, run_images=10**6)
    only_cut.built[(cut,)] = compiled_extractor(module, [cut], example, lambda b: inputs_of(module, [cut], b))
    assert only_cut.graph_for([cut]) is not None and only_cut.graph_for([head]) is None  # stops at the cut
    # not a CPU: the eager pass
    assert compiled_extractor(module, [head], example.to("meta"), lambda b: inputs_of(module, [head], b)) is None


def test_a_choice_made_elsewhere_reaches_the_runs_config_through_its_event(tmp_path):
    """A Ray cluster's job (or rank 0 of several processes) chooses; the app's copy of the run learns the
    plan from the PlanChosen event in the job's log, never from a config file sent back."""
    from engine.cluster.follow import Follower
    from engine.runs.events import PlanChosen

    config = TrainConfig(data="digits", auto_plan=dict(PENDING))
    run = create_run(tmp_path, config.to_dict())
    follower = Follower(run, client=None, job_id="job-1", address="http://127.0.0.1:8265")
    bad = PlanChosen(plan="full", summary="auto plan: x", record={"status": "chosen", "plan": {"strategy": "nope"}})
    follower.apply({"type": "event", "event": bad.to_dict()})
    assert run.config()["auto_plan"] == PENDING  # a malformed record changes nothing
    plan = named_plan("last-2", 6).to_dict()
    record = {"status": "chosen", "picked": "last-2", "plan": plan, "why": "best on the sample by 0.050"}
    good = PlanChosen(plan="last-2", summary="auto plan: last 2 stages (best on the sample by 0.050)", record=record)
    follower.apply({"type": "event", "event": good.to_dict()})
    saved = run.config()
    assert saved["plan"] == plan and saved["auto_plan"] == record and saved["data"] == "digits"
    assert run.status().auto_plan == good.summary
    assert TrainConfig.from_dict(saved).freeze_plan().last_n == 2
