"""Layer 2, may import: core, anatomy. What trains and how fast.

plan: FreezePlan (strategy, BatchNorm policy, per-stage LR, gradual unfreezing), applying and
previewing it, frozen BatchNorm kept in eval mode, and optimizer parameter groups per stage.
"""
