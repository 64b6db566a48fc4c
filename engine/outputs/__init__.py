"""Layer 6, may import: core ... training. What a trained run gives back.

predict (top-k on bounded images), evaluate (validation predictions, confusion, per-class report),
explain (Grad-CAM), export (TorchScript, ONNX, weights bundle), code (the plain PyTorch script).
"""
