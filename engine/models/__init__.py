"""Layer 1, may import: core. Which backbones exist and how one is built.

registry (``timm:name`` / ``torchvision:name`` ids), catalog (searchable list with parameter counts),
weights (packaged, hub and user files; loading with a fit report), factory (``create_model``: a
backbone with its head replaced, described by a ModelSpec that travels with every checkpoint).
"""
