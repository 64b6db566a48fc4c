"""Freezing done right: which parameters train, what BatchNorm does, and the optimizer groups.

A FreezePlan is plain data (presets: feature extraction, full fine-tune, last N stages, custom).
``apply_plan`` makes the model match it, idempotently:

- ``requires_grad`` is set per parameter (timm's ``freeze``/``unfreeze`` semantics, by stage).
- Frozen stages really are frozen: their BatchNorm layers normalise with running statistics and
  never update them, *even after ``model.train()``*. A forward pre-hook puts every module of a
  frozen stage back in eval mode right before it runs, so no caller can undo it by accident.
- ``param_groups`` hands the optimizer only trainable parameters, one group per stage with its
  learning rate (discriminative fine-tuning), and no weight decay on norms and biases.
- Gradual unfreezing opens stages from the top at planned epochs; ``unfreeze_for_epoch`` adds
  exactly the newly trainable parameters to the optimizer with their planned learning rate.
"""
from __future__ import annotations

import fnmatch
import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from engine.anatomy.stages import Stage, stage_of_param
from engine.core.errors import EngineError

STRATEGIES = ("feature-extraction", "full", "last-n", "custom")
BN_POLICIES = ("freeze", "adapt", "train")
# model -> [(module, hook handle)] of the modules its plan holds in eval mode; kept beside the model
# (weakly), never as an attribute monkey-attached to it
_FROZEN_EVAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


MAX_EPOCHS = 100_000  # as TrainConfig.epochs
MAX_STAGES = 10_000  # far beyond any model's stages; a bound so 1e999 or 400 nines is refused, not overflowed


def _shown_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:20]}... ({len(text)} characters)"


def _whole_number(value: Any, what: str, low: int, high: int) -> None:
    """A whole number in [low, high] (1e999, 400 nines, 2.5 or text: one line naming ``what``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise EngineError(f"{what} must be a whole number from {low} to {high:,} (got {_shown_value(value)}).")


@dataclass(frozen=True)
class FreezePlan:
    """What trains, what BatchNorm does in frozen parts, and the learning rates."""

    strategy: str = "feature-extraction"
    last_n: int = 1  # last-n: backbone stages trainable (the head always trains)
    stages: tuple[str, ...] = ()  # custom: stage names that train
    patterns: tuple[str, ...] = ()  # custom: glob patterns of parameter names that train too
    # What BatchNorm does inside frozen stages:
    #   freeze: eval mode, running stats never move, affine frozen (a truly frozen extractor)
    #   adapt:  train mode, running stats follow the new data, affine frozen
    #   train:  train mode and affine weights trainable (fastai's train_bn)
    bn_policy: str = "freeze"
    head_lr: float = 1e-3
    backbone_lr_ratio: float = 0.1  # backbone stage just below the head: head_lr * ratio
    stage_lr_decay: float = 1.0  # each earlier stage: times this again (layer-wise decay)
    # Gradual unfreezing: ((after E finished epochs, N backbone stages from the top train), ...)
    unfreeze_schedule: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise EngineError(f"Unknown freeze strategy '{self.strategy}'. Use one of {', '.join(STRATEGIES)}.")
        if self.bn_policy not in BN_POLICIES:
            raise EngineError(f"Unknown BN policy '{self.bn_policy}'. Use one of {', '.join(BN_POLICIES)}.")
        if isinstance(self.last_n, (int, float)) and not isinstance(self.last_n, bool) and self.last_n < 0:
            raise EngineError("last_n must be 0 or more.")
        _whole_number(self.last_n, "last_n (backbone stages that train)", 0, MAX_STAGES)
        if isinstance(self.unfreeze_schedule, (str, bytes)) or not isinstance(self.unfreeze_schedule, (list, tuple)):
            raise EngineError("The unfreeze schedule must be a list of [epoch, stages] pairs.")
        for pair in self.unfreeze_schedule:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise EngineError(f"The unfreeze schedule holds {_shown_value(pair)}; each entry is an [epoch, "
                                  "stages] pair like [2, 1].")
            _whole_number(pair[0], "an unfreeze epoch", 0, MAX_EPOCHS)
            _whole_number(pair[1], "an unfreeze stage count", 0, MAX_STAGES)
        rates = {"head lr": self.head_lr, "backbone lr ratio": self.backbone_lr_ratio,
                 "stage lr decay": self.stage_lr_decay}
        for what, r in rates.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise EngineError(f"Learning rates must be finite numbers (got {what} {r}).")
        if self.head_lr <= 0 or self.backbone_lr_ratio < 0 or self.stage_lr_decay <= 0:
            raise EngineError("Learning rates must be positive.")
        if self.head_lr > 10:
            raise EngineError(f"A learning rate of {self.head_lr:g} is far beyond any useful value (at most 10).")
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "patterns", tuple(self.patterns))
        object.__setattr__(self, "unfreeze_schedule",
                           tuple(sorted((int(e), int(n)) for e, n in self.unfreeze_schedule)))

    # presets -----------------------------------------------------------------
    @classmethod
    def default(cls) -> "FreezePlan":
        """The recipe a new session and a new run start from: a full fine-tune, one LR (2e-3) for
        every group. Tuned on digits over 3 seeds; per-stage LR ratios were worse in short budgets."""
        return cls(strategy="full", head_lr=2e-3, backbone_lr_ratio=1.0)

    @staticmethod
    def parse_schedule(text: str | None) -> tuple[tuple[int, int], ...]:
        """'2:1, 4:3' -> ((2, 1), (4, 3)): after 2 epochs one backbone stage trains too, after 4 three
        (so epochs 3 and 5 are the first to train them).
        The CLI's --unfreeze and the Freeze Configurator's field share this spelling."""
        pairs = []
        for item in (text or "").replace(" ", "").split(","):
            if not item:
                continue
            epoch, sep, n = item.partition(":")
            try:
                if not sep:
                    raise ValueError(item)
                pairs.append((int(epoch), int(n)))
                _whole_number(pairs[-1][0], "an unfreeze epoch", 0, MAX_EPOCHS)
                _whole_number(pairs[-1][1], "an unfreeze stage count", 0, MAX_STAGES)
            except ValueError as exc:
                raise EngineError(f"Gradual unfreezing expects EPOCH:STAGES pairs like 2:1,4:3 (got '{item}').") from exc
        return tuple(pairs)

    @staticmethod
    def format_schedule(pairs: tuple[tuple[int, int], ...]) -> str:
        return ", ".join(f"{e}:{n}" for e, n in pairs)

    @classmethod
    def feature_extraction(cls, **kw: Any) -> "FreezePlan":
        return cls(strategy="feature-extraction", **kw)

    @classmethod
    def full(cls, **kw: Any) -> "FreezePlan":
        return cls(strategy="full", **kw)

    @classmethod
    def last(cls, n: int, **kw: Any) -> "FreezePlan":
        return cls(strategy="last-n", last_n=n, **kw)

    @classmethod
    def custom(cls, stages: tuple[str, ...] = (), patterns: tuple[str, ...] = (), **kw: Any) -> "FreezePlan":
        return cls(strategy="custom", stages=tuple(stages), patterns=tuple(patterns), **kw)

    @classmethod
    def parse(cls, text: str, **kw: Any) -> "FreezePlan":
        """'feature-extraction' | 'full' | 'last-n:N' | 'custom' (CLI spelling)."""
        name, _, arg = text.strip().partition(":")
        name = {"head": "feature-extraction", "head-only": "feature-extraction",
                "fine-tune": "full", "finetune": "full"}.get(name, name)
        if name == "last-n":
            try:
                return cls.last(int(arg or 1), **kw)
            except ValueError as exc:
                raise EngineError(f"last-n needs a number, e.g. last-n:2 (got '{text}').") from exc
        return cls(strategy=name, **kw)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = list(self.stages)
        data["patterns"] = list(self.patterns)
        data["unfreeze_schedule"] = [list(p) for p in self.unfreeze_schedule]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FreezePlan":
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        for key in ("stages", "patterns"):
            if key in values:
                values[key] = tuple(values[key])
        if "unfreeze_schedule" in values:
            values["unfreeze_schedule"] = tuple(tuple(p) for p in values["unfreeze_schedule"])
        return cls(**values)

    # what trains -------------------------------------------------------------
    def backbone_trainable_count(self, n_backbone: int, epoch: int = 0) -> int | None:
        """How many backbone stages (from the top) train at ``epoch``; None for custom."""
        if self.strategy == "full":
            count = n_backbone
        elif self.strategy == "feature-extraction":
            count = 0
        elif self.strategy == "last-n":
            count = min(self.last_n, n_backbone)
        else:
            return None
        for start, n in self.unfreeze_schedule:
            if epoch >= start:
                count = max(count, min(n, n_backbone))
        return count

    def trainable_stage_names(self, stages: list[Stage], epoch: int = 0) -> list[str]:
        backbone = [s for s in stages if not s.is_head]
        head = [s.name for s in stages if s.is_head]
        count = self.backbone_trainable_count(len(backbone), epoch)
        if count is None:
            known = {s.name for s in stages}
            unknown = [n for n in self.stages if n not in known]
            if unknown:
                raise EngineError(f"Unknown stage(s) {', '.join(unknown)}. Stages: {', '.join(known)}.")
            chosen = set(self.stages)
            extra = [s.name for s in backbone[::-1][: max((n for e, n in self.unfreeze_schedule if epoch >= e), default=0)]]
            return [s.name for s in stages if s.name in chosen or s.name in extra]
        top = [s.name for s in backbone[len(backbone) - count:]] if count else []
        return top + head


# ------------------------------------------------------------------ report
@dataclass
class StageReport:
    name: str
    params: int
    trainable: int
    lr: float | None  # None when frozen
    bn_layers: int
    bn_fixed: int  # BN layers running on their stored statistics (eval mode)
    modules: list[str] = field(default_factory=list)

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


@dataclass
class FreezeReport:
    plan: dict[str, Any]
    epoch: int
    stages: list[StageReport]
    total_params: int
    trainable_params: int
    frozen_bn: list[str]  # names of BN modules held in eval mode

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(frozen_params=self.frozen_params, trainable_pct=round(self.trainable_pct, 3),
                    frozen_bn_count=len(self.frozen_bn))
        for row, stage in zip(data["stages"], self.stages):
            row["frozen"] = stage.frozen
            row["trainable_pct"] = round(100.0 * stage.trainable / max(1, stage.params), 3)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FreezeReport:
        """Back from ``to_dict`` (derived counts are recomputed, not read)."""
        stage_fields = StageReport.__dataclass_fields__
        stages = [StageReport(**{k: v for k, v in row.items() if k in stage_fields}) for row in data["stages"]]
        return cls(plan=data["plan"], epoch=data["epoch"], stages=stages, total_params=data["total_params"],
                   trainable_params=data["trainable_params"], frozen_bn=list(data["frozen_bn"]))


# ------------------------------------------------------------------ applying
def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _module_stage(model: nn.Module, stages: list[Stage]) -> dict[str, str]:
    """Stage of every module: the stage of all parameters under it, or of its nearest parent."""
    by_param = stage_of_param(stages)
    result: dict[str, str] = {}
    for name, module in model.named_modules():
        own = {by_param[f"{name}.{p}" if name else p] for p, _ in module.named_parameters()}
        if len(own) == 1:
            result[name] = own.pop()
        elif not own and name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent in result:
                result[name] = result[parent]
    return result


def _eval_pre_hook(module: nn.Module, _inputs: Any) -> None:
    module.training = False


def _clear_hooks(model: nn.Module) -> None:
    for _module, handle in _FROZEN_EVAL.pop(model, []):
        handle.remove()


def release_frozen_eval(model: nn.Module) -> None:
    """Drop the eval-mode hooks (e.g. on a deepcopy) without touching any other model's."""
    for module in model.modules():  # a deepcopy carries the hooks but not the registry entry
        for key, fn in list(module._forward_pre_hooks.items()):
            if fn is _eval_pre_hook:
                del module._forward_pre_hooks[key]
    _FROZEN_EVAL.pop(model, None)


@dataclass
class PlanEffect:
    """What a plan does to a model, computed without touching it."""

    trainable: dict[str, bool]  # parameter name -> trains
    eval_modules: list[str]  # modules held in eval mode (frozen leaves and frozen BN)
    frozen_bn: list[str]
    module_stage: dict[str, str]  # module name -> stage name


def plan_effect(model: nn.Module, stages: list[Stage], plan: FreezePlan, epoch: int = 0) -> PlanEffect:
    train_stages = set(plan.trainable_stage_names(stages, epoch))
    by_param = stage_of_param(stages)
    module_stage = _module_stage(model, stages)
    bn_param_names = {
        f"{name}.{p}" for name, m in model.named_modules() if is_batchnorm(m)
        for p, _ in m.named_parameters(recurse=False)
    }
    trainable: dict[str, bool] = {}
    for name, _param in model.named_parameters():
        trains = by_param.get(name) in train_stages or any(fnmatch.fnmatchcase(name, pat) for pat in plan.patterns)
        if not trains and plan.bn_policy == "train" and name in bn_param_names:
            trains = True
        trainable[name] = trains
    eval_modules, frozen_bn = [], []
    for name, module in model.named_modules():
        stage = module_stage.get(name)
        if stage is None or stage in train_stages or not name:
            continue
        if any(trainable[f"{name}.{p}"] for p, _ in module.named_parameters(recurse=False)):
            continue  # a pattern made this module trainable
        if is_batchnorm(module) and plan.bn_policy != "freeze":
            continue  # BN adapts to the new data on purpose
        if next(module.children(), None) is not None and not is_batchnorm(module):
            continue  # a container's own flag changes nothing (BN+act fusions like timm's do)
        eval_modules.append(name)
        if is_batchnorm(module):
            frozen_bn.append(name)
    return PlanEffect(trainable, eval_modules, frozen_bn, module_stage)


def preview_plan(model: nn.Module, stages: list[Stage], plan: FreezePlan, epoch: int = 0) -> FreezeReport:
    """The report ``apply_plan`` would give, leaving the model untouched (safe on shared models)."""
    return build_report(model, stages, plan, epoch, plan_effect(model, stages, plan, epoch))


def apply_plan(model: nn.Module, stages: list[Stage], plan: FreezePlan, epoch: int = 0) -> FreezeReport:
    """Make ``model`` follow ``plan`` at ``epoch``; safe to call again (e.g. each epoch)."""
    effect = plan_effect(model, stages, plan, epoch)
    for name, param in model.named_parameters():
        trains = effect.trainable[name]
        if not trains and param.grad is not None:
            param.grad = None  # a stale gradient must not move a frozen weight (e.g. via momentum)
        param.requires_grad_(trains)
    _clear_hooks(model)
    hooks = []
    for name in effect.eval_modules:
        module = model.get_submodule(name)
        hooks.append((module, module.register_forward_pre_hook(_eval_pre_hook)))
        module.training = False
    _FROZEN_EVAL[model] = hooks
    return build_report(model, stages, plan, epoch, effect)


def build_report(model: nn.Module, stages: list[Stage], plan: FreezePlan, epoch: int,
                 effect: PlanEffect) -> FreezeReport:
    """Per-stage counts from a plan's effect (the same whether or not it was applied)."""
    named = dict(model.named_parameters())
    trains = effect.trainable
    lrs = stage_learning_rates(stages, plan)
    fixed = set(effect.frozen_bn)
    bn_by_stage: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if is_batchnorm(module) and name in effect.module_stage:
            bn_by_stage.setdefault(effect.module_stage[name], []).append(name)
    rows = []
    for stage in stages:
        present = [p for p in stage.params if p in named]
        trainable = sum(named[p].numel() for p in present if trains[p])
        bns = bn_by_stage.get(stage.name, [])
        rows.append(StageReport(
            name=stage.name, params=sum(named[p].numel() for p in present), trainable=trainable,
            lr=lrs[stage.name] if trainable else None, bn_layers=len(bns),
            bn_fixed=sum(1 for n in bns if n in fixed), modules=list(stage.modules),
        ))
    total = sum(p.numel() for p in named.values())
    trainable_total = sum(p.numel() for n, p in named.items() if trains[n])
    return FreezeReport(plan=plan.to_dict(), epoch=epoch, stages=rows, total_params=total,
                        trainable_params=trainable_total, frozen_bn=list(effect.frozen_bn))


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)`` that leaves frozen parts in eval (the hooks would anyway at forward)."""
    model.train(mode)
    for module, _handle in _FROZEN_EVAL.get(model, []):
        module.training = False
    return model


# ------------------------------------------------------------------ optimizer
def stage_learning_rates(stages: list[Stage], plan: FreezePlan) -> dict[str, float]:
    """Head: head_lr. Backbone stage k from the top (k=1 just below the head):
    head_lr * backbone_lr_ratio * stage_lr_decay ** (k - 1)."""
    rates: dict[str, float] = {}
    backbone = [s for s in stages if not s.is_head]
    for k, stage in enumerate(reversed(backbone), start=1):
        rates[stage.name] = plan.head_lr * plan.backbone_lr_ratio * plan.stage_lr_decay ** (k - 1)
    for stage in stages:
        if stage.is_head:
            rates[stage.name] = plan.head_lr
    return rates


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, stages: list[Stage], plan: FreezePlan, weight_decay: float = 0.01,
                 only: set[str] | None = None) -> list[dict[str, Any]]:
    """Optimizer groups of trainable parameters only: one per (stage, decay / no decay).

    Each group carries ``name`` and ``stage`` so its learning rate can be logged and a resumed
    run can rebuild the same layout. ``only`` restricts to those parameter names.
    """
    named = dict(model.named_parameters())
    lrs = stage_learning_rates(stages, plan)
    groups = []
    for stage in stages:
        decay, no_decay = [], []
        for pname in stage.params:
            param = named.get(pname)
            if param is None or not param.requires_grad or (only is not None and pname not in only):
                continue
            (no_decay if _no_decay(pname, param) else decay).append(param)
        for params, wd, suffix in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lrs[stage.name], "weight_decay": wd,
                               "name": f"{stage.name}/{suffix}", "stage": stage.name})
    return groups


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def unfreeze_for_epoch(model: nn.Module, stages: list[Stage], plan: FreezePlan, epoch: int,
                       optimizer: torch.optim.Optimizer, weight_decay: float = 0.01) -> tuple[FreezeReport, list[str]]:
    """Re-apply the plan at ``epoch`` and add newly trainable parameters to the optimizer.

    Returns the report and the names of the groups added (empty when nothing changed).
    """
    report = apply_plan(model, stages, plan, epoch)
    present = optimizer_param_ids(optimizer)
    new_names = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in present}
    added = []
    for group in param_groups(model, stages, plan, weight_decay, only=new_names):
        group.setdefault("initial_lr", group["lr"])
        optimizer.add_param_group(group)
        added.append(group["name"])
    return report, added


def build_optimizer(model: nn.Module, stages: list[Stage], plan: FreezePlan, weight_decay: float = 0.01,
                    kind: str = "adamw", momentum: float = 0.9) -> torch.optim.Optimizer:
    """An optimizer over the plan's groups (trainable parameters only)."""
    return optimizer_for_groups(param_groups(model, stages, plan, weight_decay), kind, momentum)


def optimizer_for_groups(groups: list[dict[str, Any]], kind: str = "adamw",
                         momentum: float = 0.9) -> torch.optim.Optimizer:
    if not groups:
        raise EngineError("Nothing to train: the plan freezes every parameter.")
    for group in groups:
        group["initial_lr"] = group["lr"]
    if kind == "adamw":
        return torch.optim.AdamW(groups)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=True)
    raise EngineError(f"Unknown optimizer '{kind}'. Use adamw or sgd.")
