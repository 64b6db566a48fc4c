"""Shared fixtures: real photos that ship in scikit-image, tiny timm models, temp images."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never reach a hub: make that explicit so nothing waits on network retries.
os.environ.setdefault("WORKBENCH_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# AppTest runs pages without a browser: no pause before a session's first charts (ui/charts.py)
os.environ.setdefault("WORKBENCH_FIRST_CHART_PAUSE_S", "0")
# float32 on any CPU: the suite's numbers must not depend on whether its CPU has bf16 units (tests/test_precision.py
# switches the probe back on where it is the subject)
os.environ.setdefault("WORKBENCH_CPU_BF16", "off")
# The device lock is machine-wide: tests take it in a folder of their own, not a developer's app's.
os.environ.setdefault("WORKBENCH_LOCKS", tempfile.mkdtemp(prefix="workbench-test-locks-"))
# What runs keep per machine (exported feature graphs, probe answers) goes to the suite's own folder.
os.environ.setdefault("WORKBENCH_CACHE", tempfile.mkdtemp(prefix="workbench-test-cache-"))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def photo_dir() -> Path:
    """Folder of sample photos shipped inside the scikit-image wheel."""
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def cat_photo(photo_dir: Path) -> Path:
    return photo_dir / "chelsea.png"  # a tabby cat


@pytest.fixture(scope="session")
def coffee_photo(photo_dir: Path) -> Path:
    return photo_dir / "coffee.png"  # a cup of espresso


@pytest.fixture(scope="session")
def default_handle():
    """The offline default: efficientnet_lite0 with packaged ImageNet weights (loaded once)."""
    from engine.models.factory import create_model

    return create_model()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def tiny_lfw_run(root: Path, run_id: str | None = None):
    """One finished tiny run (test_resnet, random init, 24 LFW faces at 32 px, 1 epoch, a few seconds):
    the run that bundle, export, TTA, page and browser tests open, evaluate and predict with."""
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run
    from engine.training.loop import fit

    config = TrainConfig(model="timm:test_resnet", weights="none", data="lfw", image_size=32, max_per_class=12,
                         epochs=1, num_workers=0, plan=FreezePlan.full(head_lr=1e-3).to_dict())
    run = create_run(root, config.to_dict(), run_id=run_id)
    assert fit(config, run).status == "finished"
    return run
