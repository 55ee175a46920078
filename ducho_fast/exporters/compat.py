"""Importing torch-side frameworks where their wheels do not match the installed torch.

The PyPI torchvision wheel is a CUDA build; beside the CPU torch its C++ operators are
missing and ``import torchvision`` fails with "operator torchvision::nms does not exist", which
also breaks transformers (it imports torchvision when installed). Defining the two operator
schemas that torchvision registers at import time lets its Python models, feature extraction
and transforms load; the detection C++ kernels stay unavailable. A no-op where torchvision
imports normally (the CUDA image).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from ducho_fast.errors import MissingExtraError

_LIBRARY: Any = None  # kept referenced: the schemas live as long as this object


def import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise MissingExtraError("torch", "torch", "Exporting this model") from e
    return torch


def import_torchvision() -> Any:
    """Import torchvision, defining its missing operator schemas first when needed."""
    global _LIBRARY
    torch = import_torch()
    try:
        import torchvision
    except ImportError as e:
        raise MissingExtraError("torchvision", "torch", "Exporting torchvision models") from e
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point)"
            " -> Tensor"
        )
        import torchvision
    return torchvision


def import_transformers() -> Any:
    with contextlib.suppress(MissingExtraError):  # transformers works without torchvision
        import_torchvision()
    try:
        import transformers
    except ImportError as e:
        raise MissingExtraError("transformers", "hf", "Exporting Transformers models") from e
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def import_sentence_transformers() -> Any:
    import_transformers()
    try:
        import sentence_transformers
    except ImportError as e:
        raise MissingExtraError(
            "sentence-transformers", "hf", "Exporting sentence-transformers models"
        ) from e
    return sentence_transformers
