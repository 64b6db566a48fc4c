"""The workbench engine: everything the app does, as a plain Python package (never imports streamlit).

Subpackages by concept, lowest layer first. A module may import from its own package and from
packages on a lower layer, never from a higher one (tests/test_layers.py enforces it):

  0  core       errors, paths, atomic files, device choice, test fault points
  1  models     which backbones exist, their weights, building one with a new head
  1  anatomy    the nn.Module tree and its stages (stem ... head)
  2  freeze     FreezePlan: what trains, at which LR, BatchNorm policy, gradual unfreezing
  2  data       bounded image decoding, datasets, zip uploads, splits, transforms
  3  config     TrainConfig: the validated recipe of one run (a module, not a package)
  4  runs       a run's folder: store, status and process health, checkpoints files, locks, events
  5  training   the loop: one epoch, the per-epoch commit, feature cache, a run from start to end
  6  outputs    what a trained run gives: predictions, evaluation, Grad-CAM, exports, a script
  7  lab        experiments across runs: comparisons and the strategy advisor
  7  cluster    a run trained on a Ray cluster: submitted as a job, followed back into the runs folder
  8  cli        ``python -m engine``

Submodules import torch lazily where start-up time matters; package ``__init__`` files import
nothing, so ``from engine.core.errors import EngineError`` stays cheap.
"""

__version__ = "0.2.0"
