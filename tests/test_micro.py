"""Micro-batches under a memory budget: same steps and gradients, a measured slice, BN within noise."""
from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, TrainConfig
from engine.core.errors import EngineError
from engine.core.memory import MemoryBudget, cgroup_limit, detect_budget, parse_size
from engine.freeze.plan import FreezePlan
from engine.models.factory import create_model
from engine.runs.store import create_run
from engine.training.loop import fit
from engine.training.micro import HEADROOM, WORKING_FACTOR, Placement, plan_batches, saved_bytes_per_image, slice_cost

TINY = dict(weights="none", data="digits", image_size=32, batch_size=16, max_per_class=12, num_workers=0,
            plan=FreezePlan.full(head_lr=3e-3).to_dict())


def test_slices_add_up_to_the_whole_batch_step():
    """Without BatchNorm (a ViT: LayerNorm only) slicing changes nothing but float rounding: the same
    steps, the same LR schedule, the same curves."""
    whole = fit(TrainConfig(model="timm:test_vit", **TINY, epochs=2, micro_batch=16))
    sliced = fit(TrainConfig(model="timm:test_vit", **TINY, epochs=2, micro_batch=5))  # 16 = 6 + 5 + 5
    assert len(whole.history) == len(sliced.history) == 2
    for a, b in zip(whole.history, sliced.history):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        assert b["val_acc"] == a["val_acc"]


def test_the_probe_measures_activations_and_leaves_no_trace():
    handle = create_model("timm:test_resnet", weights="none", num_classes=3)
    module = handle.module
    module.eval()
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    rng = torch.get_rng_state()
    small = saved_bytes_per_image(module, (3, 32, 32), torch.device("cpu"))
    large = saved_bytes_per_image(module, (3, 64, 64), torch.device("cpu"))
    assert small > 0 and 3.3 < large / small < 4.7  # activations grow with the pixels
    assert all(torch.equal(v, buffers[k]) for k, v in module.named_buffers())  # BN statistics untouched
    assert torch.equal(torch.get_rng_state(), rng) and not module.training
    for p in module.parameters():
        p.requires_grad_(False)
    assert saved_bytes_per_image(module, (3, 32, 32), torch.device("cpu")) == 0  # frozen: nothing kept


def test_the_budget_sizes_the_slice_and_checkpointing_is_the_last_resort(monkeypatch):
    import engine.training.micro

    process = 900_000_000  # the process before training, held still: a tiny model's slices are smaller
    monkeypatch.setattr(engine.training.micro, "current_rss", lambda: process)  # than RSS jitter
    handle = create_model("timm:test_vit", weights="none", num_classes=3)
    module, cpu, shape = handle.module, torch.device("cpu"), (3, 64, 64)
    per_image = saved_bytes_per_image(module, shape, cpu)
    fixed = process + sum(p.numel() * 4 for p in module.parameters()) * 3  # + grads + two Adam moments

    def plan(room_images: float):
        budget = MemoryBudget(int(fixed + HEADROOM * per_image * room_images), "test")
        return plan_batches(module, module, shape, batch_size=32, place=Placement(cpu), budget=budget), budget

    roomy, _ = plan(1000)
    assert roomy.micro_batch == 32 and roomy.slices == 1 and not roomy.grad_checkpointing
    tight, budget = plan(5.5)
    assert tight.micro_batch == 5 and tight.slices == 7 and not tight.grad_checkpointing
    assert tight.predicted_peak <= budget.bytes and "7 micro-batches of 5" in tight.describe()
    squeezed, squeezed_budget = plan(0.8)  # not even one image: recompute activations in backward instead
    # the kept boundaries plus half an image for the segment being recomputed, still less than one image
    assert squeezed.grad_checkpointing and squeezed.per_image < per_image and squeezed.micro_batch >= 1
    assert squeezed.predicted_peak <= squeezed_budget.bytes
    module.set_grad_checkpointing(False)
    with pytest.raises(EngineError, match="memory budget"):
        plan(0.01)


def test_frozen_stages_keep_nothing_yet_their_working_set_sizes_the_slice(monkeypatch):
    """With only the head training, autograd keeps almost nothing, but every frozen layer's output is
    alive while the next one runs: sized by the saved tensors alone, last-stage fine-tuning at 224 px
    under 1.1 GB peaked at 1.36 GB. The slice is sized by the larger of the two."""
    import engine.training.micro

    process = 900_000_000
    monkeypatch.setattr(engine.training.micro, "current_rss", lambda: process)
    module = create_model("timm:test_resnet", weights="none", num_classes=3).module
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    cpu, shape = torch.device("cpu"), (3, 64, 64)
    cost = slice_cost(module, shape, cpu)
    assert 0 < cost.saved < WORKING_FACTOR * cost.working == cost.per_image
    fixed = process + sum(p.numel() * 4 for p in module.parameters() if p.requires_grad) * 3
    budget = MemoryBudget(int(fixed + HEADROOM * cost.per_image * 5.5), "test")
    assert HEADROOM * cost.saved * 32 < budget.bytes - fixed  # counted by what is kept, 32 would fit
    plan = plan_batches(module, module, shape, batch_size=32, place=Placement(cpu), budget=budget)
    assert plan.per_image == cost.per_image and plan.predicted_peak <= budget.bytes
    assert plan.micro_batch == 5
    reserved = plan_batches(module, module, shape, batch_size=32, place=Placement(cpu), budget=budget,
                            reserve=int(HEADROOM * cost.per_image * 2))  # what other models will take
    assert reserved.micro_batch == plan.micro_batch - 2


def test_a_run_records_its_slices_and_the_script_adds_them_up_the_same_way(tmp_path):
    config = TrainConfig(model="timm:test_resnet", **TINY, micro_batch=6)
    run = create_run(tmp_path, config.to_dict())
    fit(config, run)
    status = run.status()
    assert status.micro_batch == 6 and "3 micro-batches of 6" in status.batches
    from engine.outputs.code import script_for_run

    assert "\nMICRO_BATCH = 6\n" in script_for_run(run)


def test_no_slice_or_batch_of_one_image_reaches_batchnorm(tmp_path):
    """test_resnet at 32 px ends in 1x1 maps, where a BatchNorm in training mode cannot normalise one
    image: a lone last batch is left out and slices keep two images or more."""
    from engine.training.setup import prepare

    probe = TrainConfig(model="timm:test_resnet", **TINY)
    n = len(prepare(probe).train_ds)
    config = TrainConfig.from_dict({**probe.to_dict(), "batch_size": n - 1, "micro_batch": 2, "epochs": 1})
    run = create_run(tmp_path, config.to_dict())  # batches of n-1 (odd slices end in 3) and 1: both broke
    result = fit(config, run)
    assert result.status == "finished", result.reason
    assert len(run.metrics()) == 1


def test_memory_settings_are_validated_and_read():
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("512MiB") == 512 * 2**20
    assert detect_budget("2g").bytes == 2 * 10**9
    auto = detect_budget(None)
    assert 0 < auto.bytes and ("cgroup" in auto.source or "total RAM" in auto.source)
    for bad in ("lots", "-1GB", "0", "1.5 parsecs"):
        with pytest.raises(ConfigError, match="memory size") as info:
            TrainConfig(memory_budget=bad)
        assert info.value.field == "memory_budget"
    with pytest.raises(ConfigError, match="micro_batch"):
        TrainConfig(micro_batch=0)


def test_cgroup_limits_v1_and_v2_are_read(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("2900000000\n")
    (v2 / "memory.high").write_text("max\n")
    assert cgroup_limit(v2) == (2_900_000_000, "cgroup memory.max")
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_limit(tmp_path / "v1") is None
    (v1 / "memory.limit_in_bytes").write_text("2700000000\n")
    assert cgroup_limit(tmp_path / "v1") == (2_700_000_000, "cgroup memory.limit_in_bytes")
    budget = detect_budget(None, root=tmp_path / "v1")
    assert budget.bytes == 1_500_000_000 and "2.70 GB" in budget.source  # minus the app's 1.2 GB


def test_batchnorm_on_slices_of_8_learns_like_the_whole_batch_at_224px():
    """The stated BatchNorm choice: slices of 8 normalise with their own statistics. Fine-tuning the
    packaged efficientnet_lite0 (BatchNorm everywhere) at 224 px, batch 32 as 4 x 8 reaches the
    accuracy of batch 32 within noise."""
    common = dict(data="lfw", image_size=224, batch_size=32, epochs=1, max_per_class=60, num_workers=0,
                  plan=FreezePlan.full(head_lr=2e-3).to_dict(), seed=1, split_seed=1)
    whole = fit(TrainConfig(**common, micro_batch=32))
    sliced = fit(TrainConfig(**common, micro_batch=8))
    assert whole.best_val_acc >= 0.8 and sliced.best_val_acc >= 0.8, (whole.best_val_acc, sliced.best_val_acc)
    assert abs(whole.best_val_acc - sliced.best_val_acc) <= 0.1
