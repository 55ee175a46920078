"""Session factory: providers asked for, providers really got, threads from the CPU quota.

``get_available_providers()`` lists CUDA whenever onnxruntime-gpu is installed, even where
the CUDA libraries are missing and the session silently runs on CPU; only a real session's
``get_providers()`` tells the truth, so that is what is checked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ducho_fast.config.model import RuntimeOptions
from ducho_fast.errors import DeviceError
from ducho_fast.runtime.cpu import cpu_quota, cpu_quota_report
from ducho_fast.runtime.memory import use_limited_arena
from ducho_fast.runtime.openvino import OPENVINO, add_bf16_provider, unusable

log = logging.getLogger("ducho_fast")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class SessionInfo:
    """What a session runs on, in words a summary can print."""

    provider: str
    threads: int  # per batch
    note: str = ""
    lanes: int = 1  # batches run at once (see :func:`batch_lanes`)
    memory_limit: int | None = None  # bytes of the shared CPU arena (runtime.memory_limit)


def session_options(
    threads: int, *, spinning: bool = True, shared_arena: bool = False
) -> ort.SessionOptions:
    """Throughput settings: every graph optimization (ORT's fusions), one intra-op thread per
    usable CPU, and ``spinning``: ORT's threads spin briefly between ops before they sleep
    (ORT's default) or sleep at once. ``shared_arena``: the CPU arena registered with
    ``runtime.memory_limit`` (:mod:`ducho_fast.runtime.memory`). ONNX Runtime logs nothing
    short of a fatal error: what fails reaches the caller as an exception, which ducho-fast
    words, and ONNX Runtime's own line for it came first, in red, for every batch that did
    not fit in the limit."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_arena:
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return opts


# What ducho-fast passes to the CUDA provider unless ``runtime.cuda_options`` says otherwise.
# ``use_tf32``: ONNX Runtime's CUDA provider runs float32 matrix products and convolutions in
# TF32 by default (its source: "By default, enable TF32"), which keeps 10 bits of each input's
# mantissa on GPUs since Ampere: relative errors near 1e-3, ten times the 1e-4 that an fp32
# artifact's parity check holds it to at export. Off, an fp32 artifact computes in fp32 where
# it runs; ``use_tf32: true`` trades that for speed, and fp16 artifacts are the checked way to
# trade precision for speed.
CUDA_DEFAULTS = {"use_tf32": "0"}


def shapes_vary(manifest: Mapping[str, Any]) -> bool:
    """Whether a graph's inputs change shape from batch to batch beyond the last batch's
    size: audio clips (their lengths), texts (one padded length per bucket) and images not
    resized or cropped to one size (``resize_shortest_edge`` keeps the aspect)."""
    if manifest.get("modality") == "visual":
        pre = manifest.get("preprocessing") or {}
        return not (pre.get("resize") or pre.get("crop"))
    return True


def for_artifact(options: RuntimeOptions, manifest: Mapping[str, Any]) -> RuntimeOptions:
    """``options`` as one artifact's session takes them. A ``precision: bf16`` artifact runs
    on OpenVINO's CPU plugin (the device ``"openvino"``, which no config names) wherever it
    would run on the CPU; given a GPU, its graph (fp32) runs there as any fp32 graph. Where its
    input shapes vary (:func:`shapes_vary`), cuDNN's convolution algorithm is picked by
    heuristics unless ``runtime.cuda_options.cudnn_conv_algo_search`` says otherwise. ONNX
    Runtime's default, EXHAUSTIVE, benchmarks every algorithm for each convolution at each
    new input shape: reported at 0.3-1.3 s a shape on a 6-layer network (PaddleX #5057; ONNX
    Runtime issues #709 and #19838), and clips of a new length each bring a new shape.
    Unmeasured here (no GPU). Images resized to one size keep EXHAUSTIVE: they tune once, a
    smaller batch padded to the batch size (:func:`pads_last_batch`)."""
    if manifest.get("precision") == "bf16" and requested_providers(options.device)[0] == CPU:
        return replace(options, device="openvino")
    if not shapes_vary(manifest) or "cudnn_conv_algo_search" in options.cuda_options:
        return options
    return replace(
        options, cuda_options={**options.cuda_options, "cudnn_conv_algo_search": "HEURISTIC"}
    )


def pads_last_batch(options: RuntimeOptions, manifest: Mapping[str, Any], provider: str) -> bool:
    """Whether a run's smaller last batch is padded to the batch size (with copies of its
    last item, whose outputs are dropped), so that the session sees one input shape: on CUDA,
    for a graph whose inputs have one shape but for the batch (:func:`shapes_vary`), while
    cuDNN searches each convolution's algorithm at each new shape (``EXHAUSTIVE``, ONNX
    Runtime's default, which keys what it found by the whole input shape, the batch's size
    included). A few images more on the GPU, once a run, against every convolution searched
    again (reported at 0.3-1.3 s a shape; unmeasured here: no GPU lent)."""
    if provider != CUDA or shapes_vary(manifest):
        return False
    return str(options.cuda_options.get("cudnn_conv_algo_search", "EXHAUSTIVE")) == "EXHAUSTIVE"


def requested_providers(device: str, cuda_options: dict[str, Any] | None = None) -> list[Any]:
    """Providers to ask for: CUDA (with its device id, ``CUDA_DEFAULTS`` and the config's
    options) before CPU, or CPU alone."""
    if device == "cpu":
        return [CPU]
    if device == "openvino":  # a bf16 artifact's (for_artifact), added by make_session
        return [OPENVINO, CPU]
    if device == "auto" and CUDA not in ort.get_available_providers():
        return [CPU]
    options = {**CUDA_DEFAULTS, **{k: str(v) for k, v in (cuda_options or {}).items()}}
    options["device_id"] = str(cuda_device_id(device))
    return [(CUDA, options), CPU]


def cuda_device_id(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def spins(options: RuntimeOptions, modality: str, *, readers: bool) -> bool:
    """Whether ORT's CPU threads spin between ops (``readers``: a pipeline's decoding threads
    share the CPUs). ``spin_wait: auto`` spins unless readers decode images or audio for the
    model; text readers only tokenize. Measured in rounds here (spinning vs not, extract end
    to end): MiniLM fp32 1.11x (every one of 8 rounds faster), int8 1.05x; EfficientNet-Lite0
    0.94x (14 rounds), ResNet50 1.05x (6 rounds, 0.80-1.10). ``embed``'s worker threads count
    as readers (``load``): EfficientNet-Lite0 on 256 JPEGs in calls of 4 (``benchmarks/
    embed.py --call-size 4``, 5 rounds) ran 1.23x (1.21-1.35) the images/s of reading on the
    calling thread with spinning off, 0.96x (0.86-1.09) with it on: threads left spinning
    after a run slow the decoding of the next call's images.

    On CUDA, ``auto`` never spins: ONNX Runtime's CPU threads run only the graph's shape ops
    there, and threads left spinning between them take CPUs from the tokenizing, decoding
    and writing that feed the GPU (its maintainers advise against CPU threads for a GPU
    session: onnxruntime issues #10081, #26847). Until 2026-11-24 text sessions spun there,
    with one thread per CPU (16 on the H100): unmeasured either way (``bench --vs
    runtime.spin_wait=on`` on a GPU tells)."""
    if options.spin_wait == "auto":
        if requested_providers(options.device)[0] != CPU:
            return False
        return not readers or modality == "textual"
    return options.spin_wait == "on"


# Automatic concurrent batches: at most this many. Each batch in flight holds its own
# activations: ResNet50 at batch size 32 peaked at 1.0 GB of RSS one batch at a time, 1.7 GB
# with 2 at once and 2.2-3.2 GB with 4 (256 JPEGs), so one per thread on a many-core node
# could take many times the memory. More than 2 at once is unmeasured for speed (this
# machine has 2 CPUs).
AUTO_MAX_LANES = 4


def batch_lanes(options: RuntimeOptions) -> int:
    """How many batches a pipeline runs at once on the CPU, each on its share of the threads
    (``runtime.concurrent_batches``, capped at the threads; 0: the most, up to
    ``AUTO_MAX_LANES``, that share the threads out evenly: 2 threads run 2 batches of one
    thread, 6 run 3 of two, 16 run 4 of four, 5 one of five). A batch on a thread of its own needs
    no hand-over between threads at each of the graph's ops, which small ops (layer norms,
    softmax, quantizing) pay for most, and a thread delayed by the readers or another process
    no longer holds up the other. Measured on 2 CPUs in alternating rounds, against one batch
    at a time on both threads: bare sessions, all-MiniLM-L6-v2 on 1024 texts, int8 1.22x
    (8 rounds), fp32 1.00x on a quiet machine and 1.33x on a busy one; ResNet50 1.03x,
    EfficientNet-Lite0 1.08x. Extract end to end: ResNet50 on 128 JPEGs 1.25x (1.04-1.61,
    6 rounds), EfficientNet-Lite0 0.99x (0.93-1.12, 8 rounds), HuBERT (base size, random
    weights) on 48 clips of 5 s 1.15x (1.10-1.25, 8 rounds). Those were on one machine's
    CPU; on another's (an AMD EPYC) the two were level: bare sessions' median rates fp32
    1.04x, int8 0.99x, ResNet50 1.10x, EfficientNet-Lite0 0.94x, and extract of 128 JPEGs
    with ResNet50 7.5 s against 7.3-7.6 s. CUDA and I/O binding run one batch at a time."""
    if requested_providers(options.device)[0] != CPU or options.io_binding == "on":
        return 1
    threads = options.threads or cpu_quota()
    if options.concurrent_batches:
        return min(options.concurrent_batches, threads)
    return max(k for k in range(1, min(threads, AUTO_MAX_LANES) + 1) if threads % k == 0)


def lanes_advice(options: RuntimeOptions) -> str | None:
    """Why the requested ``runtime.concurrent_batches`` leave threads idle; None if not."""
    lanes = batch_lanes(options)
    threads = options.threads or cpu_quota()
    share, idle = divmod(threads, lanes)
    if not idle:  # always so for the automatic choice, and one batch at a time
        return None
    return (
        f"runtime.concurrent_batches is {options.concurrent_batches}: {lanes} batches at once "
        f"on {threads} threads, {share} thread{'s' if share > 1 else ''} each, so {idle} "
        f"stay{'s' if idle == 1 else ''} idle. Choose a number of batches that divides the "
        "threads, or 0 (automatic)."
    )


def threads_advice(options: RuntimeOptions) -> str | None:
    """Why ``runtime.threads`` above the CPUs this process may use slows a run on the CPU;
    None where it is not so. A config written for a bigger machine, run in a container with
    a CPU quota: all-MiniLM-L6-v2 on 256 texts ran 210-234 texts/s here at 2 threads on 2
    CPUs, 121 at 3, 52 at 8 and 6.3-6.5 at 64 (ONNX Runtime's threads spin, waiting on each
    other). Not said of OpenVINO's plugin (a bf16 artifact), whose threads do not slow so:
    ResNet50 in bf16 ran 201-219 images/s here at 2, 8 and 64 threads on 2 CPUs."""
    if requested_providers(options.device)[0] != CPU or options.threads <= cpu_quota():
        return None
    return (
        f"runtime.threads is {options.threads}, more than the CPUs this process may use, "
        f"{cpu_quota_report()}: ONNX Runtime's threads then wait on each other (a text model "
        "ran 1.8x slower at 3 threads on 2 CPUs, 35x at 64). Set runtime.threads to 0 (the "
        "CPUs there are), or no more than those."
    )


_ADVISED: set[str] = set()  # said once a process, not once a model or an embed call
_ADVISED_LOCK = threading.Lock()


def _advise(advice: str | None) -> None:
    """Log ``advice`` as a warning, once a process."""
    with _ADVISED_LOCK:
        if advice and advice not in _ADVISED:
            _ADVISED.add(advice)
            log.warning(advice)


def memory_limit_advice(options: RuntimeOptions) -> str | None:
    """Why a ``runtime.memory_limit`` of a size set in the config does not bound a bf16
    artifact's session; None where none is set (``auto``, ``off``). OpenVINO's plugin keeps
    its activations outside ONNX Runtime's arena, which the limit is on, so a batch too big
    for the memory is not run in halves: the kernel ends the run. It takes less than fp32's
    session: ResNet50's grew by 2.1 MB an image in a batch of 256, against 8.7 MB on ONNX
    Runtime's CPU provider."""
    if options.memory_limit in ("auto", "off"):
        return None
    return (
        f"runtime.memory_limit ({options.memory_limit}) does not bound a bf16 artifact's "
        "session: OpenVINO's plugin keeps its activations outside ONNX Runtime's arena, so a "
        "batch too big for the memory is not run in halves. It takes about a quarter of an "
        "fp32 session's memory an item (ResNet50: 2.1 MB an image); a smaller batch_size "
        "bounds it."
    )


def make_session(
    model: Path, options: RuntimeOptions, *, spinning: bool = True, lanes: int = 1
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A checked session with the runtime options' threads and providers; with ``lanes``
    batches at once, each gets its share of the threads."""
    _advise(threads_advice(options))
    providers = requested_providers(options.device, options.cuda_options)
    if providers[0] == OPENVINO:  # one batch at a time, on all the threads
        return _bf16_session(model, options, options.threads or cpu_quota())
    threads = max(1, (options.threads or cpu_quota()) // lanes)
    if CUDA not in ort.get_available_providers():
        # This build has no CUDA (onnxruntime, not onnxruntime-gpu): asking for it only made
        # ONNX Runtime log a line and warn before _check says why, and what to install. (Not
        # warnings.catch_warnings: a session is made beside the reader threads.)
        providers = [p for p in providers if p == CPU]
    limit = use_limited_arena(options.memory_limit) if providers == [CPU] else None
    opts = session_options(threads, spinning=spinning, shared_arena=limit is not None)
    session = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    return session, replace(_check(session, options, threads), lanes=lanes, memory_limit=limit)


def _bf16_session(
    model: Path, options: RuntimeOptions, threads: int
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A bf16 artifact's session on OpenVINO's CPU plugin; where it cannot run in bfloat16
    here, its fp32 graph on ONNX Runtime's CPU provider if ``allow_fallback``, said either
    way. ONNX Runtime's threads do not spin: they idle beside OpenVINO's."""
    reason = unusable()
    if reason is not None:
        message = (
            f"this artifact's precision is bf16, but {reason}. Its graph is the fp32 one, "
            "which ONNX Runtime's CPU provider runs at fp32's speed (an fp32 or int8 export "
            "is the choice for this machine)"
        )
        if not options.allow_fallback:
            raise DeviceError(message + ". Set runtime.allow_fallback: true to run it so.")
        log.warning(message + ": running it so.")
        cpu = replace(options, device="cpu")
        session, info = make_session(model, cpu)
        return session, replace(info, note="fp32: no bf16 here")
    _advise(memory_limit_advice(options))
    opts = session_options(threads, spinning=False)
    add_bf16_provider(opts, threads)
    session = ort.InferenceSession(str(model), sess_options=opts)
    got = session.get_providers()[0]
    if got != OPENVINO:  # never seen: the plugin registered but took no node
        raise DeviceError(f"OpenVINO's plugin took none of {model}'s graph; it ran on {got}.")
    return session, SessionInfo(got, threads, note="bf16")


class PendingSession:
    """A session being created in a background thread, so that a run checks its artifacts and
    reads its first items meanwhile: ONNX Runtime releases the GIL for most of the 0.2 s it
    takes to create all-MiniLM-L6-v2's session here. ``result`` waits for it and raises what
    creating it raised."""

    def __init__(
        self, model: Path, options: RuntimeOptions, *, spinning: bool, lanes: int = 1
    ) -> None:
        self.model = model
        self.options = options
        self.spinning = spinning
        self.lanes = lanes
        self._future: Future[tuple[ort.InferenceSession, SessionInfo]] = Future()
        # Not a daemon: the interpreter must not exit while ONNX Runtime is creating the
        # session (a run stopped by a bad config aborted or crashed that way), so an early
        # exit waits for it instead.
        threading.Thread(
            target=self._create, args=(options,), name="ducho-session", daemon=False
        ).start()

    def _create(self, options: RuntimeOptions) -> None:
        try:
            made = make_session(self.model, options, spinning=self.spinning, lanes=self.lanes)
        except BaseException as e:  # handed to whoever waits; nothing else would see it
            self._future.set_exception(e)
        else:
            self._future.set_result(made)

    def serves(
        self, model: Path, *, spinning: bool, lanes: int = 1, options: RuntimeOptions | None = None
    ) -> bool:
        """Whether this is the session a model at ``model`` with this spinning, these lanes
        and (when given) these options needs."""
        same = (self.model, self.spinning, self.lanes) == (model, spinning, lanes)
        return same and (options is None or options == self.options)

    def result(self) -> tuple[ort.InferenceSession, SessionInfo]:
        return self._future.result()


def _check(session: ort.InferenceSession, options: RuntimeOptions, threads: int) -> SessionInfo:
    got = session.get_providers()[0]
    wanted_cuda = options.device.startswith("cuda")
    if wanted_cuda and got != CUDA:
        from ducho_fast.doctor import why_no_cuda  # it imports this module

        message = (
            f"runtime.device is '{options.device}' but ONNX Runtime runs this model on {got}: "
            f"CUDA is not really active. {why_no_cuda()}"
        )
        if not options.allow_fallback:
            raise DeviceError(message + " Set runtime.allow_fallback: true to run on CPU.")
        log.warning(message + " Falling back to CPU.")
        return SessionInfo(got, threads, note="fallback from CUDA")
    return SessionInfo(got, threads)
