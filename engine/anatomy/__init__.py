"""Layer 1, may import: core. The model as the nn.Module tree it is.

tree (module rows, parameter counts, a summary), stages (stem ... head: the units a freeze plan
names, found from the module tree of any timm or torchvision model).
"""
