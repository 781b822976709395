"""The onnx image tower: exporting it (`python -m service.engine.onnx.export`) and running it with onnxruntime."""
