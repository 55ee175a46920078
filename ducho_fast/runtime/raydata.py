"""Ray Data: a callable class for ``Dataset.map_batches``, and ``extract --engine ray``.

``RayEmbedder`` is for users' own Ray pipelines: it builds the ONNX Runtime session once per
actor and embeds batches they have already decoded. ``RayPipeline`` runs one model of an
``extract`` across a Ray cluster: windows of items go to CPU tasks that decode and cut them into
batches exactly as the local pipeline does, the batches go to model actors (``num_gpus`` when
the session is on CUDA), and the driver's writer threads save the features. Batches are the
local pipeline's, so the files are byte-identical to a single-process run's.

Needs the ``scale`` extra (``pip install 'ducho-fast[scale]'``); ``ray`` is imported only here.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.artifact import Artifact, load_artifact
from ducho_fast.config.model import RuntimeOptions
from ducho_fast.config.options import runtime_options
from ducho_fast.data.items import FileStamp, Item
from ducho_fast.data.sources import Loader
from ducho_fast.data.text.deferred import TableTexts
from ducho_fast.errors import ConfigError, DataError
from ducho_fast.progress import ProgressFn
from ducho_fast.runtime.batcher import Batcher
from ducho_fast.runtime.batches import Batch, infer
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.embedder import Embedder, ItemOutputs, whole
from ducho_fast.runtime.loading import load_one
from ducho_fast.runtime.pipeline import (
    LoadFn,
    PipelineOptions,
    RunResult,
    WindowedRun,
    WriteFn,
    assemble,
    record_failure,
    settled,
    sort_errors,
    write_checked,
    writer_plan,
)
from ducho_fast.runtime.stages import DONE, Writers, finish

DECODE_TASK_MEMORY = 256 * 2**20  # bytes reserved per decode task: one window, decoded
INPUT_COLUMNS = {"visual": "image", "textual": "text", "audio": "waveform"}
# What ray.data.read_audio gives: (channels, samples) float32 per row, with a sample_rate column.
RAY_AUDIO_COLUMN = "amplitude"
RATE_COLUMN = "sample_rate"
TEXT_BATCH_SIZE = 32  # RayEmbedder's texts per call by default, a config's default batch_size


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ConfigError("the Ray engine needs Ray Data: pip install 'ducho-fast[scale]'") from e
    return ray


# -- for users' own pipelines -------------------------------------------------------------------


class RayEmbedder:
    """``ds.map_batches(RayEmbedder, fn_constructor_args=(artifact_dir,), concurrency=2)``.

    The session is built once per actor. A batch holds inputs in one column, ``image`` (uint8
    arrays of any size, such as ``ray.data.read_images`` gives, resized as the artifact says;
    paths; or image files' bytes), ``text`` (strings) or ``waveform`` (arrays, or paths; or
    ``amplitude``, as ``ray.data.read_audio`` gives it), and any other columns (ids), which
    are passed through. Waveforms are at the rate of a ``sample_rate`` column where the batch
    has one (read_audio's), else at ``sample_rate``, else at the model's. One float32
    column is added per layer (``layers`` picks them; all by default), and ``error``: empty,
    or why that row failed (not an input of this model, or the model failed on it), whose
    values are then NaN. A batch in which every row fails raises :class:`DataError` naming
    them. ``batch_size``: rows per ONNX Runtime call, texts sorted by length first (as
    ``embed`` batches them); by default a batch of images or audio runs in one call, and
    texts 32 to a call, so that few are padded to a much longer one.
    """

    def __init__(
        self,
        artifact: str | Path,
        runtime: RuntimeOptions | Mapping[str, Any] | None = None,
        layers: Sequence[str | int] | None = None,
        sample_rate: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if batch_size is not None and not whole(batch_size):
            raise ConfigError(
                f"RayEmbedder's batch_size must be a whole number of 1 or more, not {batch_size!r}."
            )
        options = runtime_options(runtime, "RayEmbedder's runtime")
        self.embedder = Embedder(load_artifact(Path(artifact)), options)
        self.column = INPUT_COLUMNS[self.embedder.modality]
        if sample_rate is not None and self.embedder.modality != "audio":
            raise ConfigError(f"{artifact}: sample_rate is for audio models.")
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        self.layers = [str(x) for x in layers] if layers is not None else self.embedder.layers
        unknown = [x for x in self.layers if x not in self.embedder.layers]
        if unknown:
            raise ConfigError(f"{artifact}: no layer(s) {unknown}; it has {self.embedder.layers}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = self.column
        if column == "waveform" and column not in batch and RAY_AUDIO_COLUMN in batch:
            column = RAY_AUDIO_COLUMN
        if column not in batch:
            also = (
                f" (or {RAY_AUDIO_COLUMN!r}, as read_audio gives)" if column == "waveform" else ""
            )
            raise DataError(
                f"RayEmbedder for a {self.embedder.modality} model needs a column "
                f"{column!r}{also}; the batch has {sorted(batch)}."
            )
        values = list(batch[column])
        if not values:  # a block of no rows: its columns, no rows each
            layers = {x: _no_rows(self.embedder.embed([], x)) for x in self.layers}
            return {**batch, **layers, "error": np.empty(0, dtype=object)}
        if column == RAY_AUDIO_COLUMN:  # (channels, samples) -> (samples, channels)
            values = [np.asarray(v).T for v in values]
        outputs = self._outputs(values, self._rates(batch, len(values)))
        good = [o for o in outputs if not isinstance(o, str)]
        if not good:
            raise DataError(
                "the model failed on every row of a batch: "
                + "; ".join(sorted(set(str(o) for o in outputs)))
            )
        out = dict(batch)
        for layer in self.layers:
            nan = np.full_like(good[0][layer], np.nan)
            rows = [nan if isinstance(o, str) else o[layer] for o in outputs]
            out[layer] = _column(rows)
        out["error"] = np.array([o if isinstance(o, str) else "" for o in outputs], dtype=object)
        return out

    def _rates(self, batch: dict[str, np.ndarray], rows: int) -> list[int | None]:
        """Each row's waveform rate: the batch's ``sample_rate`` column, else the one given."""
        if self.embedder.modality != "audio" or RATE_COLUMN not in batch:
            return [self.sample_rate] * rows
        return [int(rate) for rate in batch[RATE_COLUMN]]

    def _outputs(self, values: list[Any], rates: list[int | None]) -> list[ItemOutputs | str]:
        """Each row's outputs, or why it has none. Every row is prepared as ``embed``
        prepares its inputs first: an image of any size is resized as the artifact says (an
        image already prepared comes out the same), and a row that is not an input of this
        model (a null text, a number) fails alone. Rows were passed to the model as they
        came: a null text was embedded as the string "None", and an image at its own size
        ran through a model whose graph takes any size, so its feature differed from
        extract's without a word."""
        prepared: list[Any] = []
        outputs: list[ItemOutputs | str | None] = []
        for value, rate in zip(values, rates, strict=True):
            try:
                prepared.append(self.embedder.prepare(value, rate))
                outputs.append(None)
            except DataError as e:
                outputs.append(str(e))
        ran = iter(self._run(prepared))
        return [next(ran) if out is None else out for out in outputs]

    def _run(self, prepared: list[Any]) -> list[ItemOutputs | str]:
        """Each prepared row's outputs, or why the model failed on it, in calls of at most
        ``batch_size`` rows; texts sorted by length first (as ``embed`` runs them)."""
        if self.embedder.sorts_by_length:
            batches = self.embedder.text_batches(prepared, self.batch_size or TEXT_BATCH_SIZE)
        else:
            plan = self.embedder.plan(prepared, self.batch_size or len(prepared) or 1, 0)
            batches = ((idx, [prepared[i] for i in idx]) for idx in plan)
        ran: list[ItemOutputs | str] = [""] * len(prepared)
        for positions, rows in batches:
            for i, out in zip(positions, infer(self.embedder, Batch([], rows)), strict=True):
                ran[i] = out
        return ran


def _no_rows(empty: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """A layer's column for a batch of no rows: ``embed([])``'s (0, ...) array, or an empty
    object column for token-level layers."""
    return empty if isinstance(empty, np.ndarray) else np.empty(0, dtype=object)


def _column(rows: list[np.ndarray]) -> np.ndarray:
    if len({r.shape for r in rows}) == 1:
        return np.stack(rows)
    column = np.empty(len(rows), dtype=object)  # per-token layers: one length per row
    for i, row in enumerate(rows):  # one by one: numpy would try to broadcast a list of arrays
        column[i] = row
    return column


# -- extract --engine ray -----------------------------------------------------------------------


@dataclass(frozen=True)
class RayOptions:
    """How ``extract --engine ray`` places work: ``actors`` model actors per model (0: one per
    GPU on CUDA, else one), each with ``actor_cpus`` CPUs (0: ``runtime.threads``, else 1),
    which its session uses as threads."""

    actors: int = 0
    actor_cpus: int = 0
    address: str | None = None  # a running cluster; None: RAY_ADDRESS, else a local instance


class RayPipeline(WindowedRun):
    """One model over one list of items on a Ray cluster, in the local pipeline's batches."""

    def __init__(
        self,
        artifact: Artifact,
        runtime: RuntimeOptions,
        loader: Loader,
        write: WriteFn,
        options: PipelineOptions,
        ray_options: RayOptions | None = None,
    ) -> None:
        super().__init__(Batcher(artifact), options)
        self._loader = loader
        self._write = write
        self._artifact = artifact
        self._runtime = runtime
        self._ray = ray_options or RayOptions()
        self.provider = "ray"  # and what the actors' sessions really run on, after run()

    def run(
        self,
        items: Sequence[Item],
        progress: ProgressFn | None = None,
        done: Set[str] = frozenset(),
        table: TableTexts | None = None,
    ) -> RunResult:
        """``table``: as :meth:`Pipeline.run`'s."""
        start = time.perf_counter()
        result = RunResult()
        windows = self._windows(items, done, result, table)
        if windows:
            self._write_rows(self._dataset(windows).iter_rows(), result, progress)
        sort_errors([result], items)  # several writers record them as they go
        result.seconds = time.perf_counter() - start
        return result

    def _write_rows(self, rows: Any, result: RunResult, progress: ProgressFn | None) -> None:
        """Save the actors' results as they come, by writer threads as the local pipeline's
        (``runtime.writers``: one, and more while the driver finds them behind and CPUs idle;
        a shared file system's round trips are waited for at once). A writer that fails, or
        a bad item under ``on_error: fail``, stops the loop; what is queued is written."""
        writes: queue.Queue[Any] = queue.Queue(maxsize=max(1, self._opts.prefetch))
        lock = threading.Lock()

        def drain(source: queue.Queue[Any], _: Any, stop: threading.Event) -> None:
            while (entry := source.get()) is not DONE:
                self._collect(entry, result, progress, lock)

        writers = Writers(drain, writes, None, cpus=cpu_quota())
        writers.start(*writer_plan(self._opts.writers))
        try:
            for row in rows:
                if not writers.put(pickle.loads(row["result"])):
                    break  # a writer failed: its error is raised below
        finally:
            finish(writers.end, writers.wait)
        writers.reraise()

    def todo(self, items: Sequence[Item], done: Set[str]) -> int:
        """How many of this run's items are embedded: those of windows not settled (see
        :func:`settled`: all in ``done``, or failing whatever is read)."""
        return sum(
            len(chunk)
            for chunk in self.windows(items)
            if settled(chunk, done, self._loader) is None
        )

    def _windows(
        self,
        items: Sequence[Item],
        done: Set[str],
        result: RunResult,
        table: TableTexts | None = None,
    ) -> list[dict[str, Any]]:
        rows = []
        texts = table.cursor() if table is not None else None
        try:
            for chunk in self.windows(items):
                known = settled(chunk, done, self._loader)
                if known is None:
                    filled = chunk if texts is None else texts.fill(chunk)
                    rows.append({"items": pickle.dumps(list(filled))})
                    continue
                result.reused += len(chunk) - len(known)  # not in the progress (see todo)
                for item, failed in known:
                    on_error = self._opts.on_error
                    record_failure(result, item, failed.reason, on_error, failed.stamp)
        finally:
            if texts is not None:
                texts.close()
        return rows

    def _dataset(self, windows: list[dict[str, Any]]) -> Any:
        ray = start_ray(self._ray)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # errors in input order
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = self._runtime.device
        cuda = device.startswith("cuda") or (device == "auto" and gpus > 0)
        if cuda and not gpus:
            raise ConfigError(
                "runtime.device asks for CUDA but the Ray cluster has no GPU. Hint: "
                "runtime.device: cpu, or start Ray workers with GPUs."
            )
        actors = self._ray.actors or (gpus if cuda else 1)
        cpus = self._ray.actor_cpus or self._runtime.threads or 1
        total = int(ray.cluster_resources().get("CPU", 0))
        if actors * cpus >= total:
            # Actors hold their CPUs for the whole run: decode tasks would never get one.
            raise ConfigError(
                f"{actors} model actor(s) x {cpus} CPU(s) take all {total} CPUs of the Ray "
                "cluster, leaving none for the decode tasks. Hint: fewer actors "
                "(--ray-actors), fewer CPUs each (runtime.threads), or a bigger cluster."
            )
        # The session's threads are the CPUs Ray reserves for its actor, not the whole node's.
        runtime = replace(self._runtime, threads=max(1, int(cpus)))
        decode = _DecodeWindow(self._loader, self._batcher, self._opts)
        return (
            ray.data.from_items(windows, override_num_blocks=len(windows))
            # Decoding runs as CPU tasks, each holding a decoded window in memory; a reservation
            # unlike the actors' also keeps Ray from fusing it into them.
            .map_batches(decode, batch_size=1, num_cpus=1, memory=DECODE_TASK_MEMORY)
            .map_batches(
                _ModelActor,
                fn_constructor_args=(str(self._artifact.path), runtime),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus,
                num_gpus=1 if cuda else 0,
            )
        )

    def _collect(
        self,
        result: Any,
        run: RunResult,
        progress: ProgressFn | None,
        lock: threading.Lock,
    ) -> None:
        provider, items, outputs, failures = result
        self.provider = f"ray: {provider}"

        def fail(item: Item, reason: str, stamp: FileStamp | None = None) -> None:
            with lock:
                record_failure(run, item, reason, self._opts.on_error, stamp)

        for item, failed in failures:
            fail(item, failed.reason, failed.stamp)
        for item, out in zip(items, outputs, strict=True):
            if isinstance(out, str):
                fail(item, out)
                continue
            reason = write_checked(self._write, item, out)
            if reason is not None:
                fail(item, reason)
                continue
            with lock:
                run.written += 1
        if progress:
            with lock:
                progress(len(items) + len(failures))


class _DecodeWindow:
    """A CPU task: one window of items, decoded and cut into the local pipeline's batches."""

    def __init__(self, load: LoadFn, batcher: Batcher, options: PipelineOptions) -> None:
        self._load = load
        self._batcher = batcher
        self._opts = options

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for blob in rows["items"]:
            chunk = pickle.loads(blob)
            loaded = [load_one(self._load, item) for item in chunk]
            batches, failures = assemble(chunk, loaded, self._batcher, self._opts)
            for j, batch in enumerate(batches):
                out.append(pickle.dumps((batch, failures if j == 0 else [])))
        return {"batch": np.array(out, dtype=object)}


class _ModelActor:
    """A model actor: the session is built once; each row is one batch."""

    def __init__(self, artifact: str, runtime: RuntimeOptions) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._embedder = Embedder(load_artifact(Path(artifact)), runtime)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for blob in rows["batch"]:
            batch, failures = pickle.loads(blob)
            outputs = infer(self._embedder, batch) if batch.items else []
            provider = self._embedder.info.provider
            out.append(pickle.dumps((provider, batch.items, outputs, failures)))
        return {"result": np.array(out, dtype=object)}


def start_ray(options: RayOptions) -> Any:
    """Connect to ``options.address`` (or ``RAY_ADDRESS``), else start a local instance."""
    ray = import_ray()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address, named_by = ray_address(options)
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        try:
            ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
        except (ConnectionError, RuntimeError) as e:  # what ray.init raises when it cannot join
            if not address:
                raise
            raise ConfigError(_unjoinable(address, named_by, e)) from e
    # ducho-fast shows its own progress; Ray Data's bars and plans would interleave with it.
    # Ray Data configures its loggers again as each dataset starts, taking the level from
    # RAY_DATA_LOG_LEVEL (a user's own setting wins): setting the logger alone held only
    # from the second dataset on.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


# -- the cluster's address ----------------------------------------------------------------------

# How long a TCP connection to a cluster's address may take before it counts as nothing there:
# ray.init itself retries an address where nothing answers for minutes (over 2 here).
PROBE_SECONDS = 5.0


def ray_address(options: RayOptions) -> tuple[str | None, str]:
    """The cluster to join (None: start a local instance) and what named it, for errors."""
    if options.address:
        return options.address, "--ray-address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def join_cluster(options: RayOptions) -> None:
    """With a cluster's address (``options``, else ``RAY_ADDRESS``), join it now, before any
    work, so that a wrong address or a missing token stops the run before an output folder is
    touched. Without one, nothing happens here: a local instance starts when a model first has
    items to embed (a resumed run with nothing left starts none).

    A Ray Client address (``ray://``) is refused: Ray Data does not run through Ray Client
    (its executor needs the driver to be a worker of the cluster; ray-project/ray#42739).
    A ``HOST:PORT`` where nothing accepts a connection within ``PROBE_SECONDS`` is refused
    too, where ``ray.init`` would retry for minutes. ``auto`` and other forms go to Ray as
    they are.
    """
    address, named_by = ray_address(options)
    if not address:
        return
    _check_address(address, named_by)
    start_ray(options)


def _check_address(address: str, named_by: str) -> None:
    if address.startswith("ray://"):
        raise ConfigError(
            f"{named_by} {address} is a Ray Client address, and Ray Data, which "
            "--engine ray runs on, does not work through Ray Client. Run ducho-fast on a node "
            f"of the cluster (its head node, or in a job submitted with `ray job submit`) with "
            f"{named_by}{'=' if named_by == 'RAY_ADDRESS' else ' '}auto, or the cluster's own "
            "address, HOST:PORT (port 6379 unless `ray start --port` chose another)."
        )
    host, port = _host_port(address)
    if host is None or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
        if isinstance(e, TimeoutError):
            why = f"no answer within {PROBE_SECONDS:g} s"
        else:
            why = e.strerror or str(e) or type(e).__name__
        raise ConfigError(
            f"{named_by} {address}: no Ray cluster answers there ({why}). Check that the "
            "cluster is running (`ray status` on its head node) and that this is its address, "
            "HOST:PORT (port 6379 unless `ray start --port` chose another)."
        ) from e


def _host_port(address: str) -> tuple[str | None, int | None]:
    """``HOST:PORT`` (``[v6]:PORT`` too) split; (None, None) for any other form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        return None, None
    return host.strip("[]"), int(port)


def _unjoinable(address: str, named_by: str, error: BaseException) -> str:
    """Why ``ray.init`` could not join the cluster at ``address``, and what to do."""
    reasons: list[str] = []
    cause: BaseException | None = error
    while cause is not None and len(reasons) < 4:
        reasons.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(reasons)
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    message = f"{named_by} {address}: Ray could not join the cluster ({first})."
    if re.search(r"authenticat|auth_?token", text, re.IGNORECASE):
        message += (
            " The cluster asks for an authentication token (`ray start` turns token "
            "authentication on by default): set RAY_AUTH_MODE=token here, with the cluster's "
            "token in ~/.ray/auth_token, in the file RAY_AUTH_TOKEN_PATH names, or in "
            "RAY_AUTH_TOKEN."
        )
    else:
        message += " Check that the cluster is running (`ray status` on its head node)."
    return message
