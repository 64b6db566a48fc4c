"""CPU precision (engine/training/precision.py): bf16 only where a measured step says it pays, never on a
CPU without bf16 units; the probe leaves no trace on the model; the run records what it trained in, and
its exported script trains in the same."""
from __future__ import annotations

import json

import torch

from engine.config import TrainConfig
from engine.models.factory import create_model
from engine.outputs.code import script_for_run
from engine.runs.store import create_run
from engine.training.loop import fit
from engine.training.precision import PROBE_FILE, cpu_bf16_units, cpu_precision, probe_step_times


def test_the_units_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n")
    assert cpu_bf16_units(info) == ("avx512_bf16",)
    info.write_text("flags\t\t: fpu amx_bf16 amx_tile avx512_bf16\n")
    assert cpu_bf16_units(info) == ("amx_bf16", "avx512_bf16")
    info.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_bf16_units(info) == ()
    assert cpu_bf16_units(tmp_path / "missing") == ()


def test_without_units_it_is_float32_and_nothing_is_probed(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_CPU_BF16", raising=False)
    model = create_model("timm:test_resnet", weights="none", class_names=["a", "b"]).module
    choice = cpu_precision(model, (3, 32, 32), 4, channels_last=False, key="k", cache_dir=tmp_path, units=())
    assert choice.dtype is None and "no bf16 units" in choice.reason
    assert not (tmp_path / PROBE_FILE).exists()


def test_with_units_a_probe_decides_once_and_leaves_no_trace(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("WORKBENCH_CPU_BF16", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine keeps its answer
    model = create_model("timm:test_resnet", weights="none", class_names=["a", "b"]).module.train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    fp32_s, bf16_s = probe_step_times(model, (3, 32, 32), 4, channels_last=True)
    assert 0 < fp32_s < 60 and 0 < bf16_s < 60
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # BatchNorm statistics put back
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)

    first = cpu_precision(model, (3, 32, 32), 4, channels_last=True, key="k", cache_dir=tmp_path,
                          units=("avx512_bf16",))
    assert first.dtype in (None, torch.bfloat16) and "a step took" in first.reason
    saved = json.loads((tmp_path / PROBE_FILE).read_text())
    assert len(saved) == 1 and set(next(iter(saved.values()))) == {"fp32_s", "bf16_s"}
    again = cpu_precision(model, (3, 32, 32), 4, channels_last=True, key="k", cache_dir=tmp_path,
                          units=("avx512_bf16",))
    assert again == first  # read back, not measured again
    monkeypatch.setenv("WORKBENCH_CPU_BF16", "off")
    assert "probe is off" in cpu_precision(model, (3, 32, 32), 4, channels_last=True, key="k", cache_dir=tmp_path,
                                           units=("avx512_bf16",)).reason


def test_bf16_asked_for_trains_in_bf16_and_the_script_says_so(tmp_path):
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
                         max_per_class=6, epochs=1, amp="bf16", num_workers=0,
                         plan={"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 1.0})
    run = create_run(tmp_path, config.to_dict())
    result = fit(config, run)
    assert result.status == "finished", result.reason
    assert run.status().precision == "bfloat16: asked for (amp bf16)"
    assert "AMP = 'bf16'" in script_for_run(run)


def test_an_auto_run_records_its_precision(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_CPU_BF16", raising=False)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # its own probe file
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
                         max_per_class=6, epochs=1, num_workers=0,
                         plan={"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 1.0})
    run = create_run(tmp_path, config.to_dict())
    assert fit(config, run).status == "finished"
    precision = run.status().precision or ""
    assert precision.startswith(("float32", "bfloat16")), precision
    script = script_for_run(run)
    assert ("AMP = 'bf16'" in script) == precision.startswith("bfloat16")


def test_a_probe_on_a_busy_machine_is_used_but_not_kept(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("WORKBENCH_CPU_BF16", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0 * (os.cpu_count() or 1), 0.0, 0.0))
    model = create_model("timm:test_resnet", weights="none", class_names=["a", "b"]).module
    choice = cpu_precision(model, (3, 32, 32), 4, channels_last=False, key="k", cache_dir=tmp_path,
                           units=("avx512_bf16",))
    assert "a step took" in choice.reason
    assert not (tmp_path / PROBE_FILE).exists()
