"""ONNX Runtime side: sessions with checked providers, batch preparation, the pipeline."""
