"""A config's ``runtime`` and ``input`` sections, and the same options given in code
(``ducho_fast.load``, ``RayEmbedder``): values checked, Ducho's ``gpu list`` applied, CUDA
provider options checked where the config is written rather than on the GPU node."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ducho_fast.config.model import InputOptions, RuntimeOptions
from ducho_fast.config.schema import Checker
from ducho_fast.errors import ConfigError, did_you_mean


def checked_input(raw: dict[str, Any], name: str) -> InputOptions:
    if raw["max_image_pixels"] < 1:
        raise ConfigError(f"{name}: key 'input.max_image_pixels' must be >= 1.")
    if raw["max_audio_seconds"] <= 0:
        raise ConfigError(f"{name}: key 'input.max_audio_seconds' must be > 0.")
    return InputOptions(**raw)


def apply_gpu_list(runtime: RuntimeOptions, gpu_list: Any, name: str) -> RuntimeOptions:
    """Honour Ducho's ``gpu list`` (-1: CPU, N: cuda:N) when ``runtime.device`` is auto."""
    if gpu_list is None or runtime.device != "auto":
        return _check_device(runtime, name)
    first = str(gpu_list[0] if isinstance(gpu_list, list) and gpu_list else gpu_list)
    first = first.split(",")[0].strip()
    if first in ("-1", ""):
        device = "cpu"
    elif first.isascii() and first.isdigit():
        device = f"cuda:{first}"
    else:
        raise ConfigError(f"{name}: key 'gpu list' is {gpu_list!r}; use -1 for CPU or GPU ids.")
    return _check_device(RuntimeOptions(**{**runtime.__dict__, "device": device}), name)


def word_switches(runtime: dict[str, Any]) -> dict[str, Any]:
    """``io_binding`` and ``spin_wait`` as words: YAML reads a bare ``on``/``off`` as a bool."""
    words = {True: "on", False: "off"}
    return {
        k: words[v]
        if k in ("io_binding", "spin_wait", "memory_limit") and isinstance(v, bool)
        else v
        for k, v in runtime.items()
    }


def runtime_options(
    runtime: RuntimeOptions | Mapping[str, Any] | None, source: str = "RuntimeOptions"
) -> RuntimeOptions:
    """Runtime options given in code (``ducho_fast.load``, ``RayEmbedder``), checked as a
    config's ``runtime`` section is: unknown keys, types, allowed values, CUDA options."""
    if runtime is None:
        return RuntimeOptions()
    if not isinstance(runtime, RuntimeOptions | Mapping):
        raise ConfigError(
            f"{source}: runtime options are a RuntimeOptions or a mapping of a config's runtime "
            f"keys, such as {{'device': 'cpu'}}; found {type(runtime).__name__}."
        )
    raw = dict(vars(runtime)) if isinstance(runtime, RuntimeOptions) else dict(runtime)
    Checker(source).check({"runtime": raw})
    return _check_device(RuntimeOptions(**word_switches(raw)), source)


def input_options(
    inputs: InputOptions | Mapping[str, Any] | None, source: str = "InputOptions"
) -> InputOptions:
    """Input options given in code (``ducho_fast.load``), checked as a config's ``input``
    section is; keys not given keep their defaults."""
    if inputs is None:
        return InputOptions()
    if not isinstance(inputs, InputOptions | Mapping):
        raise ConfigError(
            f"{source}: input options are an InputOptions or a mapping of a config's input "
            f"keys, such as {{'jpeg_decode': 'reduced'}}; found {type(inputs).__name__}."
        )
    raw = dict(vars(inputs)) if isinstance(inputs, InputOptions) else dict(inputs)
    Checker(source).check({"input": raw})
    return checked_input({**vars(InputOptions()), **raw}, source)


def _check_device(runtime: RuntimeOptions, name: str) -> RuntimeOptions:
    device = runtime.device
    ok = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device[5:].isascii() and device[5:].isdigit()
    )
    if not ok:
        raise ConfigError(
            f"{name}: key 'runtime.device' is {device!r}; allowed: auto, cpu, cuda, cuda:N."
        )
    for key in (
        "threads",
        "workers",
        "writers",
        "token_budget",
        "sort_window",
        "concurrent_batches",
    ):
        if getattr(runtime, key) < 0:
            raise ConfigError(f"{name}: key 'runtime.{key}' must be >= 0 (0 = automatic).")
    for key in ("threads", "workers"):
        if getattr(runtime, key) > MAX_THREADS:
            raise ConfigError(
                f"{name}: key 'runtime.{key}' is {getattr(runtime, key)}; at most "
                f"{MAX_THREADS} (0 = one per usable CPU, the best choice on most machines)."
            )
    if runtime.writers > MAX_WRITERS:
        raise ConfigError(
            f"{name}: key 'runtime.writers' is {runtime.writers}; at most {MAX_WRITERS} "
            "(0 = one, and up to 8 as the writers fall behind the model)."
        )
    if runtime.prefetch < 1:
        raise ConfigError(f"{name}: key 'runtime.prefetch' must be >= 1.")
    limit_value(runtime.memory_limit, name)
    for key, value in runtime.cuda_options.items():
        if key not in CUDA_OPTIONS:
            raise ConfigError(
                f"{name}: key 'runtime.cuda_options.{key}' is not a CUDA provider option "
                f"ducho-fast passes on; allowed: {', '.join(sorted(CUDA_OPTIONS))}."
            )
        _check_cuda_option(key, value, name)
    return runtime


# runtime.memory_limit (see ducho_fast.runtime.memory).
LEAST = 64 * 2**20  # the smallest limit a config may set: less fails single items

UNITS = {"mb": 10**6, "gb": 10**9, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")


def limit_value(value: Any, where: str) -> int | str | None:
    """``runtime.memory_limit`` checked: ``"auto"``, None for ``off``, or bytes."""
    if value == "auto":
        return "auto"
    if value == "off" or value is False:  # YAML reads a bare off as false
        return None
    match = _SIZE.fullmatch(str(value).lower()) if isinstance(value, str) else None
    if match is None or match.group(2) not in UNITS:
        raise ConfigError(
            f"{where}: key 'runtime.memory_limit' is {value!r}; use auto, off, or a size with "
            "its unit: 8GB, 8GiB, 512MB or 512MiB (MB and GB count in 1000s, MiB and GiB in "
            "1024s)."
        )
    size = int(float(match.group(1)) * UNITS[match.group(2)])
    if size < LEAST:
        raise ConfigError(
            f"{where}: key 'runtime.memory_limit' is {value!r}, under 64MiB: a model's "
            "activations for one item need more. Set a larger size, or auto."
        )
    return size


# The most threads ONNX Runtime or the readers may start: more than any machine's CPUs.
# runtime.threads: 100000 took 4 GB and the system's thread limit (other processes' threads
# could not start) and did not end on SIGTERM; as many workers would read the whole input
# ahead (each reads 8 items ahead).
MAX_THREADS = 1024
MAX_WRITERS = 64  # threads saving features: past a few, they only wait on one another

# The CUDA execution provider's options (onnxruntime docs, "CUDA Execution Provider") and the
# values its parser takes: names for the enums, 0/1/true/false for the switches, bytes for the
# memory limit. Checked when the config is read, so a GPU job's config fails where it was
# written, not when its session is made on the GPU node.
BYTES = "bytes"
SWITCH = "switch"
CUDA_OPTIONS: dict[str, tuple[str, ...] | str] = {
    "cudnn_conv_algo_search": ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    "arena_extend_strategy": ("kNextPowerOfTwo", "kSameAsRequested"),
    "gpu_mem_limit": BYTES,
    "cudnn_conv_use_max_workspace": SWITCH,
    "do_copy_in_default_stream": SWITCH,
    "tunable_op_enable": SWITCH,
    "tunable_op_tuning_enable": SWITCH,
    "use_tf32": SWITCH,
}
_SWITCH_WORDS = ("0", "1", "true", "false", "True", "False")  # onnxruntime's bool parser


def _check_cuda_option(key: str, value: Any, name: str) -> None:
    kind = CUDA_OPTIONS[key]
    where = f"{name}: key 'runtime.cuda_options.{key}' is {value!r}"
    if kind == SWITCH:
        if (
            isinstance(value, bool)
            or (type(value) is int and value in (0, 1))
            or (isinstance(value, str) and value in _SWITCH_WORDS)
        ):
            return
        raise ConfigError(f"{where}; allowed: true or false (1 or 0).")
    if kind == BYTES:
        digits = str(value)  # ASCII digits only: not True, 8e9, "8GB" or "²"
        if digits.isascii() and digits.isdigit() and int(digits) > 0:
            return
        raise ConfigError(f"{where}; give the limit in bytes, e.g. {8 * 2**30} for 8 GiB.")
    if not (isinstance(value, str) and value in kind):
        word = str(value)
        hint = next((f" Did you mean '{w}'?" for w in kind if w.lower() == word.lower()), "")
        raise ConfigError(f"{where}; allowed: {', '.join(kind)}.{hint or did_you_mean(word, kind)}")
