"""Layer 6, may import: core ... training. What a trained run gives back.

predict (top-k on bounded images), evaluate (validation predictions, confusion, per-class report),
explain (Grad-CAM), export (TorchScript, ONNX with classes + preprocessing in its metadata, weights
bundle), onnx_export (predict_onnx.py, INT8 quantisation, onnxruntime accuracy), run_export (``export
--format`` of a run's best model), code (the plain PyTorch script).
"""
