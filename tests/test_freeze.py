"""Freezing on real models and real tensors: the classic pitfalls, and our plans avoiding them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.anatomy.stages import model_stages
from engine.core.errors import EngineError
from engine.freeze.plan import (
    FreezePlan,
    apply_plan,
    build_optimizer,
    optimizer_param_ids,
    param_groups,
    preview_plan,
    set_train_mode,
    stage_learning_rates,
    unfreeze_for_epoch,
)
from engine.models.factory import create_model


def _setup(name="timm:test_resnet", classes=3):
    torch.manual_seed(0)
    handle = create_model(name, weights="none", num_classes=classes)
    return handle, model_stages(handle.module, handle.spec.head)


def _batch(handle, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *handle.spec.input_size, generator=g) * 2 + 0.5  # not ImageNet-like stats
    y = torch.randint(0, handle.spec.num_classes, (n,), generator=g)
    return x, y


def _backbone_features(handle, x):
    """Input to the head = what a feature extractor produces."""
    captured = {}
    hook = handle.head_module.register_forward_pre_hook(lambda m, inp: captured.setdefault("f", inp[0].detach().clone()))
    with torch.no_grad():
        handle.module(x)
    hook.remove()
    return captured["f"]


@pytest.mark.parametrize("name", ["timm:test_resnet", "timm:test_efficientnet", "timm:test_vit", "tv:resnet18"])
def test_stages_cover_every_parameter_once_and_end_in_the_head(name):
    handle, stages = _setup(name)
    names = [n for n, _ in handle.module.named_parameters()]
    covered = [p for s in stages for p in s.params]
    assert sorted(covered) == sorted(names) and len(set(covered)) == len(covered)
    assert stages[-1].is_head and stages[-1].name == "head"
    assert f"{handle.spec.head}.weight" in stages[-1].params
    assert len(stages) >= 4  # stem, several blocks, head


def test_timm_stages_follow_group_matcher():
    _, stages = _setup("timm:test_resnet")
    assert [s.name for s in stages] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    _, vit = _setup("timm:test_vit")
    assert vit[0].name == "stem" and "cls_token" in vit[0].params and vit[1].name == "blocks.0"


def test_naive_freezing_is_not_frozen_bn_stats_and_features_drift():
    """The pitfall: requires_grad=False alone, then model.train(): BN still moves."""
    handle, _ = _setup()
    model = handle.module
    for p in model.parameters():
        p.requires_grad = False
    for p in handle.head_module.parameters():
        p.requires_grad = True
    x, _ = _batch(handle)
    model.eval()
    feats_before = _backbone_features(handle, x)
    stats_before = model.bn1.running_mean.clone()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert not torch.equal(model.bn1.running_mean, stats_before)
    model.eval()
    assert (feats_before - _backbone_features(handle, x)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["timm:test_resnet", "timm:test_efficientnet", "tv:resnet18"])
def test_feature_extraction_keeps_backbone_bit_identical_through_training(name):
    handle, stages = _setup(name)
    model = handle.module
    report = apply_plan(model, stages, FreezePlan.feature_extraction(head_lr=0.05))
    head_keys = {k for k in model.state_dict() if k.startswith(handle.spec.head + ".")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, stages, FreezePlan.feature_extraction(head_lr=0.05))
    x, y = _batch(handle)
    for _ in range(4):
        model.train()  # the call that undoes naive BN freezing
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        if key in head_keys:
            continue
        assert torch.equal(after[key], value), f"backbone tensor {key} changed"
    assert any(not torch.equal(after[k], before[k]) for k in head_keys), "head did not learn"
    assert report.trainable_params == sum(p.numel() for p in handle.head_module.parameters())
    assert len(report.frozen_bn) == sum(
        1 for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_frozen_parts_stay_in_eval_after_parent_train():
    handle, stages = _setup()
    apply_plan(handle.module, stages, FreezePlan.last(1))
    set_train_mode(handle.module, True)
    assert handle.module.bn1.training is False  # stem is frozen
    assert handle.module.layer4[0].bn1.training is True  # last stage trains
    handle.module.train()  # plain call: the flag flips, the pre-hook flips it back at forward
    handle.module(_batch(handle, 2)[0])
    assert handle.module.bn1.training is False


def test_optimizer_holds_only_trainable_params_with_no_decay_on_norms_and_biases():
    handle, stages = _setup()
    plan = FreezePlan.last(2, head_lr=1e-2, backbone_lr_ratio=0.1, stage_lr_decay=0.5)
    apply_plan(handle.module, stages, plan)
    optimizer = build_optimizer(handle.module, stages, plan, weight_decay=0.05)
    in_opt = optimizer_param_ids(optimizer)
    for name, p in handle.module.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, name
    lrs = {g["stage"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"head": 1e-2, "layer4": pytest.approx(1e-3), "layer3": pytest.approx(5e-4)}
    for group in optimizer.param_groups:
        if group["name"].endswith("no_decay"):
            assert group["weight_decay"] == 0 and all(p.ndim <= 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.05 and all(p.ndim > 1 for p in group["params"])


def test_gradual_unfreezing_adds_the_right_params_at_the_right_epoch():
    handle, stages = _setup()
    plan = FreezePlan.feature_extraction(head_lr=1e-2, backbone_lr_ratio=0.2,
                                         unfreeze_schedule=((2, 1), (3, 3)))
    apply_plan(handle.module, stages, plan, epoch=0)
    optimizer = build_optimizer(handle.module, stages, plan)
    named = dict(handle.module.named_parameters())
    stage_params = {s.name: {id(named[p]) for p in s.params} for s in stages}
    assert optimizer_param_ids(optimizer) == stage_params["head"]
    _, added = unfreeze_for_epoch(handle.module, stages, plan, 1, optimizer)
    assert added == []
    _, added = unfreeze_for_epoch(handle.module, stages, plan, 2, optimizer)
    assert {a.split("/")[0] for a in added} == {"layer4"}
    assert optimizer_param_ids(optimizer) == stage_params["head"] | stage_params["layer4"]
    report, added = unfreeze_for_epoch(handle.module, stages, plan, 3, optimizer)
    assert {a.split("/")[0] for a in added} == {"layer3", "layer2"}
    lrs = stage_learning_rates(stages, plan)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(lrs[group["stage"]])
    assert lrs["layer4"] == pytest.approx(2e-3)
    trainable = {r.name for r in report.stages if r.trainable}
    assert trainable == {"head", "layer4", "layer3", "layer2"}
    # again at the same epoch: idempotent, nothing added twice
    _, added = unfreeze_for_epoch(handle.module, stages, plan, 3, optimizer)
    assert added == []


def test_bn_policies_adapt_and_train():
    handle, stages = _setup()
    x, _ = _batch(handle)
    apply_plan(handle.module, stages, FreezePlan.feature_extraction(bn_policy="adapt"))
    before = handle.module.bn1.running_mean.clone()
    set_train_mode(handle.module)
    with torch.no_grad():
        handle.module(x)
    assert not torch.equal(handle.module.bn1.running_mean, before), "adapt: stats follow the data"
    assert not handle.module.bn1.weight.requires_grad
    report = apply_plan(handle.module, stages, FreezePlan.feature_extraction(bn_policy="train"))
    assert handle.module.bn1.weight.requires_grad and not handle.module.conv1[0].weight.requires_grad
    assert report.frozen_bn == []
    # back to freeze: hooks re-installed, stats fixed again
    apply_plan(handle.module, stages, FreezePlan.feature_extraction())
    set_train_mode(handle.module)
    before = handle.module.bn1.running_mean.clone()
    with torch.no_grad():
        handle.module(x)
    assert torch.equal(handle.module.bn1.running_mean, before)


def test_custom_plan_by_stage_and_pattern_and_report_counts():
    handle, stages = _setup()
    plan = FreezePlan.custom(stages=("layer2",), patterns=("layer4.*.bn*",))
    report = apply_plan(handle.module, stages, plan)
    rows = {r.name: r for r in report.stages}
    assert rows["layer2"].trainable == rows["layer2"].params
    assert 0 < rows["layer4"].trainable < rows["layer4"].params
    assert rows["head"].trainable == 0 and rows["stem"].trainable == 0
    assert report.trainable_params == sum(r.trainable for r in report.stages)
    data = report.to_dict()
    assert data["frozen_params"] == report.total_params - report.trainable_params
    with pytest.raises(EngineError):
        apply_plan(handle.module, stages, FreezePlan.custom(stages=("nope",)))


def test_plan_parsing_and_roundtrip():
    assert FreezePlan.parse("last-n:2").last_n == 2
    assert FreezePlan.parse("full").strategy == "full"
    plan = FreezePlan.feature_extraction(unfreeze_schedule=((3, 2), (1, 1)))
    assert plan.unfreeze_schedule == ((1, 1), (3, 2))
    assert FreezePlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(EngineError):
        FreezePlan.parse("everything")
    with pytest.raises(EngineError):
        FreezePlan.parse("last-n:x")


def test_full_plan_trains_everything_and_nothing_to_train_is_an_error():
    handle, stages = _setup()
    report = apply_plan(handle.module, stages, FreezePlan.full())
    assert report.trainable_params == report.total_params and report.frozen_bn == []
    apply_plan(handle.module, stages, FreezePlan.custom())
    with pytest.raises(EngineError):
        build_optimizer(handle.module, stages, FreezePlan.custom())
    assert param_groups(handle.module, stages, FreezePlan.custom()) == []


def test_preview_matches_apply_and_leaves_the_model_alone():
    handle, stages = _setup()
    plan = FreezePlan.last(2, bn_policy="freeze")
    preview = preview_plan(handle.module, stages, plan)
    assert all(p.requires_grad for p in handle.module.parameters())
    applied = apply_plan(handle.module, stages, plan)
    assert preview.to_dict() == applied.to_dict()
