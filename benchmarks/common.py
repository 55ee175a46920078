"""What the benchmarks share: the FLOP limit of this machine, timing, the final JSON line."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Where every system a benchmark compares runs (``--device``): the source framework, extract
# and the bare session, all on one device. Never "auto": ONNX Runtime's would take CUDA where
# onnxruntime-gpu finds a GPU while the source framework stayed on the CPU.
DEVICES = ("cpu", "cuda")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The scripts import these from here; the package's own, which `ducho-fast bench` times with.
from ducho_fast.bench_timing import cpu_seconds, rounds  # noqa: E402, F401


def work_folder(given: Path | None, prefix: str) -> Path:
    """``given`` (created if missing, kept), or a temporary folder removed when the benchmark
    exits: the models, JPEGs and features of one run take 0.1-0.3 GB."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def fresh_run(work: Path, device: str) -> dict[str, Any]:
    """The head of a benchmark's config: data and model store in ``work``, everything on
    ``device`` with no fallback to the CPU (a comparison across two devices times no system),
    and no resuming: each round is a first run."""
    return {
        "dataset_path": str(work),
        "store": str(work / "store"),
        "runtime": {"device": device, "allow_fallback": False},
        "output": {"resume": False},
    }


def add_work_option(parser: argparse.ArgumentParser) -> None:
    """``--work``: the folder :func:`work_folder` is given."""
    parser.add_argument(
        "--work", type=Path, default=None, help="folder, kept (default: a temp one, removed)"
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where all the compared systems run (default cpu; cuda: the source framework "
        "with torch on the GPU, extract and the bare session with ONNX Runtime's CUDA provider)",
    )


def check_device(device: str) -> None:
    """Exit with what is missing unless both torch and ONNX Runtime really run on ``device``:
    a comparison with one of them elsewhere would time two devices, not two systems."""
    if device == "cpu":
        return
    from ducho_fast import doctor
    from ducho_fast.exporters.compat import import_torch

    missing = []
    if not import_torch().cuda.is_available():
        missing.append("torch sees no CUDA device (a CUDA build of torch and a GPU are needed)")
    if not doctor.cuda_runs():
        missing.append(
            "ONNX Runtime runs no real CUDA session (install the gpu extra, onnxruntime-gpu, "
            "in place of onnxruntime; `ducho-fast doctor` says what is missing)"
        )
    if missing:
        raise SystemExit("--device cuda: " + "; ".join(missing) + ".")


BF16_MIN_COSINE = 0.999  # the bf16 export's own bound
# the ratios of --bf16 (visual.py, audio.py): its extract against fp32's and the source's, and
# its pipeline efficiency over its own bare session
BF16_PAIRS = {
    "bf16_vs_extract": ("extract_bf16", "extract"),
    "bf16_vs_torch": ("extract_bf16", "torch"),
    "bf16_pipeline_efficiency": ("extract_bf16", "bare_bf16"),
}


def add_bf16_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--bf16",
        action="store_true",
        help=f"also time {what} exported with precision: bf16 (on the CPU, where it runs)",
    )


def check_bf16(device: str) -> None:
    """Exit with the reason where ``--bf16`` cannot be measured on ``device`` here."""
    from ducho_fast.runtime.openvino import unusable

    reason = "bf16 runs on the CPU only" if device != "cpu" else unusable()
    if reason is not None:
        raise SystemExit(f"--bf16: {reason}")


def device_gflops(device: str) -> float:
    """The FLOP limit where the systems run: numpy's sgemm on the CPU, torch's float32 matrix
    product on the GPU (TF32 off, as ducho-fast's CUDA sessions run fp32 graphs)."""
    return sgemm_gflops() if device == "cpu" else cuda_sgemm_gflops()


def cuda_sgemm_gflops(n: int = 8192, repeats: int = 5) -> float:
    """Best float32 matrix-product rate of torch on the GPU, TF32 off."""
    from ducho_fast.exporters.compat import import_torch

    torch = import_torch()
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        generator = torch.Generator(device="cuda").manual_seed(0)
        a, b = (
            torch.randn(n, n, device="cuda", dtype=torch.float32, generator=generator)
            for _ in range(2)
        )
        a @ b  # warm-up
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matrix-product rate of numpy's BLAS here: the machine's FLOP limit."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def file_create_ms(folder: Path, files: int = 256, size: int = 1664) -> float:
    """CPU milliseconds (this thread's, the kernel's work included) to save one small file in
    ``folder`` as extract saves a feature (its writer's ``NpyFiles``: on Linux an unnamed file
    linked in). The writer makes one per item and layer, and on some disks this is no small
    cost: this VM's ext4 took 0.016 ms, then 0.23-0.5 ms minutes later (the same loop), tmpfs
    0.006 ms. The VM's ext4 has no journal, and then Linux does not reuse an inode freed in the
    last 5 minutes while its inode table block is unwritten: after thousands of files were
    deleted, each new file scans past them (``perf``: 70% of the time in ext4's
    ``recently_deleted``). Printed beside the efficiencies, which it lowers; the scratch files
    are removed."""
    from ducho_fast.outputs.atomic import NpyFiles

    scratch = Path(tempfile.mkdtemp(prefix=".file-create-", dir=folder))
    writer = NpyFiles()
    data = np.zeros(max(1, (size - 128) // 4), np.float32)
    try:
        start = time.thread_time()
        for i in range(files):
            writer.save(scratch / f"{i}.npy", data)
        return (time.thread_time() - start) / files * 1e3
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of ``repeats`` timed runs, and the last run's value."""
    best, value = float("inf"), None
    for _ in range(max(1, repeats)):
        seconds, value = timed(fn)
        best = min(best, seconds)
    return best, value


def paired(seconds: dict[str, list[float]], fast: str, slow: str) -> dict[str, float]:
    """How many times faster ``fast`` ran than ``slow`` within each round: the median and
    the range over the rounds."""
    ratios = [b / a for a, b in zip(seconds[fast], seconds[slow], strict=True)]
    return {
        "median": float(np.median(ratios)),
        "min": float(min(ratios)),
        "max": float(max(ratios)),
    }


def ratio_summary(ratios: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The JSON line's ratios: each median, and each range over the rounds."""
    return {
        "ratios": {k: round(v["median"], 3) for k, v in ratios.items()},
        "ratio_ranges": {k: [round(v["min"], 3), round(v["max"], 3)] for k, v in ratios.items()},
    }


def median_rates(items: int, seconds: dict[str, list[float]]) -> dict[str, float]:
    """Items per second of each system in its median round."""
    return {name: items / float(np.median(s)) for name, s in seconds.items()}


class NewFolders:
    """``extract(config)`` writing into a new, empty output folder on every call (``key``, a
    config key path, set to ``<name>_<token>_<k>``), as a first run does.

    No round deletes an earlier round's files. Each round used to run ``--fresh`` into one
    folder, and on this VM's disk deleting thousands of files made creating files several
    times dearer for a while afterwards (see benchmarks/RESULTS.md, "Not there yet"), a cost
    that a user's run into an empty folder does not pay. The folders stay until the work
    folder goes."""

    def __init__(self, extract: Callable[..., Any], config: Path, key: str, name: str) -> None:
        self._extract = extract
        self._config = config
        self._key = key
        self._name = f"{name}_{os.getpid()}_{time.time_ns() % 10**9}"
        self._count = 0
        self.last: str | None = None  # the last call's folder, relative to dataset_path

    def __call__(self) -> Any:
        self._count += 1
        self.last = f"{self._name}_{self._count}"
        return self._extract(self._config, [f"{self._key}={self.last}"])


def recorded(fn: Callable[[], Any], into: list[Any]) -> Callable[[], Any]:
    """``fn``, keeping what each call returns in ``into`` (one entry per round)."""

    def call() -> Any:
        value = fn()
        into.append(value)
        return value

    return call


def bare_sessions(
    artifact: Any,
    feeds: list[dict[str, np.ndarray]],
    lanes: int | None = None,
    device: str = "cpu",
) -> Callable[[], Any]:
    """The artifact's session alone on ``feeds`` (batches built beforehand), run as extract
    runs its model (``ducho_fast.bench_timing.session_alone``): ``lanes`` batches at once (None: as
    many as extract uses, see ``batch_lanes``); threads spin between ops, as nothing shares
    their CPUs. On CUDA: one batch at a time, ``session.run`` on the host batches, so its
    time includes the copies to and from the GPU that extract's I/O binding overlaps with the
    model (there an efficiency above 1 is the overlap's gain)."""
    from ducho_fast.bench_timing import alone, session_alone
    from ducho_fast.config.model import RuntimeOptions
    from ducho_fast.runtime.embedder import Embedder, Prepared
    from ducho_fast.runtime.session import batch_lanes

    options = alone(RuntimeOptions(device=device, allow_fallback=False))
    count = batch_lanes(options) if lanes is None else lanes
    embedder = Embedder(artifact, options, lanes=count)
    batches = [Prepared([(list(range(len(next(iter(f.values()))))), f)], []) for f in feeds]
    return session_alone(embedder, batches)


def efficiency_factors(
    reports: list[Any], extract_seconds: list[float], bare_seconds: list[float]
) -> dict[str, float]:
    """The pipeline efficiency (bare / extract seconds) of each round as the product of three
    factors, each the median over the rounds: ``bare_vs_model`` (the bare session's time /
    the model's time inside extract: below 1 where readers and writer share the CPUs),
    ``model_busy`` (the model's time / the pipeline's, whose rest is start-up and waits) and
    ``pipeline_share`` (the pipeline's time / extract's, whose rest is checking the config
    and artifacts, listing inputs, manifests and matrices). ``reports`` are extract's, one per
    round, of a single model."""
    rows = []
    for report, wall, bare in zip(reports, extract_seconds, bare_seconds, strict=True):
        (run,) = report.runs
        r = run.result
        rows.append((bare / r.timing.model, r.timing.model / r.seconds, r.seconds / wall))
    medians = np.median(np.array(rows), axis=0)
    names = ("bare_vs_model", "model_busy", "pipeline_share")
    return {k: round(float(v), 3) for k, v in zip(names, medians, strict=True)}


def warm_up(reports: list[Any]) -> float | None:
    """How much longer extract's first batch ran than its later ones (``Timing.warm_up``),
    the median over the rounds; ``reports`` are extract's, one per round, of a single model.
    Part of the model's time inside extract, so of ``bare_vs_model``: on a GPU, cuDNN's
    search for each convolution's algorithm is done there once per session. Rounds where no
    lane ran a second batch tell nothing; None where none told."""
    told = [w for r in reports if (w := r.runs[0].result.timing.warm_up) is not None]
    return float(np.median(told)) if told else None


def said_warm_up(seconds: float | None) -> str:
    """The benchmarks' words for :func:`warm_up`."""
    if seconds is None:
        return "no lane of extract ran a second batch to tell how much longer its first ran"
    return f"extract's first batch ran {seconds:.2f} s longer than its later ones"


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def cpu_factors(
    extract_seconds: list[float],
    extract_cpu: list[float],
    bare_seconds: list[float],
    bare_cpu: list[float],
    items: int,
) -> dict[str, float]:
    """The pipeline efficiency of each round (bare / extract seconds) as the product of two
    factors, each the median over the rounds, and the CPU time per item of both:

    - ``work``: the bare session's CPU seconds / extract's. Below 1 by what extract does
      beside the model (reading, decoding, tokenizing, writing, setting up) and by the model
      running slower beside it. Where the CPUs are kept busy, the efficiency can be no more.
    - ``use``: extract's CPU seconds per second / the bare session's. Below 1 where the CPUs
      idle in extract while the bare session keeps them busy: waits, or start-up with less
      to run than there are CPUs (also time the VM's host gives to other machines).

    ``bare_cpu_ms`` and ``extract_cpu_ms`` are each one's median CPU milliseconds per item.
    """
    rows = []
    for ew, ec, bw, bc in zip(extract_seconds, extract_cpu, bare_seconds, bare_cpu, strict=True):
        rows.append((bc / ec, (ec / ew) / (bc / bw)))
    work, use = np.median(np.array(rows), axis=0)
    return {
        "work": round(float(work), 3),
        "use": round(float(use), 3),
        "bare_cpu_ms": round(float(np.median(bare_cpu)) / items * 1e3, 3),
        "extract_cpu_ms": round(float(np.median(extract_cpu)) / items * 1e3, 3),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)


def report(
    rows: list[tuple[str, float, str]],
    summary: dict[str, Any],
    ratios: dict[str, dict[str, float]] | None = None,
) -> None:
    """A human table and the ratios from :func:`paired` (median of the rounds, and their
    range), then one JSON line (the last line of output) with every figure and the CPU's
    model (:func:`cpu_model`): figures from different CPUs do not compare."""
    summary = {**summary, "cpu_model": cpu_model()}
    width = max(len(r[0]) for r in rows)
    for name, rate, note in rows:
        print(f"  {name:<{width}}  {rate:8.1f} items/s  {note}")
    print(f"on {summary['cpu_model']}")
    if not ratios:
        print(json.dumps(summary, sort_keys=True))
        return
    print("ratios (median over rounds, range):")
    width = max(len(name) for name in ratios)
    for name, r in ratios.items():
        print(f"  {name:<{width}}  {r['median']:6.3f}  ({r['min']:.3f} to {r['max']:.3f})")
    print(json.dumps(summary, sort_keys=True))


# CPU features that decide which of ONNX Runtime's kernels run (int8 above all).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as Linux reports it, with the features in ``CPU_FEATURES`` it has
    (``platform.processor()`` elsewhere, or "unknown"): the machines these benchmarks run on
    differ from run to run, and a VM may report only the vendor."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    have = [f for f in CPU_FEATURES if f in flags]
    return f"{name} ({', '.join(have)})" if have else name


def npy_files(folder: Path) -> dict[str, bytes]:
    """Every .npy file under ``folder`` by relative path: to check runs wrote the same bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}
