"""Training: choose data, check it, start a background run, and watch it learn.

Every choice here outlives a page switch and a refresh: the fields are widgets bound to the URL
(``bind="query-params"``) that keep their value while the user is on other pages
(``persist_state="session"``); the data, model and plan go to the URL through ui.state. Nothing is
checked by the frontend alone: fields take any number, and what the engine refuses is said beside
the field and blocks Start, so a red field can never train with another value.

A dataset built here gets a fourth section once a run on it has finished: the unlabelled images that
run would learn most from, filed under a class with one click (ui/label_next.py).
"""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st
import torch

from engine.cluster.client import check_cluster
from engine.cluster.submit import check_start, start_in_background
from engine.config import ConfigError, TrainConfig
from engine.core.errors import EngineError
from engine.core.hosting import hosted_limits, per_class_that_fits
from engine.core.memory import detect_budget, format_size
from engine.core.paths import runs_root
from engine.data.balance import BALANCE_CHOICES
from engine.data.stamp import source_stamp
from engine.freeze.plan import FreezePlan
from engine.runs.background import start_background
from engine.runs.locks import device_lock
from engine.runs.queue import device_queue
from engine.runs.store import active_runs, create_run, extend_run, list_runs, open_run
from engine.training.auto_plan import PENDING
from engine.training.preflight import check_startable
from engine.training.run import check_resumable
from engine.training.sizes import AUTO_FROM_PX, auto_start, progressive_caption
from ui.augment import accepted_spec, control_for, show_preview, spec_from_controls
from ui.cache import dataset_overview
from ui.charts import chart
from ui.cluster import trained_where, where_to_train
from ui.errors import show_error
from ui.label_next import label_next
from ui.live import device_signature, live
from ui.lr_finder import lr_finder
from ui.run_panel import live_panel, run_progress
from ui.run_table import run_table
from ui.state import AUTO_PLAN, PLAN, SELECTED_RUN, active, share_setup_in_url
from ui.text import imbalance_line, md, plot_labels
from ui.widgets import pick_data_source

st.title("Training")
name, weights, _classes = active()

st.subheader("1. Data")
source = None
try:
    source = pick_data_source(key="train_data", create=True)
    overview = dataset_overview(source, stamp=source_stamp(source)) if source else None
except EngineError as exc:
    show_error(exc)
    overview = None

if overview:  # every name below comes from the user's files: escaped (ui.text) wherever markdown or Plotly draws it
    if overview.get("layout"):
        st.caption(f"Layout: {md(overview['layout'])}")
    if overview.get("split_counts"):  # the split the data names: images per class in each part
        st.dataframe(pd.DataFrame(overview["split_counts"]).rename_axis("class").reset_index(), hide_index=True)
    counts = pd.DataFrame({"class": plot_labels(list(overview["counts"])), "images": list(overview["counts"].values())})
    left, right = st.columns([2, 3])
    balance = px.bar(counts, x="class", y="images", title=f"{overview['n_images']} images")
    balance.update_xaxes(type="category")
    chart(left, balance)
    ratio = overview.get("imbalance") or {}
    if ratio:
        left.caption(imbalance_line(ratio))
    with right:
        for cls, thumbs in list(overview["thumbs"].items())[:10]:
            if thumbs:
                st.image(thumbs, caption=[cls] * len(thumbs), width=56)  # image captions are plain text
    for problem in overview["problems"]:
        st.error(md(problem))
    for warning in overview["warnings"]:
        st.warning(md(warning))
    if overview["skipped"]:
        with st.expander(f"{len(overview['skipped'])} skipped files"):
            st.dataframe(pd.DataFrame(overview["skipped"], columns=["file", "reason"]), hide_index=True)

st.subheader("2. Settings")
plan = FreezePlan.from_dict(st.session_state[PLAN])
st.caption(f"Model `{name}` ({weights}), plan `{plan.strategy}`, head LR {plan.head_lr:g}: change them on the "
           "Model Explorer and Freeze Configurator pages.")
limits = hosted_limits()
fits = 0  # the per-class cap that keeps this dataset within a hosted run's images
if limits and overview and overview["n_images"] > limits.images:
    groups = [n for part in (overview.get("split_counts") or {}).values() for n in part.values()]  # capped each
    fits = per_class_that_fits(groups or list(overview["counts"].values()), limits.images)
    st.info(f"Hosted mode: a run uses at most {limits.images:,} images, so at most {fits} per class of these "
            f"{overview['n_images']:,} are used (set below).")

KEEP = {"bind": "query-params", "persist_state": "session"}  # in the URL, and kept across page switches
# (low, high) of each numeric field: the app's range, said beside the field when a typed value leaves it
RANGES = {"epochs": (1, limits.epochs if limits else 500), "batch": (1, 1024),
          "size": (16, limits.image_size if limits else 1024), "val": (0.05, 0.5), "patience": (0, 100),
          "per_class": (0, 1_000_000), "seed": (0, 10_000), "micro": (0, 1024)}
FIELD_OF = {"epochs": "epochs", "batch_size": "batch", "image_size": "size", "val_fraction": "val",
            "patience": "patience", "max_per_class": "per_class", "seed": "seed", "split_seed": "seed",
            "memory_budget": "budget", "micro_batch": "micro", "balance": "balance", "nproc": "batch",
            "progressive_from": "grow"}
slots: dict[str, object] = {}
given: dict[str, tuple[str, object]] = {}  # key -> (label, value): what the range checks read


def field(column, key: str, widget, label: str, *args, **kwargs):
    """A setting kept across pages and in the URL, with a slot beneath it for what is wrong with it."""
    with column:
        value = widget(label, *args, key=key, **KEEP, **kwargs)
        slots[key] = st.empty()
    given[key] = (label, value)
    return value


choose = field(st.container(), AUTO_PLAN, st.toggle, "Let the workbench choose the plan", value=False,
               help="At Start, before the first epoch: the advisor (data amount x a linear probe of how well the "
                    "frozen features already separate your classes) names a plan, and a short race on a sample of "
                    "your training images (two thirds train, one third held out) checks it against its neighbour: "
                    "feature extraction or the last stage, the last two stages or a full fine-tune. The run trains "
                    "the pick; its page says which and why. The plan above is then not used.")
if choose:
    st.caption("The plan is chosen at Start on your training images (a few seconds before the first epoch).")
c1, c2, c3, c4 = st.columns(4)
epochs = field(c1, "epochs", st.number_input, "Epochs", value=1, step=1)
batch = field(c2, "batch", st.number_input, "Batch size", value=32, step=1)
size = field(c3, "size", st.number_input, "Image size", value=96, step=16,
             help=f"{RANGES['size'][0]}-{RANGES['size'][1]} px; each image is resized to this square.")
val_fraction = field(c4, "val", st.number_input, "Validation share", value=0.2, step=0.05,
                     help="Used for a random split; data that names its validation images (a val/ folder, val rows "
                          "in a labels CSV) is validated on those instead.")
c5, c6, c7, c8 = st.columns(4)
augment = field(c5, "augment", st.toggle, "Augment", value=False,
                help="change the training images at random (helps longer runs): set how below; a preview shows it")
patience = field(c6, "patience", st.number_input, "Early stop patience (0: off)", value=0, step=1)
per_class = field(c7, "per_class", st.number_input, "Max images per class (0: all)", value=fits, step=1)
seed = field(c8, "seed", st.number_input, "Seed", value=0, step=1)
c9, c10, c11, c12 = st.columns(4)
detected = detect_budget(None)
budget = field(c9, "budget", st.text_input, "Memory budget", value="", placeholder=f"auto: {format_size(detected.bytes)}",
               help=f"Peak memory the training may use, e.g. 1.5GB. Empty: {detected}. The batch is then computed "
                    "in micro-batches that fit, and their gradients add up to the batch size.")
micro = field(c10, "micro", st.number_input, "Micro-batch (0: automatic)", value=0, step=1,
              help="Images per forward/backward pass; 0 picks the largest that fits the budget and is fast.")
imbalanced = bool(overview and (overview.get("imbalance") or {}).get("imbalanced"))
balance_choice = field(
    c11, "balance", st.selectbox, "Class balance", list(BALANCE_CHOICES), index=0,
    help="none: every image counts once. weights: the training loss weighs each class by its inverse frequency "
         "in the training split (mean weight 1; the validation loss stays the plain mean). sampler: batches "
         "draw each class equally often (with replacement, as many images per epoch as the split has)."
         + (" This data is imbalanced (see above)." if imbalanced else ""))
grow = field(c12, "grow", st.toggle, "Progressive resizing", value=True,
             help=f"From {AUTO_FROM_PX} px on, with 2 or more epochs: the first epoch trains on smaller images (4/7 "
                  "of the size: 128 of 224), each later one larger, the last at the image size; validation always "
                  "at the image size. Measured: 5 photo classes at 224 px reached 99% in 16 s instead of 29 s. "
                  "No effect when the frozen layers' features are cached.")
if grow and isinstance(size, (int, float)) and isinstance(epochs, (int, float)) and 16 <= size <= 4096 and epochs >= 1:
    grows = progressive_caption(int(size), int(epochs))
    if choose and auto_start(int(size), int(epochs)) is not None:  # chosen at Start: what a cached plan does
        grows += " A chosen plan that trains on cached features (feature extraction, the last stages) trains at the image size."
    st.caption(grows)
aug_values: dict[str, object] = {}
if augment:  # one control per operation of the SPEC (docs/augmentation.md); 0: that one is off
    st.caption("Augmentation: each control is one operation (0: off). The preview below shows 8 versions of one "
               "training image as the training will draw them.")
    a1, a2, a3, a4 = st.columns(4)
    aug_values["flip"] = field(a1, "aug_flip", st.checkbox, "Mirror (flip)", value=False,
                               help="horizontal mirror, half of the time (not for digits or text)")
    aug_values["rotate"] = field(a2, "aug_rotate", st.number_input, "Rotate ± degrees", value=0, step=5,
                                 help="a random rotation within ± this angle (up to 180)")
    aug_values["color"] = field(a3, "aug_color", st.number_input, "Color jitter", value=0.0, step=0.1,
                                help="brightness, contrast and saturation vary by up to this share (up to 1)")
    aug_values["crop"] = field(a4, "aug_crop", st.number_input, "Crop: smallest area kept", value=0.7, step=0.05,
                               help="random resized crops keep at least this share of the image (0: the whole "
                                    "image, no crop)")
    b1, b2, b3, b4 = st.columns(4)
    aug_values["randaug"] = field(b1, "aug_randaug", st.number_input, "RandAugment magnitude", value=0, step=1,
                                  help="timm's RandAugment (rand-mM-mstd0.5): two random operations per image at "
                                       "this strength (up to 30; 9 is usual)")
    aug_values["mixup"] = field(b2, "aug_mixup", st.number_input, "Mixup alpha", value=0.0, step=0.1,
                                help="blend each training batch with itself reversed, labels alike (Beta(alpha, "
                                     "alpha) weights; 0.2 is usual)")
    aug_values["cutmix"] = field(b3, "aug_cutmix", st.number_input, "Cutmix alpha", value=0.0, step=0.1,
                                 help="paste a box of another image of the batch, labels by area (1.0 is usual); "
                                      "with mixup, each batch picks one")
    aug_values["smooth"] = field(b4, "aug_smooth", st.number_input, "Label smoothing", value=0.0, step=0.05,
                                 help="the training loss aims at 1 - s for the true class (0.1 is usual)")
preview_box = st.container()
gpus = torch.cuda.device_count()
# several GPUs: one process each (DistributedDataParallel); CPU processes stay a CLI option (--nproc), since
# the app's CPU cores are shared with the people using it
procs = st.number_input("Processes (one per GPU)", 1, gpus, gpus, help=(
    "DistributedDataParallel: each process trains on its own GPU with its share of the batch size (which must "
    "divide evenly); only the first writes the run.")) if gpus > 1 else 1
cluster = where_to_train()  # None: this server; else the Ray cluster's address (checked at Start)
if cluster:
    procs = st.number_input("Ray Train workers", 1, 256, 1, key="cluster_workers", persist_state="session", help=(
        "--nproc on the cluster: each worker trains on its share of the batch size (which must divide evenly), "
        "on a GPU of the cluster when it has one per worker, else on its CPUs (docs/cluster.md)."))
share_setup_in_url()


def _in_range(key: str, value, label: str) -> None:
    low, high = RANGES[key]
    if value is None:
        raise ConfigError(key, f"{label} needs a value ({low}-{high}).")
    if not low <= value <= high:
        raise ConfigError(key, f"{label} must be between {low:g} and {high:g} (got {value:g}).")


def current_config() -> TrainConfig:
    """What Start would train now (also what the LR finder sweeps); refused settings raise ConfigError
    naming the field."""
    for key in RANGES:
        label, value = given[key]
        _in_range(key, value, label)
    config = TrainConfig(model=name, weights=weights, data=source, plan=plan.to_dict(), epochs=int(epochs),
                         batch_size=int(batch), image_size=int(size), val_fraction=float(val_fraction),
                         augment=spec_from_controls(bool(augment), aug_values), patience=int(patience) or None, max_per_class=int(per_class) or None,
                         seed=int(seed), split_seed=int(seed), memory_budget=(budget or "").strip() or None,
                         micro_batch=int(micro) or None, balance=balance_choice, nproc=int(procs),
                         progressive_from=auto_start(int(size), int(epochs)) if grow else None,
                         auto_plan=dict(PENDING) if choose else None)
    config.check_hosted()
    return config


def refuse(exc: EngineError, fallback) -> None:
    """A refusal beside the field it names (an augmentation's beside its control), else at ``fallback``."""
    where = slots.get(control_for(exc) or FIELD_OF.get(getattr(exc, "field", ""), ""))
    show_error(exc, where or fallback)


settings_ok = True
try:
    current_config()
except ConfigError as exc:
    refuse(exc, st)
    settings_ok = False
except EngineError as exc:
    show_error(exc)
    settings_ok = False

can_start = bool(overview) and not overview["problems"] and settings_ok
shown_spec = accepted_spec(bool(augment), aug_values)  # the preview follows the controls, whatever else is wrong
if shown_spec and overview and not overview["problems"]:
    show_preview(preview_box, source, shown_spec, size, seed, source_stamp(source))
lr_finder(current_config, enabled=can_start, auto_plan=bool(choose))


def device_status() -> tuple:
    """The queue line and the selected run's progress, beside Start; redrawn while anything runs. A run on a
    Ray cluster is counted apart: it holds neither this machine's device nor a place in its queue."""
    statuses = {r.run_id: r.status() for r in active_runs(runs_root())}  # read once: the line and the signature
    away = sum(s.on_cluster for s in statuses.values())
    here = {run_id: s for run_id, s in statuses.items() if not s.on_cluster}
    device_free = device_lock("auto").is_free()
    waiting = len(device_queue("auto").line())
    if away:
        st.caption(f"{away} run{'s train' if away > 1 else ' trains'} on a Ray cluster (not on this machine's "
                   "device, and not in its queue).")
    if here or not device_free:
        running = [run_id for run_id, s in here.items() if s.state == "running"]
        who = f"Run {running[0]} is training" if running else "Another job (a training, a sweep or a race) is using this machine's device"
        line = f"; {waiting} more wait{'s' if waiting == 1 else ''} in line" if waiting else ""
        st.info(f"{who}{line}. One training runs at a time on this machine: a run you start now waits in the "
                f"queue (number {waiting + 1}) and starts by itself when the device is free.")
    selected = st.session_state.get(SELECTED_RUN)
    shown = None
    if selected:
        try:
            shown = run_progress(open_run(runs_root(), selected))
        except EngineError:
            shown = None
    return device_signature(statuses, device_free, waiting), shown


def training_estimate() -> str:
    """Before Start: how long the epochs should take, from a run of this model, size and plan here."""
    from engine.runs.estimate import measured_speed

    speed = measured_speed(runs_root(), name, int(size), plan.strategy) if can_start else None
    if speed is None:
        return "No run of this model, image size and plan has trained here yet: the first epoch's time shows " \
               "once it is done." if can_start else ""
    used = overview["n_images"] if not per_class else min(overview["n_images"], int(per_class) * len(overview["counts"]))
    return f"Estimate: {speed.describe(int(used * (1 - float(val_fraction))) * int(epochs))} of training, " \
           "after a few seconds of set-up."


start_box = st.container()
start_box.caption(training_estimate())
if st.button("Start training", type="primary", disabled=not can_start,
             help=None if can_start else "Pick data that can be trained on and fix the settings marked above."):
    try:
        config = current_config()
        with st.spinner("Checking the data and the plan..."):
            check_startable(config)  # a refusal here writes nothing: no failed run in everyone's list
        if cluster:
            with st.spinner(f"Reaching the Ray cluster at {cluster}..."):
                check_start(cluster, config.to_dict())  # unreachable, too old, data too big: one line, nothing written
    except EngineError as exc:  # a setting out of range: said beside the settings, nothing created
        refuse(exc, start_box)
    else:
        run = create_run(runs_root(), config.to_dict())
        if cluster:
            start_in_background(run, runs_root(), cluster)
        else:
            start_background(run, runs_root())
        st.session_state[SELECTED_RUN] = run.run_id
        st.rerun()
live("training_device", device_status, active=bool(active_runs(runs_root())))

st.subheader("3. Runs")
runs = list_runs(runs_root())
if runs:
    run_table(runs, height=200, reasons=False)
    ids = [r.run_id for r in runs]
    selected = st.session_state[SELECTED_RUN]
    pick = st.selectbox("Run", ids, index=ids.index(selected) if selected in ids else 0)
    st.session_state[SELECTED_RUN] = pick
    run = open_run(runs_root(), pick)
    live_panel(run)
    if trained_where(run.status()):
        st.caption(trained_where(run.status()))
    state = run.status().state
    if state in ("cancelled", "interrupted", "failed", "finished", "diverged") and run.train_state_path.is_file():
        most = limits.epochs if limits else 1000
        more = st.number_input("Train until epoch", 1, most, min(most, max(len(run.metrics()) + 1, 1)))
        resume_box = st.container()
        if st.button("Resume"):
            where = run.status().cluster or {}  # a cluster run resumes on its cluster
            try:
                if where.get("address"):
                    check_cluster(str(where["address"]))  # unreachable: one line, the run as it was
                check_resumable(run, int(more))  # a refusal leaves the run as it was
                extend_run(run, int(more))
            except EngineError as exc:
                show_error(exc, resume_box)
            else:
                if where.get("address"):
                    start_in_background(run, runs_root(), str(where["address"]), resume=True)
                else:
                    start_background(run, runs_root(), resume=True)
                st.rerun()
else:
    st.caption("No runs yet.")

label_next(source)  # a built dataset with a finished run: the images to label next (ui/label_next.py)
