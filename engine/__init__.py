"""The workbench engine: models, anatomy, freezing, data, training, runs and inference.

A plain Python package (it never imports streamlit): everything the app does can be done from
here or from ``python -m engine``. Submodules import torch lazily where start-up time matters.
"""

__version__ = "0.1.0"
