"""Reduced precision on a CPU: bfloat16 autocast only where a measured step says it pays.

Why measured and not assumed: bf16 matrix units make some CPUs (Intel AMX, ``amx_bf16``) several times
faster in bf16, others with only ``avx512_bf16`` convert more than they gain, and a CPU without either
runs bf16 about 6x slower. So ``amp: auto`` on a CPU:
- no bf16 units in /proc/cpuinfo: float32, no probe (never bf16 silently);
- bf16 units: a probe times training steps (forward + backward, no optimizer step) of one micro-batch
  of the real model in float32 and in bf16, alternately; bf16 is chosen only when it is at least
  ``MIN_GAIN`` faster. Measured on this project's AMD EPYC (avx512_bf16, no AMX), efficientnet_lite0
  at 96 px: bf16 took 4.6-5.2 s a step of 32 against 2.9-3.7 s in float32, so it keeps float32.

``WORKBENCH_CPU_BF16=off`` skips the probe (float32 everywhere: the test suite sets it, so that its
numbers do not depend on the CPU it runs on). The probe leaves no trace on the run (BatchNorm statistics, gradients and the random generators are put
back), and its answer is kept per CPU, torch version, model and step shape in the machine's cache folder
(``precision-probes.json`` in engine.core.paths.machine_cache_dir): a second run of the same shape starts at once.
An answer measured while the machine is busy is used for that run and not kept. The choice is recorded in the
run's RunStarted event (``precision``), and the exported script trains in what the run trained in.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.core.files import atomic_write_json, read_json
from engine.core.modes import buffers_restored, modes_restored

MIN_GAIN = 1.15  # bf16 must be this much faster than float32 to be chosen
PROBE_FILE = "precision-probes.json"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENV = "WORKBENCH_CPU_BF16"  # off: float32 on every CPU, no probe


@dataclass(frozen=True)
class Precision:
    """The training steps' autocast dtype (None: float32) and why, in words for the run's record."""

    dtype: torch.dtype | None
    reason: str


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """This CPU's model name and flags as Linux reports them (("unknown", set()) elsewhere)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return "unknown", set()
    first = text.split("\n\n", 1)[0]  # the first processor's block: every core reports the same
    fields = {key.strip(): value for key, value in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    return fields.get("model name", "unknown").strip() or "unknown", set(fields.get("flags", "").split())


def cpu_bf16_units(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 instruction sets this CPU reports (Linux); () when none or unknown."""
    flags = cpu_info(cpuinfo)[1]
    return tuple(flag for flag in BF16_FLAGS if flag in flags)


def cpu_precision(model: nn.Module, input_shape: tuple[int, ...], slice_images: int, *, channels_last: bool,
                  key: str, cache_dir: Path | None, units: tuple[str, ...] | None = None) -> Precision:
    """``amp: auto`` on a CPU: float32 unless the CPU has bf16 units and a probe of ``slice_images``
    images of ``input_shape`` finds bf16 at least MIN_GAIN faster (kept under ``key`` in ``cache_dir``)."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no"):
        return Precision(None, f"float32: the bf16 probe is off ({ENV})")
    units = cpu_bf16_units() if units is None else units
    if not units:
        return Precision(None, "float32: this CPU has no bf16 units (avx512_bf16 / AMX)")
    cache = cache_dir / PROBE_FILE if cache_dir is not None else None
    name = cpu_info()[0]
    full_key = f"{name}|{'+'.join(units)}|torch {torch.__version__}|{key}|{tuple(input_shape)}x{slice_images}"
    kept = read_json(cache, {}) if cache is not None else {}
    known = kept.get(full_key) if isinstance(kept, dict) else None
    if not (isinstance(known, dict) and _finite(known.get("fp32_s")) and _finite(known.get("bf16_s"))):
        fp32_s, bf16_s = probe_step_times(model, input_shape, max(2, slice_images), channels_last=channels_last)
        known = {"fp32_s": fp32_s, "bf16_s": bf16_s}
        if cache is not None and not machine_busy():  # a loaded machine's timings are kept for this run only
            _keep(cache, full_key, known)
    gain = known["fp32_s"] / max(known["bf16_s"], 1e-9)
    measured = f"a step took {known['bf16_s']:.3f} s in bf16, {known['fp32_s']:.3f} s in float32"
    if gain >= MIN_GAIN:
        return Precision(torch.bfloat16, f"bfloat16 ({'/'.join(units)}): {measured}, {gain:.2f}x")
    return Precision(None, f"float32 ({'/'.join(units)} measured): {measured}, bf16 {gain:.2f}x")


def machine_busy() -> bool:
    """Other work holds most of the cores (1-minute load over 3/4 of them): a probe measured now is noise
    (one on a loaded 2-core box timed bf16 3.5x faster, on the idle box 0.8x), so it is not kept."""
    try:
        return os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1)
    except OSError:
        return False


def probe_step_times(model: nn.Module, input_shape: tuple[int, ...], images: int, *,
                     channels_last: bool, rounds: int = 2) -> tuple[float, float]:
    """Seconds of one forward + backward of ``images`` in float32 and in bf16 autocast (the best of
    ``rounds`` each, after one warm-up each, alternating so that a load change hits both)."""
    grads = {p: p.grad for p in model.parameters()}
    x = torch.rand(images, *input_shape, generator=torch.Generator().manual_seed(0))
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    best = {False: float("inf"), True: float("inf")}
    try:
        with modes_restored(model), buffers_restored(model), torch.random.fork_rng(devices=[]):
            for i in range(2 * (rounds + 1)):
                bf16 = bool(i % 2)
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(x)
                if out.requires_grad:
                    out.float().sum().backward()
                if i >= 2:  # the first of each: warm-up
                    best[bf16] = min(best[bf16], time.perf_counter() - start)
                for p in model.parameters():
                    p.grad = None
    finally:
        for p, g in grads.items():
            p.grad = g
    return best[False], best[True]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and value == value and 0 < value < float("inf")


def _keep(path: Path, key: str, value: dict) -> None:
    """Best effort: a cache folder that cannot be written only means probing again next time."""
    kept = read_json(path, {})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**(kept if isinstance(kept, dict) else {}), key: value})
    except OSError:
        pass
