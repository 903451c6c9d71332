"""Export: ONNX, INT8 (QDQ), OpenVINO IR, TensorRT, verified into model bundles."""
