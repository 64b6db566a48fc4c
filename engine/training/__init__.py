"""Layer 5, may import: core ... runs. The training loop, explicit as the textbook has it.

epoch (one pass: zero_grad, forward, loss, backward, step; and evaluation), loop (``fit``: set-up,
epochs, early stopping, resume), checkpoint (the atomic per-epoch commit and the repair after a
crash), feature_cache (frozen backbone: features once, then only the head trains), prefix_cache (the same one
cut lower: frozen stages once, then only the top stages train), run (a run folder
trained under the device lock with a heartbeat and a final status), metrics (macro-F1 and balanced
accuracy from a confusion matrix).
"""
