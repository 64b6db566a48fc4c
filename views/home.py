"""Home: what the workbench is for and the path through it."""
import streamlit as st

from engine.models.registry import DEFAULT_MODEL

st.title("Transfer-learning workbench")
st.markdown(
    """
Take a network that already learned to see on ImageNet and teach it **your** classes.
Every step is shown as the PyTorch it is:
"""
)
steps = [
    ("views/model_explorer.py", "1. Pick a model", "A pretrained backbone from timm or torchvision, "
     "shown as its `nn.Module` tree: parameters, buffers, output shapes."),
    ("views/freeze_configurator.py", "2. Choose what to freeze", "Train only a new head (feature "
     "extraction), the last stages, or everything; BatchNorm handled; an advisor says why."),
    ("views/training.py", "3. Train", "On built-in data or your own images; live curves; runs keep "
     "going when you leave the page."),
    ("views/inference.py", "4. Predict", "Upload images and see the top classes, from the pretrained "
     "model or your trained run."),
]
for page, label, text in steps:
    cols = st.columns([1, 3])
    cols[0].page_link(page, label=label)
    cols[1].markdown(text)
st.info(
    f"The default model is `{DEFAULT_MODEL}` with ImageNet weights that ship inside a Python "
    "package, so everything works offline."
)
