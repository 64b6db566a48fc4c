"""The frozen prefix computed once (engine/training/prefix_cache.py): a plan that trains only the top
stages trains them on cached inputs, with the same numbers as on images, through a view that shares
the model's parameters; models whose forward the view cannot reproduce train on images."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.anatomy.stages import model_stages
from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.memory import current_rss
from engine.freeze.plan import FreezePlan, apply_plan
from engine.models.factory import create_model
from engine.runs.checkpoint_file import load_weights
from engine.runs.store import create_run
from engine.training.loop import fit
from engine.training.prefix_cache import prefix_cut, prefix_view, skipped_modules

TINY = dict(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
            max_per_class=12, num_workers=0)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def test_last_stages_train_on_cached_inputs_with_the_numbers_of_images(tmp_path):
    plan = FreezePlan.last(1, head_lr=5e-2).to_dict()
    runs = {}
    for cache in ("auto", "off"):
        config = tiny(plan=plan, epochs=3, feature_cache=cache)
        run = create_run(tmp_path / cache, config.to_dict())
        runs[cache] = (fit(config, run), run)
    (cached, cached_run), (plain, plain_run) = runs["auto"], runs["off"]
    assert cached.feature_cache and not plain.feature_cache
    for a, b in zip(cached.history, plain.history):
        for key in ("train_loss", "val_loss", "val_acc", "train_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert cached.history[-1]["train_loss"] < cached.history[0]["train_loss"]
    # what the view trained is in the model's checkpoint, as the plain run's; the frozen part is bit for bit
    got, want = load_weights(cached_run.checkpoint("last")), load_weights(plain_run.checkpoint("last"))
    assert set(got) == set(want)
    for name in got:
        assert torch.allclose(got[name].float(), want[name].float(), rtol=1e-3, atol=1e-5), name
    assert torch.equal(got["layer1.0.conv1.weight"], want["layer1.0.conv1.weight"])
    best = load_weights(cached_run.checkpoint("best"))
    assert cached.best_epoch == 1 or not torch.equal(got["layer4.0.conv1.weight"], best["layer4.0.conv1.weight"])


def test_the_view_shares_parameters_and_skips_only_the_frozen_part():
    handle = create_model("timm:test_efficientnet", weights="none", num_classes=3, check_output=False)
    module, stages = handle.module, model_stages(handle.module, handle.spec.head)
    plan = FreezePlan.last(2)
    apply_plan(module, stages, plan)
    cut = prefix_cut(plan, TrainConfig(model="timm:test_efficientnet"), stages, module)
    assert cut == stages[-3].modules[0]  # two backbone stages and the head train
    found = prefix_view(module, cut, torch.randn(2, 3, 48, 48))
    assert not isinstance(found, str), found
    view = found.module
    assert found.per_image > 0 and found.skipped
    mine = {id(p) for p in module.parameters()}
    assert {id(p) for p in view.parameters()} <= mine  # the same objects: training the view trains the model
    assert {id(p) for p in view.parameters() if p.requires_grad} == {id(p) for p in module.parameters() if p.requires_grad}
    assert isinstance(view.conv_stem, nn.Identity) and not isinstance(module.conv_stem, nn.Identity)
    assert not isinstance(module.blocks[0], nn.Identity)  # the model itself is untouched


def test_a_stage_named_by_its_container_is_cut_at_its_own_module():
    """timm's DenseNet names every stage by the container of the whole backbone ('features'): the cut
    is the outermost module that holds only trainable parameters, not that container."""
    handle = create_model("timm:densenet121", weights="none", num_classes=3, check_output=False)
    stages = model_stages(handle.module, handle.spec.head)
    cut = prefix_cut(FreezePlan.last(2), TrainConfig(model="timm:densenet121"), stages, handle.module)
    assert cut == "features.denseblock4"
    assert not isinstance(prefix_view(handle.module, cut, torch.rand(2, 3, 64, 64)), str)


@pytest.mark.parametrize("plan", [FreezePlan.full(), FreezePlan.last(1, bn_policy="adapt"),
                                  FreezePlan.last(1, unfreeze_schedule=((1, 2),)), FreezePlan.feature_extraction()])
def test_only_a_fixed_frozen_part_below_the_top_is_cut(plan):
    handle = create_model("timm:test_resnet", weights="none", num_classes=3, check_output=False)
    stages = model_stages(handle.module, handle.spec.head)
    module = handle.module
    assert prefix_cut(plan, TrainConfig(model="timm:test_resnet"), stages, module) is None
    assert prefix_cut(FreezePlan.last(1), TrainConfig(model="timm:test_resnet", augment=True), stages, module) is None
    assert prefix_cut(FreezePlan.last(1), TrainConfig(model="timm:test_resnet", feature_cache="off"), stages,
                      module) is None


def test_a_vit_trains_on_images_and_on_is_refused_with_the_reason():
    """A ViT adds its position embeddings between modules, in functional code: skipping the patch
    embedding cannot reproduce it, so the view is refused and the run trains on images."""
    config = tiny(model="timm:test_vit", plan=FreezePlan.last(1, head_lr=1e-2).to_dict(), epochs=1)
    assert not fit(config).feature_cache
    with pytest.raises(EngineError, match="does not reproduce"):
        fit(tiny(model="timm:test_vit", plan=FreezePlan.last(1).to_dict(), epochs=1, feature_cache="on"))


def test_a_module_shared_by_the_frozen_part_and_the_top_is_not_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.act(self.b(self.a(self.act(x))))

    assert skipped_modules(Shared(), "b", torch.randn(2, 4)) is None  # act runs before b and after it
    assert skipped_modules(Shared(), "a", torch.randn(2, 4)) is None


def test_a_cache_over_the_memory_budget_is_not_made():
    """All 1,797 digits' layer-4 inputs take a few MB; with 1 MB left in the budget the cache is
    refused ('on') rather than pushing the run past it."""
    budget = current_rss() + 2**20
    config = tiny(plan=FreezePlan.last(1).to_dict(), epochs=1, max_per_class=None, feature_cache="on",
                  memory_budget=str(budget))
    with pytest.raises(EngineError, match="would not fit the memory budget"):
        fit(config)


def test_a_cached_run_resumes_to_the_numbers_of_one_straight_run(tmp_path):
    """Stopped after epoch 2 and resumed: the cache is computed again and the top continues from the
    saved weights and optimizer, as a run that never stopped."""
    config = tiny(plan=FreezePlan.last(1, head_lr=5e-2).to_dict(), epochs=3)
    straight = fit(config, create_run(tmp_path / "a", config.to_dict()))
    run = create_run(tmp_path / "b", config.to_dict())
    fit(config, run, should_stop=lambda: len(run.metrics()) >= 2)
    resumed = fit(config, run, resume=True)
    assert resumed.feature_cache and [m["epoch"] for m in run.metrics()] == [1, 2, 3]
    assert run.metrics()[-1]["val_loss"] == pytest.approx(straight.history[-1]["val_loss"], rel=1e-5)
