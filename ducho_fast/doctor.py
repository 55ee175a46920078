"""``ducho-fast doctor``: what is installed and which execution providers really run."""

from __future__ import annotations

import platform
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ducho_fast import __version__
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.session import CPU, CUDA, session_options

PACKAGES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "tokenizers",
    "pillow",
    "torch",
    "torchvision",
    "transformers",
    "sentence-transformers",
    "tensorflow",
    "tensorflow-cpu",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def probe(provider: str) -> str:
    """The provider a real session on a tiny graph runs with when ``provider`` is asked for."""
    path = Path(str(resources.files("ducho_fast.runtime").joinpath("probe.onnx")))
    session = ort.InferenceSession(
        str(path), sess_options=session_options(1), providers=list(dict.fromkeys([provider, CPU]))
    )
    session.run(None, {"x": np.ones(4, np.float32)})
    return str(session.get_providers()[0])


def report() -> tuple[list[str], bool]:
    """Lines to print, and whether CUDA really runs."""
    lines = [
        f"ducho-fast {__version__}, Python {platform.python_version()} on {platform.platform()}"
    ]
    installed = [(p, _version(p)) for p in PACKAGES]
    lines += [f"  {p:<22} {v}" for p, v in installed if v]
    lines.append("  not installed: " + ", ".join(p for p, v in installed if not v))
    if _version("onnxruntime") and _version("onnxruntime-gpu"):
        lines.append(
            "WARNING: onnxruntime and onnxruntime-gpu are both installed; they share one "
            "module name. Uninstall both and install one."
        )
    available = ort.get_available_providers()
    lines.append(f"providers listed by onnxruntime: {', '.join(available)}")
    cuda_ok = False
    if CUDA in available:
        got = probe(CUDA)
        cuda_ok = got == CUDA
        lines.append(
            f"CUDA session really runs on: {got}"
            + ("" if cuda_ok else "  (CUDA/cuDNN libraries missing: runs on CPU)")
        )
    lines.append(f"CPU session runs on: {probe(CPU)}")
    lines.append(f"CPUs this process may use: {cpu_quota()}")
    return lines, cuda_ok
