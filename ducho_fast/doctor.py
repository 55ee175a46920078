"""``ducho-fast doctor``: what is installed and which execution providers really run."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ducho_fast import __version__
from ducho_fast.runtime.cpu import cpu_quota_report
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
    "ray",
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


def cuda_runs() -> bool:
    """Whether a real session asked for CUDA runs on it (never with the CPU onnxruntime)."""
    return CUDA in ort.get_available_providers() and probe(CUDA) == CUDA


@dataclass
class Health:
    """What ``doctor`` found: lines to print, and what would make a health check fail."""

    lines: list[str] = field(default_factory=list)
    cuda_ok: bool = False
    cuda_why: str = ""  # why CUDA does not really run, when it does not
    conflict: bool = False  # onnxruntime and onnxruntime-gpu both installed

    def failures(self, require_cuda: bool) -> list[str]:
        out = []
        if self.conflict:
            out.append(
                "onnxruntime and onnxruntime-gpu are both installed; they install the same "
                "module, so which one runs is an accident. Uninstall both, then install one: "
                "pip install 'ducho-fast[gpu]' (CUDA) or 'ducho-fast[cpu]'."
            )
        if require_cuda and not self.cuda_ok:
            out.append(f"CUDA was required but no CUDA session really runs: {self.cuda_why}")
        return out


def report() -> Health:
    """Versions, the providers a real session gets, and the CPU quota."""
    health = Health()
    lines = health.lines
    lines.append(
        f"ducho-fast {__version__}, Python {platform.python_version()} on {platform.platform()}"
    )
    installed = [(p, _version(p)) for p in PACKAGES]
    lines += [f"  {p:<22} {v}" for p, v in installed if v]
    lines.append("  not installed: " + ", ".join(p for p, v in installed if not v))
    health.conflict = bool(_version("onnxruntime") and _version("onnxruntime-gpu"))
    available = ort.get_available_providers()
    lines.append(f"providers listed by onnxruntime: {', '.join(available)}")
    if CUDA in available:
        got = probe(CUDA)
        health.cuda_ok = got == CUDA
        if not health.cuda_ok:
            health.cuda_why = (
                f"onnxruntime lists {CUDA}, but a session asked for it runs on {got} (the "
                "CUDA/cuDNN libraries it needs are missing, or no GPU is visible: run the "
                "container with --gpus all)."
            )
        lines.append(
            f"CUDA session really runs on: {got}" + ("" if health.cuda_ok else "  (not CUDA)")
        )
    else:
        health.cuda_why = (
            f"this onnxruntime build has no {CUDA}; install onnxruntime-gpu instead of "
            "onnxruntime (pip install 'ducho-fast[gpu]')."
        )
    lines.append(f"CPU session runs on: {probe(CPU)}")
    lines.append(f"CPUs this process may use: {cpu_quota_report()}")
    return health
