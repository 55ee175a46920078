"""ducho-fast: export feature extractors to ONNX, extract multimodal features with ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

try:
    import onnxruntime  # noqa: F401
except ImportError as e:  # the core install leaves the choice of package to the user
    raise ImportError(
        "ducho-fast needs ONNX Runtime, from exactly one of its extras: "
        "pip install 'ducho-fast[cpu]' (onnxruntime), or pip install 'ducho-fast[gpu]' "
        "(onnxruntime-gpu, for CUDA). Never both: they install the same module."
    ) from e

from ducho_fast.api import export, extract, fuse
from ducho_fast.runtime.embedder import Embedder, load

__all__ = ["Embedder", "__version__", "export", "extract", "fuse", "load"]
