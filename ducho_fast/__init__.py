"""ducho-fast: export feature extractors to ONNX, extract multimodal features with ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from ducho_fast.api import export, extract, fuse
from ducho_fast.runtime.embedder import Embedder, load

__all__ = ["Embedder", "__version__", "export", "extract", "fuse", "load"]
