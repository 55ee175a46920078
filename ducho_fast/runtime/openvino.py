"""bf16 artifacts on Intel CPUs: OpenVINO's CPU plugin for ONNX Runtime, in bfloat16.

ONNX Runtime's own CPU provider has no bfloat16 kernels on x86 (onnxruntime #19937), so the
AMX-BF16 and AVX512-BF16 units of recent Intel Xeons (Sapphire Rapids and later) idle under it.
OpenVINO's execution provider (``onnxruntime-ep-openvino``, the ``openvino`` extra: a 52 MB
wheel with no dependencies, registered with the installed onnxruntime as a plugin) runs an
fp32 graph with bfloat16 math where the CPU has it. A ``precision: bf16`` artifact is the fp32
graph, checked at export as it runs here (:mod:`ducho_fast.exporters.precision`).

Measured on a 2-vCPU Intel Xeon with AMX (all-MiniLM-L6-v2, 1024 generated product
descriptions in extract's batches, bare sessions, 4 rounds; ``benchmarks/text.py`` for the
end-to-end figures): bf16 844 texts/s, ONNX Runtime's fp32 260/s, ``SentenceTransformer.encode``
209/s; min cosine against fp32 0.99997.

Nothing here imports OpenVINO itself: the plugin is a shared library ONNX Runtime loads.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

import onnxruntime as ort

OPENVINO = "OpenVINOExecutionProvider"
INSTALL = "pip install 'ducho-fast[openvino]' (the onnxruntime-ep-openvino wheel)"

_LOCK = threading.Lock()
_REGISTERED: dict[str, Any] = {}  # "devices": the plugin's CPU devices, or "error": why none


def cpu_devices() -> list[Any]:
    """The plugin's CPU devices, registering it with ONNX Runtime once a process; [] where it
    is not installed or ONNX Runtime cannot load it (:func:`unusable` says why)."""
    with _LOCK:
        if not _REGISTERED:
            _REGISTERED.update(_register())
        return list(_REGISTERED.get("devices", []))


def _register() -> dict[str, Any]:
    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        return {"error": f"OpenVINO's plugin for ONNX Runtime is not installed: {INSTALL}"}
    if not hasattr(ort, "register_execution_provider_library"):
        return {
            "error": f"onnxruntime {ort.__version__} cannot load execution provider plugins "
            "(1.23 or later can): upgrade onnxruntime"
        }
    try:
        ort.register_execution_provider_library(OPENVINO, plugin.get_library_path())
        devices = [
            d
            for d in ort.get_ep_devices()
            if d.ep_name == OPENVINO and d.device.type == ort.OrtHardwareDeviceType.CPU
        ]
    except Exception as e:  # a plugin built for another onnxruntime, a missing library
        return {"error": f"ONNX Runtime could not load OpenVINO's plugin ({e})"}
    if not devices:
        return {"error": "OpenVINO's plugin found no CPU device"}
    return {"devices": devices}


def has_bf16(device: Any) -> bool:
    """Whether OpenVINO computes in bfloat16 on this CPU (AMX-BF16 or AVX512-BF16); where
    not, it would quietly keep fp32."""
    capabilities = str(device.ep_metadata.get("OPTIMIZATION_CAPABILITIES", ""))
    return "BF16" in capabilities.split()


def unusable() -> str | None:
    """Why a bf16 artifact cannot run in bfloat16 here; None where it can."""
    devices = cpu_devices()
    if not devices:
        return str(_REGISTERED.get("error"))
    if not has_bf16(devices[0]):
        name = devices[0].ep_metadata.get("FULL_DEVICE_NAME", "this CPU")
        return (
            f"{name} has no bfloat16 math (AMX-BF16 or AVX512-BF16, Intel Xeon from Sapphire "
            "Rapids on)"
        )
    return None


# The CPU flags (Linux's /proc/cpuinfo) of the bfloat16 math OpenVINO computes with.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first of :data:`BF16_FLAGS` this CPU lists, None where it lists none (or where
    there is no ``/proc/cpuinfo``): what tells, without OpenVINO's plugin, that it would
    compute in bfloat16 here."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    lines = (line.partition(":") for line in text.splitlines())
    listed = next((set(v.split()) for k, _, v in lines if k.strip() == "flags"), set())
    return next((flag for flag in BF16_FLAGS if flag in listed), None)


def bf16_offer(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Whether ``precision: bf16`` is worth offering here: "runs" where it runs (the plugin
    is installed and computes in bfloat16), "install" where the CPU lists bfloat16 math but
    the plugin is not installed, "" otherwise (no such math, or a plugin that cannot load)."""
    if unusable() is None:
        return "runs"
    return "install" if not plugin_installed() and cpu_bf16_flag(cpuinfo) else ""


def plugin_installed() -> bool:
    """Whether OpenVINO's plugin for ONNX Runtime is installed (not whether it loads)."""
    return importlib.util.find_spec("onnxruntime_ep_openvino") is not None


def add_bf16_provider(opts: ort.SessionOptions, threads: int) -> None:
    """Ask ``opts`` for OpenVINO's CPU plugin in bfloat16 on ``threads`` threads (OpenVINO's
    own: ONNX Runtime's thread settings do not reach it, and by default it takes every core of
    the machine, not the process's CPU quota). One request at a time, as a lane.

    Its threads are not pinned to cores. Under the latency hint OpenVINO pins them on Linux
    by default, each session to the first cores it may use, so sessions of several processes
    (Ray actors on one node, shards or `load` in server workers on one machine) pile onto the
    same cores: two processes of one thread each ran ResNet50 in bf16 at 45-46 images/s each
    pinned, 91-104 unpinned, on 2 CPUs. Within one extract, unpinned ran level with pinned
    (0.99x, 6 alternating rounds)."""
    config = {
        "CPU": {
            "INFERENCE_PRECISION_HINT": "bf16",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": str(threads),
            "ENABLE_CPU_PINNING": "NO",
        }
    }
    opts.add_provider_for_devices(cpu_devices()[:1], {"load_config": json.dumps(config)})
