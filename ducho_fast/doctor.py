"""``ducho-fast doctor``: what is installed and which execution providers really run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ducho_fast import __version__
from ducho_fast.runtime.cpu import cpu_quota_report
from ducho_fast.runtime.memory import memory_report
from ducho_fast.runtime.openvino import bf16_offer, cpu_bf16_flag, unusable
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
    "onnxruntime-ep-openvino",
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
    lines += [f"  {p:<24} {v}" for p, v in installed if v]
    lines.append("  not installed: " + ", ".join(p for p, v in installed if not v))
    health.conflict = bool(_version("onnxruntime") and _version("onnxruntime-gpu"))
    available = ort.get_available_providers()
    lines.append(f"providers listed by onnxruntime: {', '.join(available)}")
    if CUDA in available:
        got = probe(CUDA)
        health.cuda_ok = got == CUDA
        if not health.cuda_ok:
            health.cuda_why = (
                f"onnxruntime lists {CUDA}, but a session asked for it runs on {got}. "
                + why_no_cuda()
            )
        lines.append(
            f"CUDA session really runs on: {got}" + ("" if health.cuda_ok else "  (not CUDA)")
        )
    else:
        health.cuda_why = why_no_cuda()
    lines.append(f"CPU session runs on: {probe(CPU)}")
    why_not = unusable()
    would = (
        f" (this CPU lists {cpu_bf16_flag()}: it would run with the plugin)"
        if bf16_offer() == "install"
        else ""
    )
    lines.append(
        "precision bf16 (OpenVINO's CPU plugin, bfloat16 math): "
        + ("runs here" if why_not is None else f"not here: {why_not}{would}")
    )
    lines.append(f"CPUs this process may use: {cpu_quota_report()}")
    lines.append(f"memory this process may take: {memory_report()}")
    lines += media_formats()
    return health


def media_formats() -> list[str]:
    """Which image and audio formats that depend on how Pillow and libsndfile were built
    decode here (AVIF from Pillow 11.2's wheels, MP3 from libsndfile 1.1, Opus from 1.0.29),
    and HEIC/HEIF and M4A/AAC, which need a package of their own (the ``heif`` and ``m4a``
    extras)."""
    import soundfile
    from PIL import features

    from ducho_fast.data.audio.audio import FFMPEG_INSTALL, pyav_found
    from ducho_fast.data.visual.images import HEIF_INSTALL, heif_plugin

    def said(found: dict[str, bool]) -> str:
        return ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in found.items())

    images = {"AVIF": "avif", "JPEG 2000": "jpg_2000", "WebP": "webp"}
    audio = {
        "MP3": "MP3" in soundfile.available_formats(),
        "Opus": "OPUS" in soundfile.available_subtypes("OGG"),
    }
    plugin = heif_plugin()
    heif = (
        f"HEIC/HEIF yes ({plugin.replace('_', '-')} {_version(plugin.replace('_', '-'))})"
        if plugin
        else f"HEIC/HEIF no ({HEIF_INSTALL})"
    )
    return [
        f"image formats (Pillow {_version('pillow')}): "
        + said({name: bool(features.check(f)) for name, f in images.items()})
        + f", {heif}",
        f"audio formats (libsndfile {soundfile.__libsndfile_version__}): {said(audio)}, "
        + (
            f"M4A/AAC yes (av {_version('av')})"
            if pyav_found()
            else f"M4A/AAC no ({FFMPEG_INSTALL})"
        ),
    ]


# The NVIDIA driver's own library: missing where no driver is installed, or in a container
# started without the GPU (the NVIDIA Container Toolkit mounts it with --gpus).
DRIVER_LIBRARY = "libcuda.so.1"


def why_no_cuda() -> str:
    """Why a session asked for CUDA would not run on it, in words that say what to do: an
    onnxruntime without CUDA; the libraries its CUDA provider needs that the dynamic loader
    does not find (``ldd``), and where NVIDIA's pip packages hold them; or, when every one is
    found, that no GPU is usable. Called once CUDA is known not to run."""
    if CUDA not in ort.get_available_providers():
        return (
            f"This onnxruntime build has no {CUDA}; install onnxruntime-gpu instead of "
            "onnxruntime (pip install 'ducho-fast[gpu]')."
        )
    provider = cuda_provider_library()
    missing = missing_libraries(provider) if provider else None
    if provider is None or missing is None:  # no provider file where looked, or no ldd
        return (
            "Its CUDA or cuDNN libraries are missing, or no GPU is usable: check `nvidia-smi` "
            "and the CUDA and cuDNN versions this onnxruntime-gpu needs; run a container with "
            "--gpus all."
        )
    if not missing:
        return (
            "The CUDA provider's own libraries load, so no GPU is usable here (check "
            "`nvidia-smi`: the driver must be as new as this CUDA needs; run a container with "
            "--gpus all), or cuDNN, which it loads later, is missing."
        )
    parts = [f"{provider.name} needs {', '.join(missing)}, which the dynamic loader does not find."]
    if DRIVER_LIBRARY in missing:
        parts.append(
            f"{DRIVER_LIBRARY} is the NVIDIA driver's: install the driver, or run the container "
            "with --gpus all."
        )
    toolkit = [name for name in missing if name != DRIVER_LIBRARY]
    folders = folders_holding(toolkit, site_roots())
    held = [name for name in toolkit if any(name in names for names in folders.values())]
    if held:
        path = ":".join(str(f) for f in folders)
        parts.append(
            f"NVIDIA's pip packages installed here hold {', '.join(held)}: export "
            f"LD_LIBRARY_PATH={path}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} and run again."
        )
    if len(held) < len(toolkit):
        parts.append(
            "Install the CUDA and cuDNN versions this onnxruntime-gpu is built for (not "
            f"installed: {', '.join(n for n in toolkit if n not in held)}; see "
            "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html), "
            "or use the CUDA image."
        )
    return " ".join(parts)


def cuda_provider_library() -> Path | None:
    """onnxruntime-gpu's CUDA provider, the library ONNX Runtime loads when CUDA is asked for."""
    capi = Path(ort.__file__).parent / "capi"
    found = sorted(capi.glob("libonnxruntime_providers_cuda*.so*"))
    return found[0] if found else None


def missing_libraries(library: Path) -> list[str] | None:
    """The shared libraries ``library`` needs that the dynamic loader does not find, as ``ldd``
    reports them; None where ``ldd`` cannot tell (not installed, or not a library it reads)."""
    try:
        listed = subprocess.run(
            ["ldd", str(library)], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return not_found(listed.stdout) if listed.returncode == 0 else None


def not_found(ldd_output: str) -> list[str]:
    """The names on ``ldd``'s "=> not found" lines, in its order, each once."""
    names = [
        line.split("=>")[0].strip() for line in ldd_output.splitlines() if "=> not found" in line
    ]
    return list(dict.fromkeys(names))


def site_roots() -> list[Path]:
    """The folders packages are installed into for this interpreter (venv, user, system)."""
    roots = [Path(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return [r for r in dict.fromkeys(roots) if r.is_dir()]


def folders_holding(names: Iterable[str], roots: Iterable[Path]) -> dict[Path, set[str]]:
    """The folders of NVIDIA's pip packages (``<root>/nvidia/...``, any layout) that hold any
    of the libraries ``names``, with the ones each holds, in a stable order."""
    wanted = set(names)
    folders: dict[Path, set[str]] = {}
    for root in roots:
        nvidia = root / "nvidia"
        if not wanted or not nvidia.is_dir():
            continue
        for dirpath, _, files in sorted(os.walk(nvidia)):
            if held := wanted.intersection(files):
                folders.setdefault(Path(dirpath), set()).update(held)
    return folders
