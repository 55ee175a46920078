"""The ``ducho-fast`` command: export, extract, layers, inspect, doctor.

Importing this module never imports torch, TensorFlow or transformers: ``export`` and
``layers`` load the exporters inside the command.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ducho_fast import __version__
from ducho_fast.errors import DuchoError

if TYPE_CHECKING:
    from ducho_fast.config.model import ModelSpec

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Export feature extractors to ONNX and extract multimodal features with ONNX Runtime.",
)
# Markup only where a call asks for it: paths, ids, layer lists ("[avgpool]") and error
# messages ("[ducho, matrix]") hold square brackets that rich would take for tags.
err = Console(stderr=True, markup=False)
out = Console(markup=False)

ITEMS_FAILED_EXIT = 3
# What a command stopped by Ctrl-C or SIGTERM leaves, and how to go on.
STOPPED_EXTRACT = (
    "The features written so far are complete and kept: run the command again to extract "
    "the rest, without --fresh (with --fresh or output.resume: false it starts over)."
)
STOPPED_EXPORT = (
    "Artifacts already exported are kept and a half-built one is never used; run the same "
    "command again to export the rest."
)
STOPPED_FUSE = "Run the same command again to finish the fusions."
STOPPED_BENCH = "Nothing of the config's outputs was touched, and bench's work folder is removed."
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

ConfigArg = Annotated[Path, typer.Argument(help="Ducho-style YAML config.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: a.b.c=VALUE (YAML-typed; list indices allowed)."),
]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Backend(str, Enum):
    torch = "torch"
    tensorflow = "tensorflow"
    transformers = "transformers"
    sentence_transformers = "sentence_transformers"


def _precision(precision: str) -> str:
    return "" if precision == "fp32" else f"{precision}, "


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _quiet_frameworks() -> None:
    """Keep framework chatter (download bars, tracing notes) out of the command's output."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")


def _overrides(ctx: typer.Context, sets: list[str] | None) -> list[str]:
    """``--set`` values, then Ducho's own ``--a.b.c=VALUE`` arguments."""
    extra = list(ctx.args)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        raise typer.BadParameter(f"unexpected argument(s) {bad}; overrides look like --a.b.c=VALUE")
    return [*(sets or []), *extra]


@contextmanager
def _errors(stopped: str | None = None) -> Iterator[None]:
    """A DuchoError as a message and exit 1. With ``stopped`` (what a stopped run leaves and
    how to go on), SIGTERM stops the command as Ctrl-C does, and both end it with that
    message and exit 128 + the signal's number (130, 143)."""
    caught: list[int] = []
    with _stop_on_sigterm(caught) if stopped else nullcontext():
        try:
            yield
        except DuchoError as e:
            message = f"[bold red]error:[/] {escape(str(e))}"
            err.print(message, highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from e
        except KeyboardInterrupt as e:
            if stopped is None:
                raise
            number = caught[0] if caught else signal.SIGINT  # Ctrl-C: Python's own handler
            err.print(
                f"\nstopped by {signal.Signals(number).name}. {stopped}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            raise typer.Exit(128 + number) from e


@contextmanager
def _stop_on_sigterm(caught: list[int]) -> Iterator[None]:
    """SIGTERM (a batch scheduler's stop, ``kill``) raises KeyboardInterrupt in the main
    thread, as Ctrl-C does, so that a run stops as it does on Ctrl-C: once the main thread's
    batch ends, the other lanes finish theirs and the writer saves every feature queued
    (``Pipeline.run``). The signal's number goes into ``caught``."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield  # only the main thread sets handlers; an ignored SIGTERM stays ignored
        return

    def stop(number: int, _: Any) -> None:
        caught.append(number)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@app.command(context_settings=_EXTRA)
def export(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Export again even if valid.")] = False,
) -> None:
    """Export every model of CONFIG to a parity-checked ONNX artifact in the model store."""
    from ducho_fast.api import export_steps

    _quiet_frameworks()
    with _errors(stopped=STOPPED_EXPORT):
        # Saying which model is being worked on (loading, converting and checking a large
        # one takes minutes), and each one's line when it is done: those lines stay on screen
        # (and in a log) if a later model fails.
        for spec, run in export_steps(config, _overrides(ctx, set_), force=force):
            err.print(
                f"{spec.key_path} {Path(spec.model_dir).name}: exporting...",
                highlight=False,
                soft_wrap=True,
            )
            for r in run():
                _print_exported(r)


def _print_exported(r: Any) -> None:
    layers = r.artifact.manifest["parity"]["layers"]
    cos = min(v["min_cosine"] for v in layers.values())
    rel = max(v["max_rel_diff"] for v in layers.values())
    status = "reused" if r.reused else f"exported in {r.seconds:.1f}s"
    out.print(
        f"{r.spec.key_path} {Path(r.spec.model_dir).name} "
        f"[{', '.join(r.spec.layer_labels())}]: {status} -> {_rel(r.artifact.path)} "
        f"({_precision(r.spec.precision)}parity: min cosine {cos:.7f}, max rel diff {rel:.1e})",
        highlight=False,
        soft_wrap=True,
    )


# Where stderr is not a terminal (a batch job's log, ``nohup``, a container run without -t),
# a bar is drawn only when it ends: extract prints a plain line this often instead.
PROGRESS_LINE_SECONDS = 30.0


ProgressEveryOpt = Annotated[
    float | None,
    typer.Option(
        min=1.0,
        envvar="DUCHO_FAST_PROGRESS_EVERY",
        help="Where stderr is not a terminal (a batch job's log): seconds between progress "
        "lines, and between the lines saying nothing was done for that long  [default: 30]",
        show_default=False,
    ),
]


@contextmanager
def _progress(label: str, total: int, every: float | None = None) -> Iterator[Any]:
    if not err.is_terminal:
        lines = _ProgressLines(label, total, PROGRESS_LINE_SECONDS if every is None else every)
        lines.start()
        try:
            yield lines.tick
        finally:
            lines.close()
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(escape(label), total=total, rate="")

        def tick(n: int) -> None:
            bar.advance(task, n)
            elapsed = bar.tasks[task].elapsed or 0.0
            done = bar.tasks[task].completed
            bar.update(task, rate=f"{done / elapsed:.1f} items/s" if elapsed else "")

        yield tick


class _ProgressLines:
    """Progress as plain lines for a log: one at the first tick ``every`` seconds after the
    start or the last line, with the rate and the time left. Work done sooner (a small job,
    a matrix of a few rows) prints none: its summary line says it all. Ticks come from the
    writer's thread (or a Ray engine's loop, a fusion's, a matrix's).

    While no tick comes (a model slow to load, a first batch of large inputs, reads stuck on
    a network file system), a line still comes every ``every`` seconds once :meth:`start`
    is called, saying how long nothing was done: a log that goes quiet is a process that
    stopped."""

    def __init__(self, label: str, total: int, every: float) -> None:
        self._label, self._total, self._every = label, total, every
        self._done = 0
        self._start = self._last = self._last_tick = time.monotonic()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watch: threading.Thread | None = None

    def start(self) -> None:
        """Watch for a stall in a thread of its own, until :meth:`close` (no need where a
        line may come at every tick: ``every`` 0)."""
        if self._every <= 0:
            return
        self._watch = threading.Thread(target=self._watching, name="ducho-progress", daemon=True)
        self._watch.start()

    def close(self) -> None:
        self._closed.set()
        if self._watch is not None:
            self._watch.join()

    def tick(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = self._last_tick = time.monotonic()
            if now - self._last < self._every or self._done >= self._total:
                return
            self._last = now
            rate = self._done / (now - self._start)
            left = (self._total - self._done) / rate if rate > 0 else 0.0
            share = 100 * self._done / self._total
            self._print(
                f"{self._done}/{self._total} ({share:.0f}%), {rate:.1f} items/s, "
                f"about {_clock(left)} left"
            )

    def stalled(self) -> None:
        """A line if none came for ``every`` seconds: how long nothing was done."""
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._every or self._done >= self._total:
                return
            self._last = now
            if self._done:
                share = 100 * self._done / self._total
                since = _clock(now - self._last_tick)
                self._print(f"{self._done}/{self._total} ({share:.0f}%), no item done for {since}")
            else:
                self._print(f"0/{self._total}, no item done yet, {_clock(now - self._start)} in")

    def _watching(self) -> None:
        while not self._closed.wait(self._every):
            self.stalled()

    def _print(self, text: str) -> None:
        err.print(f"{self._label}: {text}", highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    """``H:MM:SS``."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


@app.command(context_settings=_EXTRA)
def extract(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    progress_every: ProgressEveryOpt = None,
    fresh: Annotated[
        bool,
        typer.Option("--fresh", help="Extract every item again (output.resume: false)."),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="INDEX/COUNT (0-based): this job-array task's part of every job, e.g. "
            "$SLURM_ARRAY_TASK_ID/4. Run once more without it after all tasks to write "
            "matrices, fusions and manifests.",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option(
            help="local: this process, pipelined. ray: decode in Ray tasks and run the models "
            "in Ray actors (RAY_ADDRESS or --ray-address, else a local Ray instance).",
        ),
    ] = Engine.local,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="A running Ray cluster to join from one of its nodes: HOST:PORT (port 6379 "
            "by default) or auto. Not ray:// (Ray Data does not run through Ray Client).",
        ),
    ] = None,
    ray_actors: Annotated[
        int,
        typer.Option(min=0, help="Model actors per model (0: one per GPU on CUDA, else one)."),
    ] = 0,
) -> None:
    """Extract features for every block of CONFIG with its exported artifacts.

    Items already written by the same model and settings are skipped,
    so a killed run started again finishes the work.
    """
    import ducho_fast

    overrides = _overrides(ctx, set_) + (["output.resume=false"] if fresh else [])
    ray = None
    if engine is Engine.ray:
        from ducho_fast.runtime.raydata import RayOptions

        ray = RayOptions(actors=ray_actors, address=ray_address)
    with _errors(stopped=STOPPED_EXTRACT):
        report = ducho_fast.extract(
            config,
            overrides,
            progress=partial(_progress, every=progress_every) if progress else None,
            shard=shard,
            engine=engine.value,
            ray=ray,
        )
    _print_report(report)
    if report.shard is not None:
        err.print(
            f"shard {report.shard} done. Once every shard has finished, run "
            f"`ducho-fast extract {config}` (no --shard) to write the matrices, fusions and "
            "complete manifests; it reuses every item the shards wrote.",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if report.failed_items:
        err.print(
            f"[yellow]{report.failed_items} item(s) failed; see the ducho-fast.errors.tsv "
            "files beside the outputs.[/]",
            markup=True,
        )
    if report.matrix_errors:
        count = len(report.matrix_errors)
        err.print(f"[yellow]{count} matrix file(s) not written (see above).[/]", markup=True)
    if report.failed:
        raise typer.Exit(ITEMS_FAILED_EXIT)


def _print_report(report: Any) -> None:
    for run in report.runs:
        r = run.result
        tower = f" [{run.tower}]" if run.tower else ""
        reused = f"{r.reused} already done, " if r.reused else ""
        out.print(
            f"{run.job} {Path(run.model).name}{tower}: {r.written} written, {reused}"
            f"{len(r.errors)} failed, "
            f"{_rate(r)} on {run.provider.replace('ExecutionProvider', '')}"
            f" -> {', '.join(_rel(d) for d in run.output_dirs)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        _print_timing(r)
        if run.changed:
            owner = ", each by the shard that owns it" if report.shard else ""
            out.print(
                f"  {run.changed} input(s) changed after their features were written (a file "
                f"modified, a text edited): embedded again{owner}",
                highlight=False,
                soft_wrap=True,
            )
        for matrix in run.matrices:
            _print_matrix(matrix)
    _print_inputs(report)
    _print_fusions(report.fusions)
    for message in [*report.matrix_errors, *report.warnings]:
        err.print(message, highlight=False, soft_wrap=True)


def _print_inputs(report: Any) -> None:
    for job, bad in report.input_errors.items():
        if bad:
            err.print(f"{job}: {len(bad)} input item(s) skipped (bad or duplicate ids).")
    for job, files in report.ignored_files.items():
        if files:
            kind = "audio" if job.startswith("audio") else "image"
            err.print(
                f"{job}: {len(files)} file(s) ignored (hidden, or not {kind} files), e.g. "
                f"{files[0].name}."
            )
    for job, unpaired in report.unpaired.items():
        if unpaired:
            sample = ", ".join(repr(e.item_id) for e in unpaired[:5])
            err.print(
                f"{job}: {len(unpaired)} id(s) in only one modality skipped (e.g. {sample}); "
                "listed in ducho-fast.errors.tsv."
            )


# The model waited on its readers this much of the run, and this long: say so.
INPUT_BOUND = 0.25
INPUT_BOUND_MIN_SECONDS = 1.0


def _print_timing(result: Any) -> None:
    """Where the run's time went, when the local engine measured it."""
    t = result.timing
    if t is None or not result.written or result.seconds <= 0:
        return
    lanes = f", {t.lanes} batches at once" if t.lanes > 1 else ""
    out.print(
        f"  model busy {t.model / result.seconds:.0%} of {result.seconds:.1f}s{lanes} (first "
        f"batch after {t.first_batch:.1f}s); then waited {t.inputs:.1f}s for inputs, "
        f"{t.writer:.1f}s for the writer; the writer used {t.writer_cpu:.1f}s of CPU",
        highlight=False,
        soft_wrap=True,
    )
    if t.inputs >= max(INPUT_BOUND * result.seconds, INPUT_BOUND_MIN_SECONDS):
        out.print(
            f"  the model waited for its inputs {t.inputs / result.seconds:.0%} of the run: "
            "reading and decoding are slower than the model here. More decode threads "
            "(runtime.workers) help where CPUs are free.",
            highlight=False,
            soft_wrap=True,
        )


def _rate(result: Any) -> str:
    return f"{result.items_per_second:.1f} items/s" if result.written else "nothing to run"


def _print_matrix(matrix: Any) -> None:
    notes = []
    if matrix.filled:
        notes.append(f"{len(matrix.filled)} missing row(s) filled with the mean")
    if matrix.dropped:
        notes.append(f"{len(matrix.dropped)} id(s) not in id_order left out")
    note = f" ({'; '.join(notes)}, listed in missing.tsv)" if notes else ""
    kept = ", kept: no feature written since" if matrix.reused else ""
    out.print(
        f"  matrix {matrix.rows} rows{kept} -> {_rel(matrix.path)}{note}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _print_fusions(runs: list[Any]) -> None:
    for run in runs:
        for res in run.results:
            missing = f", {len(res.missing)} id(s) not in every input" if res.missing else ""
            reused = f"{res.reused} already done, " if res.reused else ""
            out.print(
                f"{run.key} fusion {run.mode}: {res.written} fused, {reused}"
                f"{len(res.errors)} failed"
                f"{missing} -> {_rel(res.output)}",
                highlight=False,
                soft_wrap=True,
            )
            if res.matrix is not None:
                _print_matrix(res.matrix)


@app.command(context_settings=_EXTRA)
def fuse(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    progress_every: ProgressEveryOpt = None,
) -> None:
    """Fuse features CONFIG has already extracted (its fusion keys), without running models."""
    import ducho_fast

    with _errors(stopped=STOPPED_FUSE):
        shown = partial(_progress, every=progress_every) if progress else None
        runs = ducho_fast.fuse(config, _overrides(ctx, set_), progress=shown)
    _print_fusions(runs)
    if not runs:
        err.print("nothing to fuse: the config has no 'fusion' keys.")
    failed = sum(len(res.errors) for run in runs for res in run.results)
    if failed:
        err.print(
            f"[yellow]{failed} item(s) failed to fuse; see ducho-fast.errors.tsv.[/]", markup=True
        )
        raise typer.Exit(ITEMS_FAILED_EXIT)


@app.command(context_settings=_EXTRA)
def bench(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    items: Annotated[
        int, typer.Option(min=1, help="The sample: the first that many items of each job.")
    ] = 256,
    repeats: Annotated[int, typer.Option(min=1, help="Timed rounds of each way.")] = 3,
    work: Annotated[
        Path | None,
        typer.Option(
            help="Where the sample's features go, in a folder removed at the end (default: "
            "beside the first job's output folder, on the disk a real run writes to).",
            show_default=False,
        ),
    ] = None,
    source: Annotated[
        bool,
        typer.Option(
            "--source",
            help="Also time the source framework's model (loaded as export loads it) eagerly "
            "on the same batches, on the CPU.",
        ),
    ] = False,
    vs: Annotated[
        list[str] | None,
        typer.Option(
            "--vs",
            help="Also time extract with this KEY=VALUE set (as --set takes; repeat for more "
            "variants), in the same rounds, its features compared with the config's: e.g. "
            "runtime.readers=processes, runtime.workers=8, input.jpeg_decode=reduced.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Also print one JSON line.")] = False,
) -> None:
    """Time extract on a sample of CONFIG's own data, against each model's session alone.

    Each model must be exported first; the config's output folders are not touched.
    Extract's items/s over the session's is the pipeline's efficiency (1: only the model limits).
    """
    from ducho_fast.bench import bench as run_bench

    if source:
        _quiet_frameworks()

    also = ", and of its source model" if source else ""
    err.print(
        f"bench: each model on up to {items} items of its job, {repeats} round(s) of extract "
        f"and of its session alone on the same batches read beforehand{also}...",
        highlight=False,
        soft_wrap=True,
    )
    with _errors(stopped=STOPPED_BENCH):
        report = run_bench(
            config,
            _overrides(ctx, set_),
            items=items,
            repeats=repeats,
            work=work,
            source=source,
            variants=vs or (),
            on_run=_print_bench,
        )
    for reason in report.skipped:
        err.print(f"not timed: {reason}", highlight=False, soft_wrap=True)
    if not report.runs and not report.skipped:
        err.print("nothing to time: the config has no model jobs.")
    if as_json:
        runs = [r.as_dict() for r in report.runs]
        out.print(json.dumps({"runs": runs, "skipped": report.skipped}), soft_wrap=True)


def _print_bench(run: Any) -> None:
    device = run.provider.removesuffix("ExecutionProvider") or "?"
    low, high = run.efficiency_range
    passed = f", {run.unreadable} that do not read passed over" if run.unreadable else ""
    if run.capped:
        passed += ", stopped at 1 GiB of decoded inputs"
    lines = [
        f"{run.key_path} ({run.model}) on {device}: {run.items} of {run.job_items:,} items"
        f"{passed}, {run.rounds} round(s)",
        f"  extract        {run.extract_rate:10.1f} items/s",
        f"  session alone  {run.session_rate:10.1f} items/s (the model on extract's batches)",
        f"  efficiency     {run.efficiency:10.2f}   (rounds {low:.2f}-{high:.2f})",
        f"  extract's time {run.extract_seconds:10.2f} s: {run.first_batch:.2f} until its first "
        f"batch ran (the session made, the first window read); then its model waited "
        f"{run.waiting_for_inputs:.2f} for inputs, {run.waiting_for_writer:.2f} for the writer",
        f"  whole job      {run.job_items:,} items in about {_clock(run.job_seconds)} at this pace",
    ]
    if run.cpu_ms:
        cpu = ", ".join(f"{k} {v:.2f} ms" for k, v in run.cpu_ms.items())
        lines.insert(
            -1, f"  CPU per item   {cpu} (this process's, every thread, and its decoder processes)"
        )
    if run.source is not None:
        low, high = run.source.speedup_range
        lines[3:3] = [
            f"  source         {run.source.rate:10.1f} items/s ({run.source.framework}, the same "
            f"batches; outputs agree to min cosine {run.source.min_cosine:.6f})",
            f"  extract/source {run.source.speedup:10.2f}x  (rounds {low:.2f}-{high:.2f}); the "
            f"session alone {run.source.session_speedup:.2f}x",
        ]
    for variant in run.variants:
        lines.insert(-1, _variant_line(variant))
    if run.first_batch > 0.2 * run.extract_seconds:
        lines.append(
            "  (the start-up is much of this sample's time: a larger --items measures the pace "
            "after it better)"
        )
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


def _variant_line(variant: Any) -> str:
    low, high = variant.speedup_range
    if variant.identical:
        features = f"its {variant.compared} feature files identical to extract's"
    elif variant.min_cosine is None:
        features = "no feature file of it to compare with extract's"
    else:
        features = (
            f"its features differ from extract's: least cosine {variant.min_cosine:.6f} "
            f"over {variant.compared} files"
        )
    return (
        f"  with {variant.setting}: {variant.rate:.1f} items/s, {variant.speedup:.2f}x extract "
        f"as configured (rounds {low:.2f}-{high:.2f}); {features}"
    )


@app.command()
def layers(
    backend: Annotated[Backend, typer.Argument(help="Source framework.")],
    model: Annotated[str, typer.Argument(help="Model name or local path.")],
    architecture: Annotated[str | None, typer.Option(help="For a state-dict file.")] = None,
    architecture_kwargs: Annotated[
        str | None,
        typer.Option(help='The architecture\'s arguments, as JSON: \'{"model_name": "b0"}\'.'),
    ] = None,
    trust: Annotated[bool, typer.Option(help="Allow pickled models / module:callable.")] = False,
) -> None:
    """List the layers of MODEL that output_layers can name."""
    with _errors():
        kwargs = _architecture_kwargs(architecture_kwargs)
        names = _layer_names(backend, model, architecture, trust, kwargs)
    for name in names:
        out.print(name, highlight=False)


def _architecture_kwargs(given: str | None) -> dict[str, Any]:
    """``--architecture-kwargs``: a JSON (or YAML flow) mapping, as the config's key holds."""
    import yaml

    from ducho_fast.errors import ConfigError

    if given is None:
        return {}
    try:
        value: Any = yaml.safe_load(given)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(
            f"--architecture-kwargs {given!r} is not a mapping of names to values; write it "
            """as JSON, such as '{"model_name": "efficientnet-lite0"}'."""
        )
    return value


def _layer_names(
    backend: Backend,
    model: str,
    architecture: str | None,
    trust: bool,
    kwargs: dict[str, Any] | None = None,
) -> list[str]:
    from ducho_fast.config.load import find_local

    if backend is Backend.sentence_transformers:
        return [
            "(any label: sentence-transformers models output their sentence embedding; "
            "the output_layers value names the output folder, as in Ducho)"
        ]
    if backend is Backend.transformers:
        from ducho_fast.exporters.hf import list_layers

        return list_layers(model, trust)
    cwd = Path.cwd()
    if backend is Backend.tensorflow:
        from ducho_fast.exporters.tf import keras_layer_names

        return keras_layer_names(_layers_spec(model, "tensorflow", None, trust, cwd))
    from ducho_fast.exporters.layers import torch_layer_names
    from ducho_fast.exporters.pt import load_model

    if model.isupper() and find_local(model, cwd, cwd) is None:
        from ducho_fast.exporters.pt_audio import bundle_layer_names

        return bundle_layer_names(model)
    module, _ = load_model(_layers_spec(model, "torch", architecture, trust, cwd, kwargs))
    return torch_layer_names(module)


def _layers_spec(
    model: str,
    backend: str,
    architecture: str | None,
    trust: bool,
    cwd: Path,
    kwargs: dict[str, Any] | None = None,
) -> ModelSpec:
    """A config entry for listing layers: no weights are downloaded."""
    from ducho_fast.config.load import find_local
    from ducho_fast.config.model import ModelSpec

    return ModelSpec(
        modality="visual",
        origin="items",
        key_path="layers",
        model_name=model,
        backend=backend,
        backend_dir=backend,
        output_layers=(),
        batch_size=1,
        weights="none",
        architecture=architecture,
        architecture_kwargs=kwargs or {},
        trust=trust,
        local_path=find_local(model, cwd, cwd),
    )


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory in the model store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest.")] = False,
) -> None:
    """Print an artifact's manifest: source, layers, inputs, preprocessing, parity."""
    from ducho_fast.artifact import load_artifact

    with _errors():
        manifest = load_artifact(artifact).manifest
    if as_json:
        out.print_json(json.dumps(manifest, default=str))
        return
    src = manifest["source"]
    out.print(
        f"[bold]{escape(manifest['slug'])}[/]  ({manifest['modality']}, {manifest['precision']}, "
        f"opset {manifest['opset']})",
        markup=True,
    )
    tower = f", {src['tower']} tower" if src.get("tower") else ""
    out.print(
        f"source: {src['backend']} {src['model_name']}{tower}  [{src.get('framework', '')}]",
        markup=False,
    )
    for o in manifest["outputs"]:
        kind = (
            "per token" if o.get("per_token") else "per frame" if o.get("per_frame") else "per item"
        )
        out.print(f"layer {o['layer']!s:>20}: dim {o['dim']} ({kind}) -> output '{o['name']}'")
    out.print(
        "inputs: " + ", ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in manifest["inputs"])
    )
    out.print(f"preprocessing: {json.dumps(manifest['preprocessing'])}")
    parity = manifest["parity"]
    ran = f", run with {parity['provider']}" if parity.get("provider") else ""  # older exports
    out.print(
        f"parity vs {parity['reference']} on {parity['samples']} samples{ran}: "
        f"{'passed' if parity['passed'] else 'FAILED'}",
        soft_wrap=True,
    )
    for layer, r in parity["layers"].items():
        out.print(
            f"  {layer}: min cosine {r['min_cosine']:.7f}, max rel diff {r['max_rel_diff']:.2e}"
        )


@app.command()
def doctor(
    require_cuda: Annotated[
        bool,
        typer.Option(
            envvar="DUCHO_FAST_REQUIRE_CUDA",
            help="Fail unless a CUDA session really runs (the CUDA image's health check).",
        ),
    ] = False,
) -> None:
    """Versions, execution providers that really work, and the CPU quota.

    Exits 1 when the install is broken (both onnxruntime packages),
    or when CUDA is required and a real session does not run on it.
    """
    from ducho_fast.doctor import report

    health = report()
    for line in health.lines:
        out.print(line, highlight=False)
    failures = health.failures(require_cuda)
    for failure in failures:
        err.print(f"[bold red]error:[/] {escape(failure)}", markup=True, soft_wrap=True)
    if failures:
        raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        out.print(f"ducho-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    app()
