"""``ducho-fast bench``: how fast extract runs a config's models here, on its own data.

For each model of each job, the first ``items`` items of the job that read (a two-tower
model: ids that pair and read in both modalities) are copied into a work folder (images and
audio as links, texts as a TSV) and timed, rounds in rotated order: ``extract`` end to end
into a new, empty folder (reading, decoding, tokenizing, the model, writing), and the model's
session alone on the batches extract builds of them, decoded beforehand. Their ratio is the
pipeline's efficiency: 1 where the model is the only bottleneck. From extract's pace comes an
estimate of the whole job's time.

With ``source``, the source framework's model (PyTorch or Keras, loaded as export loads it)
also runs eagerly on the same batches: the model alone, not Ducho's whole run, which also
decodes (the scripts in ``benchmarks/`` measure that). Without it, only the core install is
needed. With ``variants`` (``--vs KEY=VALUE``), extract also runs with each setting changed,
in the same rounds (:mod:`ducho_fast.bench_variants`).
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ducho_fast import api, bench_source
from ducho_fast.artifact import Artifact, find_artifact
from ducho_fast.bench_source import Source, torch_threads
from ducho_fast.bench_timing import alone, rounds, session_alone
from ducho_fast.bench_variants import Variant, compare_features, variant_configs
from ducho_fast.config import Config, Job, ModelSpec
from ducho_fast.config.load import read_config
from ducho_fast.data.items import Item
from ducho_fast.data.pairs import paired_items
from ducho_fast.data.sources import check_inputs, job_items, loader_for
from ducho_fast.errors import ConfigError, DuchoError, OutputError
from ducho_fast.fusion import graph_name
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.embedder import Embedder, Prepared
from ducho_fast.runtime.memory import fitting_parts
from ducho_fast.runtime.openvino import OPENVINO, bf16_offer
from ducho_fast.runtime.session import batch_lanes

CPU_PROVIDER = "CPUExecutionProvider"
SAMPLE_ITEMS = 256
SAMPLE_BYTES = 1 << 30  # of decoded inputs, at most: the sample and its batches are held
ROUNDS = 3
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".jpe")
TEXT_ID, TEXT = "id", "text"  # the sample TSV's columns


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
    # (the session made, the first window read), how much longer that batch ran than the
    # later ones (the session's warm-up: ``Timing.warm_up``), after that its model waiting
    # for the readers and for the writer, and the writers' last writes after the model's
    # last batch. ``warm_up`` is None where no lane of extract ran a second batch in any
    # round, so that nothing told.
    first_batch: float = 0.0
    warm_up: float | None = 0.0
    waiting_for_inputs: float = 0.0
    waiting_for_writer: float = 0.0
    last_writes: float = 0.0
    # The writer threads extract ended with, and how many of them it added as the model
    # waited for the writers (``runtime.writers: 0``): the round with the median count.
    writers: int = 0
    writers_added: int = 0
    # The sample's files were copied into the work folder, whose file system makes no links:
    # extract read them from there (perhaps from the page cache), not from where they are.
    sample_copied: bool = False
    source: Source | None = None  # the source framework's model, with --source
    # The process's CPU time per item of each way (every thread; median round), in ms: the
    # session's is the model's; extract's adds reading, decoding, tokenizing and writing.
    cpu_ms: dict[str, float] = field(default_factory=dict)
    variants: tuple[Variant, ...] = ()  # extract with a setting changed (--vs)
    cpus: int = 0  # the CPUs this process may use (affinity and quota), which extract shares
    # An image model whose sample holds JPEGs decoded in full (``input.jpeg_decode: full``):
    # the reduced decoding is a setting worth timing where decoding bounds the run.
    jpegs_in_full: bool = False
    precision: str = "fp32"  # the artifact's (``precision``)
    # Where an fp32 model ran on ONNX Runtime's CPU provider: whether ``precision: bf16``
    # runs on this CPU ("runs"), would with the ``openvino`` extra ("install"), or not ("").
    bf16: str = ""

    @property
    def cpu_bound(self) -> float | None:
        """What efficiency the CPUs allow where the model and the work around it share
        them: the session's CPU per item over extract's. None where either is unmeasured, and
        for a session on another device, whose CPU time is not the model's work."""
        model, whole = self.cpu_ms.get("session"), self.cpu_ms.get("extract")
        if self.provider not in (CPU_PROVIDER, OPENVINO) or not model or not whole:
            return None
        return min(1.0, model / whole)

    @property
    def extract_seconds(self) -> float:
        return self.items / self.extract_rate

    @property
    def start_up(self) -> float:
        """Its start-up: until its first batch ran, and how much longer that batch ran than
        the later ones (the session's warm-up; none where that is unknown)."""
        return self.first_batch + (self.warm_up or 0.0)

    @property
    def once(self) -> float:
        """What a run spends once, however many its items (:func:`_spent_once`)."""
        return _spent_once(self)

    @property
    def job_seconds(self) -> float:
        """The whole job, all of its items, at extract's pace between its start-up and its
        last writes (items already written would be skipped): those once, the rest per
        item."""
        return _job_seconds(self.extract_seconds, self.once, self.items, self.job_items)

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
                "warm_up": None if self.warm_up is None else round(self.warm_up, 3),
                "waiting_for_inputs": round(self.waiting_for_inputs, 3),
                "waiting_for_writer": round(self.waiting_for_writer, 3),
                "last_writes": round(self.last_writes, 3),
            },
            "writers": {"threads": self.writers, "added": self.writers_added},
            "sample_copied": self.sample_copied,
            "source": self.source.as_dict() if self.source is not None else None,
            "cpu_ms_per_item": {k: round(v, 3) for k, v in self.cpu_ms.items()},
            "cpus": self.cpus,
            "cpu_bound": None if self.cpu_bound is None else round(self.cpu_bound, 3),
            "precision": self.precision,
            "bf16": self.bf16 or None,
            "variants": [v.as_dict() for v in self.variants],
        }


@dataclass(frozen=True)
class BenchRound:
    """One round of a model's timing, as soon as it is measured."""

    key_path: str
    number: int  # from 1
    rounds: int
    # items/s of each way in this round: "extract", "session" (alone), "source" (with
    # --source), "extract KEY=VALUE" (each variant)
    rates: dict[str, float]


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
    variants: Sequence[str] = (),
    on_run: Callable[[BenchRun], None] | None = None,
    on_round: Callable[[BenchRound], None] | None = None,
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
        variants: settings (``KEY=VALUE``, as ``overrides`` take), each timed as extract
            with that setting changed, in the same rounds, its features compared with those
            of the config as it is. Not for a ``Config`` already resolved.
        on_run: called with each model's result as soon as it is measured.
        on_round: called after each round of each model with its items/s per way: what a
            long bench has measured so far, also when it is stopped before its end.
    """
    if not _whole(items) or not _whole(repeats):
        raise ConfigError(
            f"bench takes whole numbers of 1 or more for items and repeats, not {items!r} "
            f"and {repeats!r}."
        )
    name = None
    if variants and isinstance(config, str | os.PathLike):
        # Each variant is the YAML with its setting: read once (a pipe, stdin: only once).
        config, name = read_config(config)
    cfg = api.as_config(config, overrides, name=name)
    check_inputs(cfg.jobs)
    artifacts = {graph_name(g): find_artifact(cfg.store, g) for g in cfg.graphs()}
    others = variant_configs(config, overrides, variants, cfg, name)
    report = BenchReport()
    with _work_folder(work, cfg) as folder:
        for k, job in enumerate(cfg.jobs):
            listed = _listed(job)
            for m, spec in enumerate(job.models):
                towers = [_Tower(g, artifacts[graph_name(g)]) for g in spec.towers()]
                sample = _Sample.take(listed, towers, cfg, items)
                place = folder / f"job{k}-model{m}"
                ways = [(setting, other, k, m) for setting, other in others]
                run = _bench_model(
                    cfg, job, spec, sample, repeats, place, source, report, ways, on_round
                )
                if run is None:
                    report.skipped.append(f"{spec.key_path}: no item of the job reads")
                    continue
                report.runs.append(run)
                if on_run is not None:
                    on_run(run)
    return report


def _listed(job: Job) -> list[list[Item]]:
    """The job's items, per graph a model runs: one list, or the image and the text items
    of the ids a two-tower job pairs (in the same order)."""
    if job.modality != "visual_textual":
        return [job_items(job).good]
    pairs = paired_items(job)
    return [pairs.images, pairs.texts]


@dataclass
class _Tower:
    """One graph of a model (a two-tower model has two), and the sample's inputs to it."""

    spec: ModelSpec
    artifact: Artifact
    payloads: list[Any] = field(default_factory=list)


@dataclass
class _Sample:
    """A model's sample of its job: the first items that read (per graph), and what they
    read as."""

    towers: list[_Tower]
    rows: list[tuple[Item, ...]]  # per sample item, its item in each graph's list
    job_items: int  # the job's items, those the sample was taken from
    unreadable: int = 0  # items passed over: they fail to read
    nbytes: int = 0  # the decoded images' or clips' (texts: 0)
    capped: bool = False  # stopped at SAMPLE_BYTES before ``items``

    @classmethod
    def take(
        cls, listed: list[list[Item]], towers: list[_Tower], cfg: Config, items: int
    ) -> _Sample:
        loaders = [loader_for(t.spec, t.artifact.manifest, cfg.input) for t in towers]
        sample = cls(towers, [], len(listed[0]))
        for row in zip(*listed, strict=True):
            if len(sample.rows) == items:
                break
            if sample.nbytes >= SAMPLE_BYTES:  # minutes-long clips: a sample that fits memory
                sample.capped = True
                break
            try:
                payloads = [load(item) for load, item in zip(loaders, row, strict=True)]
            except DuchoError:
                sample.unreadable += 1
                continue
            sample.rows.append(row)
            for tower, payload in zip(towers, payloads, strict=True):
                tower.payloads.append(payload)
                sample.nbytes += getattr(payload, "nbytes", 0)
        return sample


def _bench_model(
    cfg: Config,
    job: Job,
    spec: ModelSpec,
    sample: _Sample,
    repeats: int,
    folder: Path,
    source: bool,
    report: BenchReport,
    ways: Sequence[tuple[str, Config, int, int]] = (),
    on_round: Callable[[BenchRound], None] | None = None,
) -> BenchRun | None:
    """``ways``: the variants, each (setting, its config, the job's and the model's index)."""
    if not sample.rows:
        return None
    files, texts, copied = _write_sample(folder, job, sample.rows)
    inputs = (files, texts)
    sub = _sample_config(cfg, job, spec, inputs)
    runs_of: dict[str, list[list[Any]]] = {}  # each extract way's model runs, per round
    made = iter(range(1, 1 << 30))
    last: dict[str, Path] = {}  # each way's output folder, in its last round

    def extract_with(name: str, config: Config) -> Callable[[], None]:
        def run() -> None:  # each round into new folders, as a first run writes
            out = folder / f"out{next(made)}"
            last[name] = out
            job = _outputs(config.jobs[0], out)
            runs_of.setdefault(name, []).append(api.extract(replace(config, jobs=(job,))).runs)

        return run

    lanes = batch_lanes(cfg.runtime)
    embedders = [Embedder(t.artifact, alone(cfg.runtime), lanes=lanes) for t in sample.towers]
    batches = [
        _batches(e, cfg, t.spec, t.payloads) for e, t in zip(embedders, sample.towers, strict=True)
    ]
    alone_runs = [session_alone(e, b) for e, b in zip(embedders, batches, strict=True)]
    systems: dict[str, Callable[[], Any]] = {
        "extract": extract_with("extract", sub),
        "session": lambda: [run() for run in alone_runs],  # a model's graphs, as extract runs them
    }
    provider = embedders[0].info.provider
    eager = None
    if source and provider not in (CPU_PROVIDER, OPENVINO):
        report.skipped.append(
            f"{spec.key_path}: --source times the source framework on the CPU only, and this "
            f"model's session runs on {provider}; benchmarks/text.py and visual.py --device "
            "cuda compare both on the GPU"
        )
    elif source:
        eager = bench_source.eager_source([t.spec for t in sample.towers], batches)
        systems["source"] = eager.run
    for setting, other, k, m in ways:
        other_job = other.jobs[k]
        other_sub = _sample_config(other, other_job, other_job.models[m], inputs)
        systems[f"extract {setting}"] = extract_with(f"extract {setting}", other_sub)
    cpu: dict[str, list[float]] = {}
    count = len(sample.rows)

    def said(number: int, took: dict[str, float]) -> None:
        if on_round is not None:
            rates = {name: count / s for name, s in took.items()}
            on_round(BenchRound(spec.key_path, number, max(1, repeats), rates))

    with torch_threads(eager is not None):
        seconds, values = rounds(repeats, systems, cpu, said)
    ratios = [s / e for e, s in zip(seconds["extract"], seconds["session"], strict=True)]
    runs = runs_of.get("extract", [])
    ran_on = runs[-1][0].provider if runs and runs[-1] else ""
    variants = tuple(
        _variant(setting, seconds, last, runs_of, (count, sample.job_items)) for setting, *_ in ways
    )
    return BenchRun(
        key_path=spec.key_path,
        model=spec.model_name,
        provider=ran_on,
        items=count,
        job_items=sample.job_items,
        extract_rate=count / statistics.median(seconds["extract"]),
        session_rate=count / statistics.median(seconds["session"]),
        efficiency=statistics.median(ratios),
        efficiency_range=(min(ratios), max(ratios)),
        rounds=repeats,
        unreadable=sample.unreadable,
        capped=sample.capped,
        **_waits(runs),
        sample_copied=copied,
        cpu_ms={k: statistics.median(v) / count * 1e3 for k, v in cpu.items()},
        source=None if eager is None else eager.measured(seconds, values["source"], embedders),
        variants=variants,
        cpus=cpu_quota(),
        jpegs_in_full=_jpegs_in_full(cfg, job, sample),
        precision=spec.precision,
        bf16=bf16_offer() if ran_on == CPU_PROVIDER and spec.precision == "fp32" else "",
    )


def _jpegs_in_full(cfg: Config, job: Job, sample: _Sample) -> bool:
    """Whether an image model's sample holds JPEGs (by name) that extract decodes in full."""
    if job.modality not in ("visual", "visual_textual") or cfg.input.jpeg_decode != "full":
        return False
    return any(Path(row[0].raw).suffix.lower() in JPEG_SUFFIXES for row in sample.rows)


def _variant(
    setting: str,
    seconds: dict[str, list[float]],
    last: dict[str, Path],
    runs_of: dict[str, list[list[Any]]],
    counts: tuple[int, int],
) -> Variant:
    """``counts``: the sample's items and the job's."""
    name = f"extract {setting}"
    speedups = [b / v for b, v in zip(seconds["extract"], seconds[name], strict=True)]
    identical, least, compared = compare_features(last["extract"], last[name])
    starts = {way: _once(runs_of.get(way, [])) for way in ("extract", name)}
    job: list[float] = []
    if all(len(s) == len(speedups) for s in starts.values()):
        job = [  # per round: what a run spends once, the rest of the job at the sample's pace
            _job_seconds(b, fb, *counts) / _job_seconds(v, fv, *counts)
            for b, fb, v, fv in zip(
                seconds["extract"], starts["extract"], seconds[name], starts[name], strict=True
            )
        ]
    return Variant(
        setting=setting,
        rate=counts[0] / statistics.median(seconds[name]),
        speedup=statistics.median(speedups),
        speedup_range=(min(speedups), max(speedups)),
        identical=identical,
        min_cosine=least,
        compared=compared,
        once=statistics.median(starts[name]) if job else None,
        job_speedup=statistics.median(job) if job else None,
        job_speedup_range=(min(job), max(job)) if job else None,
    )


def _once(rounds_runs: list[list[Any]]) -> list[float]:
    """What each round spent once (:attr:`BenchRun.once`, summed over the model's graphs'
    runs); nothing where the engine measures none."""
    timed = _timings(rounds_runs)
    if not all(timed):
        return []
    return [sum(map(_spent_once, ts)) for ts in timed]


def _spent_once(timed: Any) -> float:
    """What a run (a ``BenchRun``, or a pipeline's ``Timing``) spends once, however many its
    items: until its first batch ran, how much longer that batch ran than the later ones (the
    session's warm-up; none where that is unknown), and its last writes (the writers' queue,
    at most a few batches, draining after the model's last batch)."""
    return float(timed.first_batch + (timed.warm_up or 0.0) + timed.last_writes)


def _timings(rounds_runs: list[list[Any]]) -> list[list[Any]]:
    """Each round's pipeline timings, one per graph's run that has one."""
    return [[r.result.timing for r in runs if r.result.timing is not None] for runs in rounds_runs]


def _job_seconds(seconds: float, once: float, items: int, job_items: int) -> float:
    """A whole job's time from a sample's: what a run spends ``once``, then the rest per item
    (as :attr:`BenchRun.job_seconds`)."""
    return once + max(0.0, seconds - once) / items * job_items


def _waits(rounds_runs: list[list[Any]]) -> dict[str, Any]:
    """Where extract's time went: per round, the sum over the model's graphs' runs (a
    two-tower model runs two), then the median over the rounds; and the writers of the round
    with the median count (the most of its graphs' runs). Nothing where the engine measures
    nothing."""
    timed = [t for t in _timings(rounds_runs) if t]
    if not timed:
        return {}
    return {
        "first_batch": statistics.median(sum(t.first_batch for t in ts) for ts in timed),
        "warm_up": _warm_up(timed),
        "waiting_for_inputs": statistics.median(sum(t.inputs for t in ts) for ts in timed),
        "waiting_for_writer": statistics.median(sum(t.writer for t in ts) for ts in timed),
        "last_writes": statistics.median(sum(t.last_writes for t in ts) for ts in timed),
        **_writers(timed),
    }


def _warm_up(timed: list[list[Any]]) -> float | None:
    """How much longer extract's first batch ran than its later ones (summed over the model's
    graphs' runs): the median over the rounds where every run told; None where none did (no
    lane ran a second batch)."""
    told = [ts for ts in timed if all(t.warm_up is not None for t in ts)]
    return statistics.median(sum(t.warm_up for t in ts) for ts in told) if told else None


def _writers(timed: list[list[Any]]) -> dict[str, int]:
    """The writer threads of the round whose count is the median (the lower of two), and how
    many of them were added."""
    by_round = sorted(
        (max(t.writers for t in ts), max(t.writers_added for t in ts)) for ts in timed
    )
    threads, added = by_round[(len(by_round) - 1) // 2]
    return {"writers": threads, "writers_added": added}


def _write_sample(
    folder: Path, job: Job, rows: list[tuple[Item, ...]]
) -> tuple[Path, Path | None, bool]:
    """The sample as a job's input: links to the files or a TSV of ids and texts (a two-tower
    job: both, the texts of the images' ids); and whether the files were copied, not linked
    (see :func:`_link_or_copy`)."""
    folder.mkdir(parents=True)
    if job.modality == "textual":
        return _write_texts(folder / "texts.tsv", [row[0] for row in rows]), None, False
    files = folder / "input"
    files.mkdir()
    copied = False
    for row in rows:
        path = Path(row[0].raw)  # linked under its own name: its id (a link's, not its target's)
        copied = _link_or_copy(path.resolve(), files / path.name) or copied
    if job.modality != "visual_textual":
        return files, None, copied
    return files, _write_texts(folder / "texts.tsv", [row[1] for row in rows]), copied


def _link_or_copy(target: Path, link: Path) -> bool:
    """A symbolic link at ``link`` to ``target``, or a copy where the work folder's file
    system makes no links (FAT and exFAT refuse them, some network and FUSE file systems
    too); whether it copied."""
    try:
        link.symlink_to(target)
        return False
    except OSError as refused:
        try:
            shutil.copyfile(target, link)
        except OSError as e:
            raise OutputError(
                f"bench cannot put its sample's files in its work folder {link.parent}: a "
                f"link to {target} was refused ({refused.strerror or refused}), and a copy "
                f"failed ({e.strerror or e}). Name another folder with --work."
            ) from e
        return True


def _write_texts(path: Path, items: list[Item]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        # every cell quoted: a text may hold a carriage return, which ends an unquoted row
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow([TEXT_ID, TEXT])
        writer.writerows([item.item_id, item.raw] for item in items)
    return path


def _sample_config(
    cfg: Config, job: Job, spec: ModelSpec, inputs: tuple[Path, Path | None]
) -> Config:
    """The config that runs ``spec`` alone on the sample, from scratch."""
    source, texts = inputs
    if job.modality == "textual":  # interactions too: the sample's ids are the output names
        job = replace(
            job, origin="items", item_column=TEXT_ID, text_column=TEXT, interaction_columns=None
        )
    elif job.modality == "visual_textual":
        job = replace(job, text_input_path=texts, item_column=TEXT_ID, text_column=TEXT)
    job = replace(job, input_path=source, models=(spec,))
    output = replace(cfg.output, resume=False, id_order=None)
    return replace(cfg, jobs=(job,), fusions=(), output=output, dataset_path=source.parent)


def _outputs(job: Job, folder: Path) -> Job:
    """``job`` writing into ``folder`` (a two-tower job: each tower into a folder of it)."""
    if job.modality == "visual_textual":
        return replace(job, output_path=folder / "visual", text_output_path=folder / "textual")
    return replace(job, output_path=folder)


def _batches(
    embedder: Embedder, cfg: Config, spec: ModelSpec, payloads: list[Any]
) -> list[Prepared]:
    """The batches extract builds of the payloads: consecutive images or clips, each run of
    ``batch_size`` cut into its same-shape groups; texts tokenized and sorted by length in
    windows, within the token budget. Where the first ones, run as many at once as extract
    runs, run out of memory (``runtime.memory_limit``), each is cut in the parts extract
    runs."""
    size = spec.batch_size
    if not embedder.sorts_by_length:
        chunks = [[payloads[i] for i in idx] for idx in embedder.plan(payloads, size, 0)]
    else:
        options = cfg.runtime
        planned = embedder.text_batches(payloads, size, options.sort_window, options.token_budget)
        chunks = [tokens for _, tokens in planned]
    splits = embedder.memory_splits
    while True:  # the first parts, as many at once as extract runs: what fits at once
        known = splits.too_big
        parts = [part for chunk in chunks for part in fitting_parts(chunk, splits)]
        with ThreadPoolExecutor(embedder.lanes) as pool:
            for done in [pool.submit(embedder.run_prepared, p) for p in parts[: embedder.lanes]]:
                done.result()
        if splits.too_big == known:  # a smaller one padded where extract pads it (on CUDA)
            pad = size if splits.fits(size) else 0
            return [embedder.prepare_batch(part, pad) for part in parts]


@contextmanager
def _work_folder(work: Path | None, cfg: Config) -> Iterator[Path]:
    """A new folder for the samples and their features, removed at the end; in ``work``,
    which is made if it does not exist (and removed at the end, with the parents made for it,
    where nothing else was put there meanwhile)."""
    base = work if work is not None else _existing(cfg.jobs[0].output_path) if cfg.jobs else None
    parents: list[Path] = []
    try:
        try:
            parents = _made(work) if work is not None else []
            made = tempfile.TemporaryDirectory(prefix=".ducho-fast-bench-", dir=base)
        except OSError as e:
            raise OutputError(
                f"bench cannot make its work folder in {base}: {e.strerror or e}. Name a "
                "writable folder with --work (ideally on the disk the features are written to)."
            ) from e
        with made as folder:
            yield Path(folder)
    finally:
        for parent in reversed(parents):
            try:
                parent.rmdir()
            except OSError:  # something else was put there: it stays
                break


def _made(path: Path) -> list[Path]:
    """Make the folder ``path`` and its missing parents; those made, outermost first."""
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    made: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        except OSError:
            for mine in reversed(made):
                mine.rmdir()
            raise
        made.append(folder)
    return made


def _existing(path: Path) -> Path:
    """The nearest folder of ``path`` and its parents that exists."""
    while not path.is_dir() and path.parent != path:
        path = path.parent
    return path


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
