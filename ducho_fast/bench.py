"""``ducho-fast bench``: how fast extract runs a config's models here, on its own data.

For each model of each job, the first ``items`` items of the job (those that read) are copied
into a work folder (images and audio as links, texts as a TSV) and timed, rounds in rotated
order, two ways: ``extract`` end to end into a new, empty folder (reading, decoding,
tokenizing, the model, writing), and the model's session alone on the batches extract builds
of them, decoded beforehand. Their ratio is the pipeline's efficiency: 1 where the model is
the only bottleneck. From extract's rate comes an estimate of the whole job's time.

The comparison with the source frameworks run eagerly (Ducho's way) is the scripts in
``benchmarks/``, on the models they name; this command needs only the core install.
"""

from __future__ import annotations

import csv
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast import api
from ducho_fast.artifact import Artifact, find_artifact
from ducho_fast.config import Config, Job, ModelSpec
from ducho_fast.config.model import RuntimeOptions
from ducho_fast.data.items import Item
from ducho_fast.data.sources import check_inputs, job_items, loader_for
from ducho_fast.errors import ConfigError, DuchoError, OutputError
from ducho_fast.fusion import graph_name
from ducho_fast.runtime.batcher import AUTO_TOKENS_PER_ROW, window_size
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.embedder import Embedder, Prepared
from ducho_fast.runtime.session import batch_lanes
from ducho_fast.runtime.stages import Timing

CPU_PROVIDER = "CPUExecutionProvider"
SAMPLE_ITEMS = 256
SAMPLE_BYTES = 1 << 30  # of decoded inputs, at most: the sample and its batches are held
ROUNDS = 3
TEXT_ID, TEXT = "id", "text"  # the sample TSV's columns


@dataclass(frozen=True)
class Source:
    """The source framework's model run eagerly on the session's batches: items/s (median
    round), extract's speed over it per round (median, range), and the least cosine between
    its outputs and the session's (the first output, every item of the last round)."""

    framework: str
    rate: float
    speedup: float
    speedup_range: tuple[float, float]
    min_cosine: float
    session_speedup: float = 0.0  # the session alone over the source, median round

    def as_dict(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "items_per_second": round(self.rate, 2),
            "extract_vs_source": round(self.speedup, 3),
            "extract_vs_source_range": [round(x, 3) for x in self.speedup_range],
            "session_vs_source": round(self.session_speedup, 3),
            "min_cosine": round(self.min_cosine, 6),
        }


@dataclass(frozen=True)
class BenchRun:
    """One model over a sample of its job's items: items/s of each way, median rounds."""

    key_path: str
    model: str
    provider: str
    items: int  # the sample: items that read, each embedded in every round
    job_items: int  # the job's items, those the sample was taken from
    extract_rate: float
    session_rate: float
    efficiency: float  # median over rounds of the session's seconds / extract's
    efficiency_range: tuple[float, float]
    rounds: int
    unreadable: int = 0  # items of the sample's span left out: they fail to read
    capped: bool = False  # the sample stopped short of ``items`` at SAMPLE_BYTES decoded
    # Where extract's time went (medians over rounds, seconds): until its first batch ran
    # (the session made, the first window read), and after that its model waiting for the
    # readers and for the writer.
    first_batch: float = 0.0
    waiting_for_inputs: float = 0.0
    waiting_for_writer: float = 0.0
    source: Source | None = None  # the source framework's model, with --source

    @property
    def extract_seconds(self) -> float:
        return self.items / self.extract_rate

    @property
    def job_seconds(self) -> float:
        """The whole job, all of its items, at extract's pace after its first batch (items
        already written would be skipped): the start-up once, the rest per item."""
        per_item = max(0.0, self.extract_seconds - self.first_batch) / self.items
        return self.first_batch + per_item * self.job_items

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.key_path,
            "name": self.model,
            "provider": self.provider,
            "items": self.items,
            "job_items": self.job_items,
            "unreadable": self.unreadable,
            "capped": self.capped,
            "rounds": self.rounds,
            "items_per_second": {
                "extract": round(self.extract_rate, 2),
                "session": round(self.session_rate, 2),
            },
            "efficiency": round(self.efficiency, 3),
            "efficiency_range": [round(x, 3) for x in self.efficiency_range],
            "job_seconds": round(self.job_seconds, 1),
            "extract_seconds": {
                "total": round(self.extract_seconds, 3),
                "first_batch": round(self.first_batch, 3),
                "waiting_for_inputs": round(self.waiting_for_inputs, 3),
                "waiting_for_writer": round(self.waiting_for_writer, 3),
            },
            "source": self.source.as_dict() if self.source is not None else None,
        }


@dataclass
class BenchReport:
    runs: list[BenchRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # jobs not timed, and why


def bench(
    config: api.ConfigLike,
    overrides: Sequence[str] = (),
    *,
    items: int = SAMPLE_ITEMS,
    repeats: int = ROUNDS,
    work: Path | None = None,
    source: bool = False,
    on_run: Callable[[BenchRun], None] | None = None,
) -> BenchReport:
    """Time every model of the config (already exported) on a sample of its job's items.

    Args:
        config: the config, as for :func:`ducho_fast.extract`; its output folders are not
            touched.
        items: the sample's size: the first that many items of each job that read.
        repeats: timed rounds of each way, in rotated order; the medians are reported.
        work: where the sample and its features go, in a folder removed at the end (by
            default beside the first job's output folder, on the disk a real run writes to).
        source: also time the source framework's model (loaded as export loads it; the
            framework's extra installed) eagerly on the session's batches, on the CPU.
        on_run: called with each model's result as soon as it is measured.
    """
    if not _whole(items) or not _whole(repeats):
        raise ConfigError(
            f"bench takes whole numbers of 1 or more for items and repeats, not {items!r} "
            f"and {repeats!r}."
        )
    cfg = api.as_config(config, overrides)
    check_inputs(cfg.jobs)
    artifacts = {graph_name(g): find_artifact(cfg.store, g) for g in cfg.graphs()}
    report = BenchReport()
    with _work_folder(work, cfg) as folder:
        for k, job in enumerate(cfg.jobs):
            if job.modality == "visual_textual":
                report.skipped.append(f"{job.name}: two-tower jobs are not timed by bench yet")
                continue
            listed = job_items(job).good
            for m, spec in enumerate(job.models):
                sample = _Sample.take(listed, spec, artifacts[graph_name(spec)], cfg, items)
                place = folder / f"job{k}-model{m}"
                run = _bench_model(cfg, job, sample, repeats, place, source, report)
                if run is None:
                    report.skipped.append(f"{spec.key_path}: no item of the job reads")
                    continue
                report.runs.append(run)
                if on_run is not None:
                    on_run(run)
    return report


@dataclass
class _Sample:
    """A model's sample of its job: the first items that read, and what they read as."""

    spec: ModelSpec
    artifact: Artifact
    items: list[Item]
    payloads: list[Any]
    job_items: int  # the job's items, those the sample was taken from
    unreadable: int  # items passed over: they fail to read
    nbytes: int = 0  # the decoded images' or clips' (texts: 0)
    capped: bool = False  # stopped at SAMPLE_BYTES before ``items``

    @classmethod
    def take(
        cls, listed: list[Item], spec: ModelSpec, artifact: Artifact, cfg: Config, items: int
    ) -> _Sample:
        loader = loader_for(spec, artifact.manifest, cfg.input)
        sample = cls(spec, artifact, [], [], len(listed), 0)
        for item in listed:
            if len(sample.items) == items:
                break
            if sample.nbytes >= SAMPLE_BYTES:  # minutes-long clips: a sample that fits memory
                sample.capped = True
                break
            try:
                payload = loader(item)
            except DuchoError:
                sample.unreadable += 1
                continue
            sample.items.append(item)
            sample.payloads.append(payload)
            sample.nbytes += getattr(payload, "nbytes", 0)
        return sample


def _bench_model(
    cfg: Config,
    job: Job,
    sample: _Sample,
    repeats: int,
    folder: Path,
    source: bool,
    report: BenchReport,
) -> BenchRun | None:
    if not sample.items:
        return None
    sub = _sample_config(cfg, job, sample.spec, _write_sample(folder, job, sample.items), folder)
    runs: list[Any] = []
    made = iter(range(1, 1 << 30))

    def extract() -> None:  # each round into a new folder, as a first run writes
        sub_job = replace(sub.jobs[0], output_path=folder / f"out{next(made)}")
        runs.extend(api.extract(replace(sub, jobs=(sub_job,))).runs)

    embedder = Embedder(sample.artifact, alone(cfg.runtime), lanes=batch_lanes(cfg.runtime))
    batches = _batches(embedder, cfg, sample.spec, sample.payloads)
    systems: dict[str, Callable[[], Any]] = {
        "extract": extract,
        "session": session_alone(embedder, batches),
    }
    eager = None
    if source and embedder.info.provider != CPU_PROVIDER:
        report.skipped.append(
            f"{sample.spec.key_path}: --source times the source framework on the CPU only, and "
            f"this model's session runs on {embedder.info.provider}; benchmarks/text.py and "
            "visual.py --device cuda compare both on the GPU"
        )
    elif source:
        eager = _eager(sample.spec, batches)
        systems["source"] = eager.run
    with _torch_threads(eager is not None):
        seconds, values = rounds(repeats, systems)
    ratios = [s / e for e, s in zip(seconds["extract"], seconds["session"], strict=True)]
    count = len(sample.items)
    return BenchRun(
        key_path=sample.spec.key_path,
        model=sample.spec.model_name,
        provider=runs[-1].provider if runs else "",
        items=count,
        job_items=sample.job_items,
        extract_rate=count / statistics.median(seconds["extract"]),
        session_rate=count / statistics.median(seconds["session"]),
        efficiency=statistics.median(ratios),
        efficiency_range=(min(ratios), max(ratios)),
        rounds=repeats,
        unreadable=sample.unreadable,
        capped=sample.capped,
        **_waits([r.result.timing for r in runs]),
        source=None if eager is None else eager.measured(seconds, values["source"], embedder),
    )


@dataclass(frozen=True)
class _Eager:
    """The source model's eager runs over the session's batches (their feeds, group by
    group), each returning the first output of every group."""

    framework: str
    step: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    batches: list[Prepared]

    def run(self) -> list[np.ndarray]:
        return [self.step(feeds)[0] for b in self.batches for _, feeds in b.parts]

    def measured(
        self, seconds: dict[str, list[float]], outputs: list[np.ndarray], embedder: Embedder
    ) -> Source:
        ours = [out[0] for b in self.batches for _, out in embedder.launch(b).parts]
        speedups = [s / e for e, s in zip(seconds["extract"], seconds["source"], strict=True)]
        model = [s / e for e, s in zip(seconds["session"], seconds["source"], strict=True)]
        count = sum(len(idx) for b in self.batches for idx, _ in b.parts)
        return Source(
            framework=self.framework,
            rate=count / statistics.median(seconds["source"]),
            speedup=statistics.median(speedups),
            speedup_range=(min(speedups), max(speedups)),
            min_cosine=min(_least_cosine(a, b) for a, b in zip(outputs, ours, strict=True)),
            session_speedup=statistics.median(model),
        )


def _eager(spec: ModelSpec, batches: list[Prepared]) -> _Eager:
    """The source model, loaded and cut as export loads and cuts it, run eagerly once on
    the first batch (untimed: the framework's first call sets itself up)."""
    from ducho_fast.exporters import exporter_for

    exporter = exporter_for(spec)
    step = exporter.eager(exporter.build(spec))
    eager = _Eager(exporter.eager_name, step, batches)
    if batches:
        step(batches[0].parts[0][1])
    return eager


def _least_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine between the rows of two batches' outputs (each row flattened)."""
    x = np.asarray(a, np.float64).reshape(len(a), -1)
    y = np.asarray(b, np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.min(np.sum(x * y, axis=1) / np.maximum(norms, 1e-30)))


@contextmanager
def _torch_threads(eager: bool) -> Iterator[None]:
    """Torch on the CPUs this process may use (as the sessions are), while the source runs."""
    try:
        import torch
    except ImportError:  # a Keras source, without the torch extra
        eager = False
    if not eager:
        yield
        return

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_quota())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _waits(timings: list[Timing | None]) -> dict[str, float]:
    """The medians of extract's rounds' timings (none where the engine measures none)."""
    known = [t for t in timings if t is not None]
    if not known:
        return {}
    return {
        "first_batch": statistics.median(t.first_batch for t in known),
        "waiting_for_inputs": statistics.median(t.inputs for t in known),
        "waiting_for_writer": statistics.median(t.writer for t in known),
    }


def _write_sample(folder: Path, job: Job, sample: list[Item]) -> Path:
    """The sample as a job's input: links to the files, or a TSV of ids and texts."""
    folder.mkdir(parents=True)
    if job.modality == "textual":
        path = folder / "texts.tsv"
        with path.open("w", encoding="utf-8", newline="") as f:
            # every cell quoted: a text may hold a carriage return, which ends an unquoted row
            writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_ALL)
            writer.writerow([TEXT_ID, TEXT])
            writer.writerows([item.item_id, item.raw] for item in sample)
        return path
    path = folder / "input"
    path.mkdir()
    for item in sample:
        source = Path(item.raw).resolve()
        (path / source.name).symlink_to(source)
    return path


def _sample_config(cfg: Config, job: Job, spec: ModelSpec, source: Path, folder: Path) -> Config:
    """The config that runs ``spec`` alone on the sample into ``folder``, from scratch."""
    if job.modality == "textual":  # interactions too: the sample's ids are the output names
        job = replace(
            job, origin="items", item_column=TEXT_ID, text_column=TEXT, interaction_columns=None
        )
    job = replace(job, input_path=source, output_path=folder / "out", models=(spec,))
    output = replace(cfg.output, resume=False, id_order=None)
    return replace(cfg, jobs=(job,), fusions=(), output=output, dataset_path=folder)


def _batches(
    embedder: Embedder, cfg: Config, spec: ModelSpec, payloads: list[Any]
) -> list[Prepared]:
    """The batches extract builds of the payloads: consecutive images or clips; texts
    tokenized and sorted by length in windows, within the token budget."""
    size = spec.batch_size
    if not embedder.sorts_by_length:
        step = range(0, len(payloads), size)
        return [embedder.prepare_batch(payloads[b : b + size]) for b in step]
    budget = cfg.runtime.token_budget or size * AUTO_TOKENS_PER_ROW
    window = window_size(True, size, cfg.runtime.sort_window)
    batches = []
    for begin in range(0, len(payloads), window):
        tokens = embedder.tokenize(payloads[begin : begin + window])
        for idx in embedder.plan(tokens, size, budget):
            batches.append(embedder.prepare_batch([tokens[i] for i in idx]))
    return batches


def alone(options: RuntimeOptions) -> RuntimeOptions:
    """The session alone: its threads spin between ops, as nothing shares their CPUs; on
    CUDA, ``session.run`` on host batches, so its time includes the copies that extract's
    I/O binding overlaps with the model."""
    return replace(options, spin_wait="on", io_binding="off")


def session_alone(embedder: Embedder, batches: list[Prepared]) -> Callable[[], None]:
    """A call that runs ``embedder``'s session alone on ``batches`` (built beforehand) as
    extract runs its model: as many batches at once as it has lanes, each lane taking the
    next batch. The first batch runs once here, untimed (warm-up)."""
    count = embedder.lanes
    if batches:
        embedder.launch(batches[0])

    def run() -> None:
        todo = iter(batches)
        lock = threading.Lock()

        def lane(k: int) -> None:
            while True:
                with lock:
                    batch = next(todo, None)
                if batch is None:
                    return
                embedder.launch(batch, k)

        if count == 1:  # on the calling thread
            lane(0)
            return
        threads = [threading.Thread(target=lane, args=(k,)) for k in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return run


def cpu_seconds() -> float:
    """The CPU time this process has used so far, all its threads (user and system)."""
    times = os.times()
    return times.user + times.system


def rounds(
    repeats: int,
    systems: dict[str, Callable[[], Any]],
    cpu: dict[str, list[float]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Every system timed once per round, ``repeats`` rounds, the order rotated each round.

    A machine's speed can drift by a quarter within minutes (shared VMs); timing the systems
    side by side, round after round, lets that drift fall on all of them alike, so ratios are
    taken within a round. Returns the seconds per round of each system, and the value of each
    system's last run. ``cpu``, if given, gets each system's CPU seconds per round
    (:func:`cpu_seconds` before and after: every thread of the process, those that the
    libraries start included).
    """
    names = list(systems)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    values: dict[str, Any] = {}
    for r in range(max(1, repeats)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            began, start = cpu_seconds(), time.perf_counter()
            values[name] = systems[name]()
            seconds[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(cpu_seconds() - began)
    return seconds, values


@contextmanager
def _work_folder(work: Path | None, cfg: Config) -> Iterator[Path]:
    """A new folder for the samples and their features, removed at the end."""
    base = work if work is not None else _existing(cfg.jobs[0].output_path) if cfg.jobs else None
    try:
        made = tempfile.TemporaryDirectory(prefix=".ducho-fast-bench-", dir=base)
    except OSError as e:
        raise OutputError(
            f"bench cannot make its work folder in {base}: {e.strerror or e}. Name a writable "
            "folder with --work (ideally on the disk the features are written to)."
        ) from e
    with made as folder:
        yield Path(folder)


def _existing(path: Path) -> Path:
    """The nearest folder of ``path`` and its parents that exists."""
    while not path.is_dir() and path.parent != path:
        path = path.parent
    return path


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
