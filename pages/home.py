"""Home: what the workbench is for and the path through it."""
import streamlit as st

from engine.registry import DEFAULT_MODEL

st.title("Transfer-learning workbench")
st.markdown(
    """
Take a network that already learned to see on ImageNet and teach it **your** classes.
The workbench shows every step as the PyTorch it is:

1. **Pick a model**: a pretrained backbone from timm or torchvision, shown as its `nn.Module` tree.
2. **Choose what to freeze**: train only the new head (feature extraction), the last stages, or everything.
3. **Train** on your own images (or a built-in dataset) and watch it learn.
4. **Predict**: upload images and see the top classes.
"""
)
st.info(
    f"The default model is `{DEFAULT_MODEL}` with ImageNet weights that ship inside a Python "
    "package, so everything works offline."
)
