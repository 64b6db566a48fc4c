"""Stages: the few meaningful groups of a network that freezing acts on (stem ... head).

timm models describe their own stages (``group_matcher``), so we use that. Other models are
split from their top-level children: a child that holds most of the backbone is opened up into
its own children, tiny leading children become the stem, and the classifier's branch is the head.
Stages are lists of parameter names, so they work for any nn.Module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

_SPLIT_ABOVE = 0.60  # open up a stage that holds more than this share of the backbone...
_MIN_CHILDREN = 3  # ...if it is a container of several blocks
_PASS_THROUGH = 0.90  # ...or a wrapper whose one child holds nearly everything
_TINY_BELOW = 0.005  # a stage under this share is merged into a neighbour


@dataclass
class Stage:
    name: str
    params: list[str] = field(default_factory=list)  # parameter names, in model order
    modules: list[str] = field(default_factory=list)  # top-level module paths it covers
    is_head: bool = False

    def numel(self, model: nn.Module) -> int:
        named = dict(model.named_parameters())
        return sum(named[p].numel() for p in self.params if p in named)


def model_stages(model: nn.Module, head: str) -> list[Stage]:
    """Ordered stages from input to output; the last one is the head and holds ``head``'s params."""
    stages = _timm_stages(model, head) if hasattr(model, "group_matcher") else None
    if not stages:
        stages = _generic_stages(model, head)
    return stages


# ------------------------------------------------------------------ timm
def _timm_stages(model: nn.Module, head: str) -> list[Stage] | None:
    try:
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
    except Exception:  # models without a matcher, or matchers that do not fit
        return None
    ordered = [list(names) for names in groups.values() if names]
    if len(ordered) < 2:
        return None
    head_params = [n for n, _ in model.named_parameters() if _under(n, head)]
    last = ordered[-1]
    if not head_params or not set(head_params) <= set(last):
        return None
    if set(last) != set(head_params):  # e.g. conv_head + classifier: keep the classifier alone
        ordered[-1] = [n for n in last if n not in head_params]
        ordered.append(head_params)
    stages = []
    for i, names in enumerate(ordered):
        is_head = i == len(ordered) - 1
        if is_head:
            name = "head"
        elif i == 0:
            name = "stem"
        else:
            others = [n for j, group in enumerate(ordered) if j != i for n in group]
            name = _shortest_unique_prefix(names, others) or "+".join(_top_modules(names)[:3])
        stages.append(Stage(name=name, params=names, modules=_top_modules(names), is_head=is_head))
    return _dedupe_names(stages)


# ------------------------------------------------------------------ any nn.Module
def _generic_stages(model: nn.Module, head: str) -> list[Stage]:
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    # candidates: (module path, param names); root-level parameters travel with the first stage
    root_own = [n for n, _ in model.named_parameters(recurse=False)]
    units = [(name, _params_under(model, name)) for name, _ in model.named_children()]
    units = [(name, ps) for name, ps in units if ps]
    head_unit = next((u for u in units if _under(head, u[0])), None)

    def backbone_total() -> int:
        return sum(sizes[p] for name, ps in units if not _under(head, name) for p in ps) or 1

    while True:  # open up the dominant backbone unit until no unit dominates
        body = [u for u in units if not _under(head, u[0])]
        if not body:
            break
        biggest = max(body, key=lambda u: sum(sizes[p] for p in u[1]))
        share = sum(sizes[p] for p in biggest[1]) / backbone_total()
        module = model.get_submodule(biggest[0])
        kids = [(f"{biggest[0]}.{c}", _params_under(model, f"{biggest[0]}.{c}"))
                for c, _ in module.named_children()]
        kids = [k for k in kids if k[1]]
        biggest_size = sum(sizes[p] for p in biggest[1]) or 1
        wrapper = any(sum(sizes[p] for p in k[1]) / biggest_size > _PASS_THROUGH for k in kids)
        if share <= _SPLIT_ABOVE or len(kids) < 2 or (len(kids) < _MIN_CHILDREN and not wrapper):
            break
        own = [n for n in biggest[1] if not any(n in k[1] for k in kids)]
        if own:  # e.g. a ViT encoder's pos_embedding: goes with the first child
            kids[0] = (kids[0][0], own + kids[0][1])
        at = units.index(biggest)
        units[at:at + 1] = kids

    total = backbone_total()
    stages: list[Stage] = []
    stem: Stage | None = None
    for name, params in units:
        if head_unit and name == head_unit[0]:
            continue
        tiny = sum(sizes[p] for p in params) / total < _TINY_BELOW
        if not stages and (tiny or stem is not None and tiny):
            stem = stem or Stage(name="stem")
            stem.params += params
            stem.modules.append(name)
            continue
        if stem is not None and not stages:
            stages.append(stem)
        if tiny and stages:
            stages[-1].params += params
            stages[-1].modules.append(name)
        else:
            stages.append(Stage(name=name, params=list(params), modules=[name]))
    if stem is not None and not stages:
        stages.append(stem)
    if root_own and stages:
        stages[0].params[:0] = root_own
    if head_unit is not None:
        stages.append(Stage(name="head", params=list(head_unit[1]), modules=[head_unit[0]], is_head=True))
    else:
        head_params = [n for n in sizes if _under(n, head)]
        stages.append(Stage(name="head", params=head_params, modules=[head], is_head=True))
    return _dedupe_names(stages)


# ------------------------------------------------------------------ helpers
def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _params_under(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if _under(n, prefix)]


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for bits in zip(*parts):
        if all(b == bits[0] for b in bits):
            common.append(bits[0])
        else:
            break
    return ".".join(common)


def _shortest_unique_prefix(names: list[str], others: list[str]) -> str:
    """'layer1' rather than 'layer1.0': the shortest common prefix no other stage shares."""
    bits = _common_prefix(names).split(".") if _common_prefix(names) else []
    for k in range(1, len(bits) + 1):
        prefix = ".".join(bits[:k])
        if not any(_under(o, prefix) for o in others):
            return prefix
    return ""


def _top_modules(names: list[str]) -> list[str]:
    seen: list[str] = []
    for n in names:
        bits = n.split(".")
        top = ".".join(bits[:2]) if len(bits) > 2 and bits[1].isdigit() else bits[0]
        if top not in seen:
            seen.append(top)
    return seen


def _dedupe_names(stages: list[Stage]) -> list[Stage]:
    seen: dict[str, int] = {}
    for s in stages:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}#{seen[s.name]}"
        else:
            seen[s.name] = 0
    return stages


def stage_of_param(stages: list[Stage]) -> dict[str, str]:
    return {p: s.name for s in stages for p in s.params}
