"""TrainConfig: the recipe of one training run, validated in one place.

The CLI, the app and a config.json read back from a run folder all go through
``TrainConfig.validate``, so a nonsense setting is refused the same way everywhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.anatomy.tree import refused_input_size
from engine.core.errors import EngineError, printable
from engine.core.hosting import HostedLimits, hosted_limits
from engine.core.memory import parse_size
from engine.core.modes import evaluating
from engine.data.balance import BALANCE_CHOICES
from engine.freeze.plan import FreezePlan
from engine.models.registry import DEFAULT_MODEL, resolve

if TYPE_CHECKING:
    from engine.anatomy.stages import Stage
    from engine.data.augment import AugmentSpec


SCHEDULES = ("cosine", "onecycle", "constant")


class ConfigError(EngineError):
    """A setting out of range; ``field`` names it so the app can show the message beside its widget."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _shown(value: Any) -> str:
    """A refused value as one short line: a 400-digit number or a long string is cut, not echoed."""
    text = repr(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)
    text = printable(text)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _text(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(name, f"{name} must be given (got {_shown(value)}).")


def _integer(config: Any, name: str, low: int, high: int, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"{name} must be a whole number (got {_shown(value)}).")
    if not low <= value <= high:
        raise ConfigError(name, f"{name} must be between {low} and {high} (got {_shown(value)}).")


def _number(config: Any, name: str, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"{name} must be a finite number (got {_shown(value)}).")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise ConfigError(name, f"{name} must be in {lo}, {hi} (got {value:g}).")


def _choice(config: Any, name: str, options: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in options:
        raise ConfigError(name, f"Unknown {name} '{value}'. Use one of {', '.join(options)}.")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as the run's config.json."""

    model: str = DEFAULT_MODEL
    weights: str = "packaged"
    data: str = "digits"
    # measured on digits at 96 px (1 epoch): one LR for all groups beat discriminative ratios there
    plan: dict[str, Any] = field(
        default_factory=lambda: FreezePlan.default().to_dict())
    # --strategy auto (engine/training/auto_plan.py): {"status": "pending"} until fit chooses the plan before the
    # first epoch, then how it was chosen ("chosen", the advice, the sample race); ``plan`` holds the pick
    auto_plan: dict[str, Any] | None = None
    epochs: int = 1
    batch_size: int = 32
    image_size: int | None = 96  # None: the model's own input size
    # progressive resizing: the first epoch trains at this size, each later one larger, the last at the image
    # size (validation always at the image size); None: every epoch at the image size (engine/training/sizes.py)
    progressive_from: int | None = None
    # BatchNorm running statistics measured again at an epoch's end, from training images (engine/training/
    # sizes.py): auto = after an epoch that ends at half the peak LR or more (the running averages lag weights
    # that still move fast), on = after every epoch, off = never (a small-size epoch always is: it must be)
    bn_recalibrate: str = "auto"
    crop_pct: float | None = 1.0  # 1.0: whole image resized, nothing cropped away; None: the model's
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0
    seed: int = 0
    max_per_class: int | None = None  # subsample for quick experiments
    # a SPEC (engine/data/augment.py, docs/augmentation.md) kept in its canonical text, False for none; an old
    # run's true is the default (crop:0.7). Short runs learn faster without; switch on for longer training
    augment: bool | str = False
    hflip: bool = False  # with augmentation: mirror images too (as ``flip`` in the SPEC; off: digits are not symmetric)
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_frac: float = 0.1  # share of all steps spent warming up
    label_smoothing: float = 0.0
    balance: str = "none"  # none | weights (class-weighted training loss) | sampler (classes drawn equally often)
    grad_clip: float | None = None
    device: str = "auto"
    amp: str = "auto"  # auto (CUDA only) | off | bf16 | fp16
    channels_last: bool | None = None  # None: on for conv nets
    feature_cache: str = "auto"  # auto | on | off
    num_workers: int | None = None
    memory_budget: str | None = None  # e.g. "1.5GB"; None: the container's limit (or RAM) minus the app's share
    micro_batch: int | None = None  # images per forward/backward slice; None: the largest that fits and is fast
    nproc: int = 1  # processes (DDP ranks): one per GPU, or a share of the CPU cores; batch_size is split among them
    sync_bn: bool = False  # trainable BatchNorm normalises over all ranks' images (CUDA only)
    monitor: str = "val_acc"  # val_acc | val_loss
    patience: int | None = None  # early stopping after this many epochs without improvement
    min_delta: float = 0.0
    group: str | None = None  # comparison this run belongs to
    label: str | None = None  # its name inside the comparison

    def __post_init__(self) -> None:
        self.validate()
        from engine.data.augment import canonical

        self.augment = canonical(self.augment)  # one spelling per recipe: true -> 'crop:0.7', '' -> False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError("config", "a run's config must be a JSON object.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def freeze_plan(self) -> FreezePlan:
        return FreezePlan.from_dict(self.plan)

    def augment_spec(self) -> AugmentSpec:
        """The augmentation this run trains with: its SPEC, mirrored too when ``hflip`` asks (hflip only
        ever applied with augmentation on, so an old run's pair of settings trains as it did)."""
        from engine.data.augment import parse_augment

        spec = parse_augment(self.augment)
        return replace(spec, flip=True) if spec and self.hflip else spec

    def smoothing(self) -> float:
        """The training loss's label smoothing: the SPEC's ``smooth`` or the ``label_smoothing`` setting
        (validation refuses two different values)."""
        return self.augment_spec().smooth or self.label_smoothing

    def validate(self) -> None:
        """Every setting checked here, once, for the CLI, the app and a config.json read back alike.

        Nonsense never starts a run: it is refused with a sentence naming the setting. Checks that
        need the model (image size, stage counts) are in ``validate_for_model``.
        """
        _text(self, "model", "data", "weights", "device")
        try:
            resolve(self.model)  # a name from the catalog (a config.json edited by hand may not be)
        except EngineError as exc:
            raise ConfigError("model", str(exc)) from None
        _integer(self, "epochs", 1, 100_000)
        _integer(self, "batch_size", 1, 65_536)
        _integer(self, "image_size", 8, 4096, optional=True)
        _integer(self, "progressive_from", 16, 4096, optional=True)
        if self.progressive_from is not None and self.image_size and self.progressive_from >= self.image_size:
            raise ConfigError("progressive_from", f"progressive resizing starts below the image size "
                                                  f"({self.image_size} px); got {self.progressive_from}.")
        _integer(self, "seed", 0, 2**32 - 1)
        _integer(self, "split_seed", 0, 2**32 - 1)
        _integer(self, "max_per_class", 1, 10**9, optional=True)
        _integer(self, "num_workers", 0, 64, optional=True)
        _integer(self, "patience", 0, 100_000, optional=True)
        _integer(self, "micro_batch", 1, 65_536, optional=True)
        _integer(self, "nproc", 1, 1024)
        if self.batch_size % self.nproc:
            low = self.batch_size - self.batch_size % self.nproc
            raise ConfigError("batch_size", f"the batch size ({self.batch_size}) is split evenly among the "
                                            f"{self.nproc} processes; use {low or self.nproc} or "
                                            f"{low + self.nproc}.")
        if self.sync_bn not in (True, False):
            raise ConfigError("sync_bn", "sync_bn must be true or false.")
        if self.memory_budget is not None:
            try:
                parse_size(self.memory_budget)
            except EngineError as exc:
                raise ConfigError("memory_budget", str(exc)) from None
        _number(self, "crop_pct", 0.0, 1.0, low_open=True, optional=True)
        _number(self, "val_fraction", 0.0, 1.0, low_open=True, high_open=True)
        _number(self, "test_fraction", 0.0, 1.0, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("val_fraction", "validation and test shares together must be below 1.")
        _number(self, "weight_decay", 0.0, 10.0)
        _number(self, "warmup_frac", 0.0, 1.0, high_open=True)
        _number(self, "label_smoothing", 0.0, 1.0, high_open=True)
        _number(self, "grad_clip", 0.0, 1e9, low_open=True, optional=True)
        _number(self, "min_delta", 0.0, 1e9)
        _choice(self, "optimizer", ("adamw", "sgd"))
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "amp", ("auto", "off", "bf16", "fp16"))
        _choice(self, "feature_cache", ("auto", "on", "off"))
        _choice(self, "bn_recalibrate", ("auto", "on", "off"))
        _choice(self, "monitor", ("val_acc", "val_loss"))
        _choice(self, "balance", BALANCE_CHOICES)
        self._validate_augment()
        if self.channels_last not in (None, True, False):
            raise ConfigError("channels_last", "channels_last must be true, false or unset.")
        for name in ("group", "label"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(name, f"{name} must be text.")
        if not isinstance(self.plan, dict):
            raise ConfigError("plan", "the freeze plan must be a JSON object.")
        if self.auto_plan is not None and not isinstance(self.auto_plan, dict):
            raise ConfigError("auto_plan", "auto_plan must be a JSON object or null.")
        try:
            plan = self.freeze_plan()
        except (TypeError, ValueError) as exc:
            raise ConfigError("plan", f"the freeze plan is malformed ({exc}).") from exc
        for epoch, _n in plan.unfreeze_schedule:
            if epoch < 1:
                raise ConfigError("unfreeze", f"unfreeze epochs start at 1 (got {epoch}).")

    def _validate_augment(self) -> None:
        """The SPEC parses, and says nothing another setting contradicts."""
        from engine.data.augment import AugmentError, parse_augment

        try:
            spec = parse_augment(self.augment)
        except AugmentError as exc:
            error = ConfigError("augment", str(exc))
            error.part = exc.part  # the operation at fault: the app says it beside that control
            raise error from None
        if spec.smooth and self.label_smoothing and spec.smooth != self.label_smoothing:
            raise ConfigError("augment", f"label smoothing is set twice: smooth:{spec.smooth:g} in the augmentation "
                                         f"and label_smoothing {self.label_smoothing:g}; keep one.")
        if spec.mixes and self.balance == "weights":
            raise ConfigError("augment", "mixup/cutmix blend two images' labels, and balance 'weights' weighs each "
                                         "image by its one class: not offered together; use balance 'sampler' or "
                                         "drop mixup/cutmix.")

    def check_hosted(self, limits: HostedLimits | None = None, image_size: int | None = None) -> None:
        """The caps of a shared server (engine.core.hosting), checked when a training starts, never
        when a config is read back: a run trained elsewhere and imported stays usable.

        ``image_size``: the size the run will use when the config leaves it to the model.
        """
        limits = limits or hosted_limits()
        if limits is None:
            return
        why = "this app runs on a shared server (hosted mode), where"
        if self.epochs > limits.epochs:
            raise ConfigError("epochs", f"{why} a run trains at most {limits.epochs} epochs (got {self.epochs}).")
        size = self.image_size or image_size
        if size and size > limits.image_size:
            raise ConfigError("image_size", f"{why} images are at most {limits.image_size} px (got {size}); "
                                            f"set the image size to {limits.image_size} or less.")

    def validate_for_model(self, module: nn.Module, stages: list[Stage], image_size: int) -> None:
        """The checks that need the model: its stages and the input sizes it accepts."""
        plan = self.freeze_plan()
        n_backbone = sum(1 for s in stages if not s.is_head)
        counts = [n for _e, n in plan.unfreeze_schedule] + ([plan.last_n] if plan.strategy == "last-n" else [])
        for n in counts:
            if n > n_backbone:
                raise ConfigError("unfreeze", f"the model has {n_backbone} backbone stages; {n} cannot train.")
        lone: list[str] = []  # BatchNorm layers that train and would see one value per channel
        hooks = [m.register_forward_hook(_one_value_per_channel(name, lone))
                 for name in (_training_batchnorms(module, stages, plan, self.epochs) if self.batch_size < 2 else [])
                 for m in [module.get_submodule(name)]]
        try:
            with evaluating(module), torch.inference_mode():
                module(torch.zeros(1, 3, image_size, image_size))
        except Exception as exc:  # e.g. a ViT whose patch grid is fixed at another size
            raise ConfigError("image_size", refused_input_size(image_size, exc)) from exc
        finally:
            for h in hooks:
                h.remove()
        self._check_progressive(module, image_size)
        if lone:
            raise ConfigError("batch_size", f"a batch of one image cannot train BatchNorm layer {lone[0]} at "
                                            f"{image_size} px: its input there is 1x1, one value per channel, and "
                                            "BatchNorm in training normalises over the batch. Use a batch of 2 or "
                                            "more, or a larger image size.")

    def _check_progressive(self, module: nn.Module, image_size: int) -> None:
        """Progressive resizing starts below the image size, at a size the model takes (a ViT's fixed
        patch grid trains at its own size only)."""
        start = self.progressive_from
        if start is None:
            return
        if start >= image_size:
            raise ConfigError("progressive_from", f"progressive resizing starts below the image size "
                                                  f"({image_size} px); got {start}.")
        try:
            with evaluating(module), torch.inference_mode():
                module(torch.zeros(1, 3, start, start))
        except Exception as exc:
            raise ConfigError("progressive_from", "progressive resizing needs a model that takes smaller images: "
                              + refused_input_size(start, exc)) from exc


def _training_batchnorms(module: nn.Module, stages: list[Stage], plan: FreezePlan, epochs: int) -> list[str]:
    """BatchNorm layers in training mode at the plan's widest epoch (gradual unfreezing only adds)."""
    from engine.freeze.plan import plan_effect

    held = set(plan_effect(module, stages, plan, epoch=max(0, epochs - 1)).eval_modules)
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in held]


def _one_value_per_channel(name: str, found: list[str]):
    def hook(_m: nn.Module, inputs: tuple, _output: Any) -> None:
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if x is not None and x.ndim >= 2 and x[0].numel() // max(1, x.shape[1]) == 1:
            found.append(name)
    return hook
