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
from collections.abc import Iterator
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
    # transformers imports torchvision and torchaudio when they are installed: both must be
    # importable first; it works without either.
    with contextlib.suppress(MissingExtraError):
        import_torchvision()
    with contextlib.suppress(MissingExtraError):
        import_torchaudio()
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


def import_torchaudio() -> Any:
    """Import torchaudio's Python models even where its C++ extension cannot load.

    The PyPI torchaudio wheel is a CUDA build: beside the CPU torch, loading
    ``_torchaudio.abi3.so`` fails (``libc10_cuda.so`` is missing) and so does ``import
    torchaudio``. torchaudio already has a code path for builds without the extension (its
    ``_load_lib`` returns False when the library is absent, as in pex deployments): this loads
    its ``_extension.utils`` first with a ``_load_lib`` that takes that path when the library
    cannot load. The models (wav2vec2, HuBERT, WavLM …) and pipeline bundles then work; the
    C++-only features (alignment, CTC decoders) do not. A no-op where it imports normally.
    """
    import_torch()
    try:
        import torchaudio
    except ImportError as e:
        raise MissingExtraError("torchaudio", "torch", "Exporting torchaudio models") from e
    except OSError as e:
        if "torchaudio" not in str(e):
            raise
        for name in [m for m in sys.modules if m.startswith("torchaudio")]:
            del sys.modules[name]
        _without_extension()
        import torchaudio
    return torchaudio


def _without_extension() -> None:
    import importlib.util

    found = importlib.util.find_spec("torchaudio")
    assert found is not None and found.submodule_search_locations is not None
    path = f"{next(iter(found.submodule_search_locations))}/_extension/utils.py"
    spec = importlib.util.spec_from_file_location("torchaudio._extension.utils", path)
    assert spec is not None and spec.loader is not None
    utils: Any = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = utils
    spec.loader.exec_module(utils)
    load_lib = utils._load_lib

    def load_or_skip(lib: str) -> bool:
        try:
            return bool(load_lib(lib))
        except OSError:
            return False

    utils._load_lib = load_or_skip


def import_keras() -> tuple[Any, Any]:
    """TensorFlow and Keras 3, with TensorFlow's start-up logging quieted."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with _c_stderr_muted():
            import keras
            import tensorflow as tf
    except ImportError as e:
        raise MissingExtraError("tensorflow-cpu", "tf", "Exporting TensorFlow/Keras models") from e
    return tf, keras


@contextlib.contextmanager
def _c_stderr_muted() -> Iterator[None]:
    """The process's standard error (file descriptor 2) sent to /dev/null, then restored.

    TensorFlow 2.21's C++ libraries print absl lines as they load ("oneDNN custom operations
    are on", "All log messages before absl::InitializeLog() ...") whatever
    TF_CPP_MIN_LOG_LEVEL says. Only the import is muted, and Python's own errors are raised,
    not printed, so none is lost. ``DUCHO_FAST_TF_LOGS=1`` keeps them.
    """
    import os

    if os.environ.get("DUCHO_FAST_TF_LOGS") == "1":
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a daemon): nothing to mute
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
