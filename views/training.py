"""Training: choose data, check it, start a background run, and watch it learn."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st
import torch

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.hosting import hosted_limits, per_class_that_fits
from engine.core.memory import detect_budget, format_size
from engine.core.paths import data_root, resolve_data_path, runs_root
from engine.data.archive import extract_upload
from engine.data.balance import BALANCE_CHOICES
from engine.data.stamp import source_stamp
from engine.freeze.plan import FreezePlan
from engine.runs.background import start_background
from engine.runs.locks import device_lock
from engine.runs.queue import device_queue
from engine.runs.store import active_runs, create_run, describe_run, extend_run, list_runs, open_run
from engine.training.run import check_resumable
from ui.cache import dataset_overview
from ui.dataset_builder import dataset_builder
from ui.errors import show_error
from ui.lr_finder import lr_finder
from ui.run_panel import live_panel
from ui.state import PLAN, SELECTED_RUN, active
from ui.text import imbalance_line, md, plot_labels
from ui.uploads import save_upload

st.title("Training")
name, weights, _classes = active()

st.subheader("1. Data")
choice = st.radio("Data", ["digits (built-in)", "lfw faces (built-in)", "build a dataset here", "upload a zip",
                          "folder in the data directory"], horizontal=True)
source = None
try:
    if choice.startswith("digits"):
        source = "digits"
    elif choice.startswith("lfw"):
        source = "lfw"
    elif choice == "build a dataset here":
        source = dataset_builder()
    elif choice == "upload a zip":
        upload = st.file_uploader("A .zip of one folder per class, of train/ val/ (test/) folders of class "
                                  "folders, or of images with a labels.csv (path,label[,split])", type=["zip"])
        if upload is not None:
            stored = save_upload(upload.getvalue(), upload.name, "datasets")  # <sha12>_<name>.zip
            source = str(extract_upload(stored, display_name=upload.name))  # messages name the user's file
    else:
        root = data_root()
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "uploads") if root.is_dir() else []
        st.caption("Folders inside the app's data folder: one sub-folder per class, train/ val/ (test/) folders of "
                   "class folders, or images with a labels.csv (path,label[,split]).")
        if folders:
            source = str(resolve_data_path(st.selectbox("Folder", folders)))
        else:
            st.info("No folders in the data folder yet: copy a dataset there, or upload a zip.")
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
    left.plotly_chart(balance)
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
c1, c2, c3, c4 = st.columns(4)
epochs = c1.number_input("Epochs", 1, limits.epochs if limits else 500, 1)
batch = c2.number_input("Batch size", 1, 1024, 32)
size = c3.number_input("Image size", 16, limits.image_size if limits else 1024, 96, step=16)
val_fraction = c4.number_input("Validation share", 0.05, 0.5, 0.2, step=0.05,
                               help="Used for a random split; data that names its validation images (a val/ "
                                    "folder, val rows in a labels CSV) is validated on those instead.")
c5, c6, c7, c8 = st.columns(4)
augment = c5.toggle("Augment", False, help="random crops while training (helps longer runs)")
patience = c6.number_input("Early stop patience (0: off)", 0, 100, 0)
per_class = c7.number_input("Max images per class (0: all)", 0, fits or 1_000_000, fits)
seed = c8.number_input("Seed", 0, 10_000, 0)
c9, c10, c11 = st.columns(3)
detected = detect_budget(None)
budget = c9.text_input("Memory budget", "", placeholder=f"auto: {format_size(detected.bytes)}",
                       help=f"Peak memory the training may use, e.g. 1.5GB. Empty: {detected}. The batch is then "
                            "computed in micro-batches that fit, and their gradients add up to the batch size.")
micro = c10.number_input("Micro-batch (0: automatic)", 0, 1024, 0,
                         help="Images per forward/backward pass; 0 picks the largest that fits the budget and is fast.")
imbalanced = bool(overview and (overview.get("imbalance") or {}).get("imbalanced"))
balance_choice = c11.selectbox(
    "Class balance", list(BALANCE_CHOICES), index=0,
    help="none: every image counts once. weights: the training loss weighs each class by its inverse frequency "
         "in the training split (mean weight 1; the validation loss stays the plain mean). sampler: batches "
         "draw each class equally often (with replacement, as many images per epoch as the split has)."
         + (" This data is imbalanced (see above)." if imbalanced else ""))
gpus = torch.cuda.device_count()
# several GPUs: one process each (DistributedDataParallel); CPU processes stay a CLI option (--nproc), since
# the app's CPU cores are shared with the people using it
procs = st.number_input("Processes (one per GPU)", 1, gpus, gpus, help=(
    "DistributedDataParallel: each process trains on its own GPU with its share of the batch size (which must "
    "divide evenly); only the first writes the run.")) if gpus > 1 else 1


def current_config() -> TrainConfig:
    """What Start would train now (also what the LR finder sweeps); refused settings raise."""
    config = TrainConfig(model=name, weights=weights, data=source, plan=plan.to_dict(), epochs=int(epochs),
                         batch_size=int(batch), image_size=int(size), val_fraction=float(val_fraction),
                         augment=augment, patience=int(patience) or None, max_per_class=int(per_class) or None,
                         seed=int(seed), split_seed=int(seed), memory_budget=budget.strip() or None,
                         micro_batch=int(micro) or None, balance=balance_choice, nproc=int(procs))
    config.check_hosted()
    return config


can_start = bool(overview) and not overview["problems"]
lr_finder(current_config, enabled=can_start)

busy = active_runs(runs_root())
device_free = device_lock("auto").is_free()
waiting = len(device_queue("auto").line())
if busy or not device_free:
    running = [r for r in busy if r.status().state == "running"]
    who = f"Run {running[0].run_id} is training" if running else "Another training is using this machine's device"
    line = f"; {waiting} more wait{'s' if waiting == 1 else ''} in line" if waiting else ""
    st.info(f"{who}{line}. One training runs at a time on this machine: a run you start now waits in the "
            f"queue (number {waiting + 1}) and starts by itself when the device is free.")
start_box = st.container()
if st.button("Start training", type="primary", disabled=not can_start):
    try:
        config = current_config()
    except EngineError as exc:  # a setting out of range: said beside the settings, nothing created
        show_error(exc, start_box)
    else:
        run = create_run(runs_root(), config.to_dict())
        start_background(run, ["--out", str(runs_root())])
        st.session_state[SELECTED_RUN] = run.run_id
        st.rerun()

st.subheader("3. Runs")
runs = list_runs(runs_root())
if runs:
    table = pd.DataFrame([describe_run(r).to_dict() for r in runs])
    st.dataframe(table.drop(columns=["has_best", "reason"]), hide_index=True, height=200)
    ids = [r.run_id for r in runs]
    selected = st.session_state[SELECTED_RUN]
    pick = st.selectbox("Run", ids, index=ids.index(selected) if selected in ids else 0)
    st.session_state[SELECTED_RUN] = pick
    run = open_run(runs_root(), pick)
    live_panel(run)
    state = run.status().state
    if state in ("cancelled", "interrupted", "failed", "finished", "diverged") and run.train_state_path.is_file():
        most = limits.epochs if limits else 1000
        more = st.number_input("Train until epoch", 1, most, min(most, max(len(run.metrics()) + 1, 1)))
        resume_box = st.container()
        if st.button("Resume"):
            try:
                check_resumable(run, int(more))  # a refusal leaves the run as it was
                extend_run(run, int(more))
            except EngineError as exc:
                show_error(exc, resume_box)
            else:
                start_background(run, ["--out", str(runs_root()), "--resume-existing"])
                st.rerun()
else:
    st.caption("No runs yet.")
