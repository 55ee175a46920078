"""What the ``ducho-fast`` command prints: progress (bars on a terminal, lines in a log) and
the reports of export, extract, fuse and bench."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Markup only where a call asks for it: paths, ids, layer lists ("[avgpool]") and error
# messages ("[ducho, matrix]") hold square brackets that rich would take for tags.
err = Console(stderr=True, markup=False)
out = Console(markup=False)


def _precision(precision: str) -> str:
    return "" if precision == "fp32" else f"{precision}, "


def _rel(path: Path) -> str:
    """``path`` relative to the current folder where it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_exported(r: Any) -> None:
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


@contextmanager
def progress_display(label: str, total: int, every: float | None = None) -> Iterator[Any]:
    if not err.is_terminal:
        lines = ProgressLines(label, total, PROGRESS_LINE_SECONDS if every is None else every)
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


class ProgressLines:
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
                f"about {clock(left)} left"
            )

    def stalled(self) -> None:
        """A line if neither a line nor an item came for ``every`` seconds: how long nothing
        was done. Items still coming: the next one's tick prints the rate."""
        with self._lock:
            now = time.monotonic()
            quiet = now - max(self._last, self._last_tick)
            if quiet < self._every or self._done >= self._total:
                return
            self._last = now
            if self._done:
                share = 100 * self._done / self._total
                since = clock(now - self._last_tick)
                self._print(f"{self._done}/{self._total} ({share:.0f}%), no item done for {since}")
            else:
                self._print(f"0/{self._total}, no item done yet, {clock(now - self._start)} in")

    def _watching(self) -> None:
        while not self._closed.wait(self._every):
            self.stalled()

    def _print(self, text: str) -> None:
        err.print(f"{self._label}: {text}", highlight=False, soft_wrap=True)


# On a terminal, how long a run may show no bar before a spinner says it is still at work.
QUIET_SPINNER_SECONDS = 2.0


class Watched:
    """A command's progress factory (:func:`progress_display`) that also speaks where the
    command shows no bar for a while: before its first (checking its artifacts, listing a
    folder of a million files, checking what an earlier run wrote), between two, after its
    last (saving records): a spinner on a terminal after ``QUIET_SPINNER_SECONDS``, a line
    every ``every`` seconds in a log. A log that goes quiet is a process that stopped.

    Used as a context manager around the command's work; bars come from :meth:`progress`."""

    def __init__(self, doing: str, every: float | None = None) -> None:
        self._doing = doing  # what the command does between bars, in a few words
        self._every = PROGRESS_LINE_SECONDS if every is None else every
        self._terminal = err.is_terminal
        self._bars = 0
        self._quiet_since = self._said = time.monotonic()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._spinner: Any = None
        self._detail: str | None = None  # what the work is doing now, from :meth:`status`
        self._watch = threading.Thread(target=self._watching, name="ducho-quiet", daemon=True)

    def __enter__(self) -> Watched:
        if self._terminal or self._every > 0:  # 0: a line at every tick, no watch (tests)
            self._watch.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._closed.set()
        if self._watch.is_alive():
            self._watch.join()
        with self._lock:
            self._stop_spinner()

    @contextmanager
    def progress(self, label: str, total: int) -> Iterator[Any]:
        with self._lock:
            self._bars += 1
            self._stop_spinner()  # one live display at a time on a terminal
        try:
            with progress_display(label, total, self._every) as tick:
                yield tick
        finally:
            with self._lock:
                self._bars -= 1
                self._quiet_since = self._said = time.monotonic()

    def status(self, detail: str | None) -> None:
        """What the work is doing now (how far a large table's read got), said in the lines
        and the spinner while no bar is shown; None once that step is done."""
        with self._lock:
            self._detail = detail

    def quiet(self) -> None:
        """Say so if no bar was shown for long enough (the watcher's step)."""
        with self._lock:
            if self._bars or self._closed.is_set():
                return
            now = time.monotonic()
            since = now - self._quiet_since
            detail = f" ({self._detail})" if self._detail else ""
            text = f"{self._doing}{detail}, {clock(since)} in"
            if self._terminal:
                if since < QUIET_SPINNER_SECONDS:
                    return
                if self._spinner is None:
                    self._spinner = err.status(text)
                    self._spinner.start()
                else:
                    self._spinner.update(text)
            elif now - self._said >= self._every:
                err.print(text, highlight=False, soft_wrap=True)
                self._said = now

    def _stop_spinner(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def _watching(self) -> None:
        step = 0.5 if self._terminal else min(self._every, 0.5)
        while not self._closed.wait(step):
            self.quiet()


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def print_report(report: Any) -> None:
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
    print_fusions(report.fusions)
    for message in [*report.matrix_errors, *report.warnings]:
        err.print(message, highlight=False, soft_wrap=True)


def _ignored(job: str, files: list[Path], kinds: int = 4) -> str:
    """What a job's input folder holds that is not read, by kind (hidden, or by suffix: a
    .heic or .m4a folder learns at once that its format is not one read), with what is."""
    from ducho_fast.data.audio.audio import audio_suffixes, ffmpeg_hint  # numpy and libsndfile:
    from ducho_fast.data.visual.images import heif_hint, image_suffixes  # not every command's

    audio = job.startswith("audio")
    kind, suffixes = ("audio", audio_suffixes()) if audio else ("image", image_suffixes())
    groups: dict[str, list[Path]] = {}
    for file in files:
        label = "hidden" if file.name.startswith(".") else file.suffix.lower() or "unsuffixed"
        groups.setdefault(label, []).append(file)
    ranked = sorted(groups.items(), key=lambda group: -len(group[1]))
    parts = [f"{len(group)} {label} (e.g. {group[0].name})" for label, group in ranked[:kinds]]
    if len(ranked) > kinds:
        parts.append(f"{sum(len(group) for _, group in ranked[kinds:])} of other kinds")
    hint = (ffmpeg_hint if audio else heif_hint)([file.name for file in files])
    return (
        f"{job}: {len(files)} file(s) ignored: {', '.join(parts)}. {kind.capitalize()} files "
        f"are read from {', '.join(sorted(suffixes))}.{hint}"
    )


def _print_inputs(report: Any) -> None:
    for job, bad in report.input_errors.items():
        if bad:
            err.print(f"{job}: {len(bad)} input item(s) skipped (bad or duplicate ids).")
    for job, files in report.ignored_files.items():
        if files:
            err.print(_ignored(job, files), highlight=False, soft_wrap=True)
    for job, folders in report.ignored_folders.items():
        if folders:
            err.print(
                f"{job}: {len(folders)} subfolder(s) not read (only the files directly in "
                f"'input_path' are, as in Ducho), e.g. {folders[0].name}/; to embed their files, "
                "run once per subfolder or move the files up.",
                highlight=False,
                soft_wrap=True,
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

# Writes after the model's last batch are said from this long: a slow file system's.
LAST_WRITES = 0.1

# A first batch that ran this much longer than the later ones is said (a session's warm-up:
# on the CPU here 0.03-0.13 s, EfficientNet-Lite0 and MiniLM).
WARM_UP_SHOWN = 0.5


def _print_timing(result: Any) -> None:
    """Where the run's time went, when the local engine measured it."""
    t = result.timing
    if t is None or not result.written or result.seconds <= 0:
        return
    lanes = f", {t.lanes} batches at once" if t.lanes > 1 else ""
    writers = _writers_in_words("the", t.writers, t.writers_added)
    last = (
        f", then {t.last_writes:.1f}s for the last writes" if t.last_writes >= LAST_WRITES else ""
    )
    warm = (
        f", which ran {t.warm_up:.1f}s longer than the later ones"
        if t.warm_up is not None and t.warm_up >= WARM_UP_SHOWN
        else ""
    )
    out.print(
        f"  model busy {t.model / result.seconds:.0%} of {result.seconds:.1f}s{lanes} (first "
        f"batch after {t.first_batch:.1f}s{warm}); then waited {t.inputs:.1f}s for inputs, "
        f"{t.writer:.1f}s for the writer{last}; {writers} used {t.writer_cpu:.1f}s of CPU",
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


def print_fusions(runs: list[Any]) -> None:
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


def print_bench(run: Any) -> None:
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
        f"batch ran (the session made, the first window read){_bench_warm_up(run)}; "
        f"then its model waited "
        f"{run.waiting_for_inputs:.2f} for inputs, {run.waiting_for_writer:.2f} for "
        f"{_writers_in_words('its', run.writers, run.writers_added)}; the last writes ended "
        f"{run.last_writes:.2f} after its last batch",
        f"  whole job      {run.job_items:,} items in about {clock(run.job_seconds)} at this pace",
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
    for hint in (_cpu_shared(run), _bf16_hint(run)):
        if hint:
            lines.insert(-1, hint)
    for variant in run.variants:
        lines.insert(-1, _variant_line(variant, run))
    if run.sample_copied:
        lines.append(
            "  (the work folder's file system makes no links: the sample's files were copied "
            "there, and extract read the copies, which may read faster than the originals; "
            "--work on another disk reads them where they are)"
        )
    if run.start_up > 0.2 * run.extract_seconds and run.items < run.job_items:
        lines.append(
            "  (the start-up is much of this sample's time: a larger --items measures the pace "
            "after it better)"
        )
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


# bench explains an efficiency under this that the CPU time per item accounts for (the
# issue's target for extract against its session alone).
EFFICIENT = 0.9
JPEG_DECODE = "input.jpeg_decode="


def _cpu_shared(run: Any) -> str:
    """Why extract on CPUs falls short of its model alone where the CPU time per item says
    it: the reading, decoding and writing run on the CPUs the model runs on."""
    bound = run.cpu_bound
    if bound is None or bound >= EFFICIENT:
        return ""
    if run.efficiency >= EFFICIENT:
        return ""
    model, whole = run.cpu_ms["session"], run.cpu_ms["extract"]
    cpus = f"the same {run.cpus} CPUs" if run.cpus else "the same CPUs"
    reduced = (
        " --vs input.jpeg_decode=reduced times JPEGs decoded at a smaller scale (the features "
        'change a little: the README\'s "Reduced JPEG decoding").'
        if run.jpegs_in_full and not any(v.setting.startswith(JPEG_DECODE) for v in run.variants)
        else ""
    )
    return (
        f"  why            the work beside the model (reading, decoding or tokenizing, writing) "
        f"took {whole - model:.2f} ms of CPU an item against the model's {model:.2f}, on {cpus}: "
        f"that alone holds extract to about {bound:.2f} of the session alone.{reduced}"
    )


# bench offers bf16 where the model takes this share of extract's CPU or more: where the
# work around it takes most, a faster model shortens the run little.
BF16_WORTH = 0.5


def _bf16_hint(run: Any) -> str:
    """Where an fp32 model bounds extract on ONNX Runtime's CPU provider and this CPU has
    bfloat16 math (``BenchRun.bf16``): how to export it in bf16 and time that here."""
    if not run.bf16 or any(".precision=" in v.setting for v in run.variants):
        return ""
    bound = run.cpu_bound
    if bound is None or bound < BF16_WORTH:
        return ""
    model, whole = run.cpu_ms["session"], run.cpu_ms["extract"]
    key = f"{run.key_path}.precision=bf16"
    install = "pip install 'ducho-fast[openvino]', then " if run.bf16 == "install" else ""
    return (
        f"  bf16           the model took {model:.2f} ms of extract's {whole:.2f} ms of CPU an "
        f"item, and this CPU has bfloat16 math: {install}`ducho-fast export CONFIG --set {key}` "
        "exports it to run so (refused where its features move further from fp32's than "
        f"cosine 0.999, as EfficientNet-Lite0's did), and --vs {key} times it here. On a "
        "2-CPU Xeon with AMX, ResNet50 ran 3.3x its fp32 extract, all-MiniLM-L6-v2 2.6x and "
        'HuBERT 2.5x (the README\'s "Speed").'
    )


def _bench_warm_up(run: Any) -> str:
    """Bench's words for how much longer extract's first batch ran than its later ones;
    nothing where it did not, and what tells where no lane ran a second batch (a larger
    sample, where the job has more items)."""
    seconds = run.warm_up
    if seconds is None:
        larger = " (a larger --items tells)" if run.items < run.job_items else ""
        return (
            ", and no lane ran a second batch to tell how much longer the first ran than the "
            f"later ones{larger}"
        )
    return f", which ran {seconds:.2f} longer than the later ones" if seconds > 0 else ""


def _writers_in_words(owner: str, threads: int, added: int) -> str:
    """A run's writers in words (``owner``: "the", or "its" for bench's extract), and how many
    of them were added as they fell behind."""
    if threads <= 1:
        return "the writer"
    grown = f" ({added} added as they fell behind)" if added else ""
    return f"{owner} {threads} writer threads{grown}"


def print_bench_round(timed: Any) -> None:
    """One round of a model's timing, on stderr as it ends: what a long bench has measured
    so far (the report on stdout comes when the model's rounds are done)."""
    ways = ", ".join(f"{_way(name)} {rate:.1f}/s" for name, rate in timed.rates.items())
    err.print(
        f"  {timed.key_path}: round {timed.number}/{timed.rounds}: {ways}",
        highlight=False,
        soft_wrap=True,
    )


def _way(name: str) -> str:
    """A way of bench's rounds as the report names it: the session alone, a variant by its
    setting."""
    return "session alone" if name == "session" else name.removeprefix("extract ")


# bench says a variant's speed over the whole job where it differs this much from its speed
# on the sample (a start-up of another length: decoder processes start with each run).
JOB_SPEEDUP_SHOWN = 0.05


def _variant_line(variant: Any, run: Any) -> str:
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
        f"as configured (rounds {low:.2f}-{high:.2f}){_whole_job(variant, run)}; {features}"
    )


def _whole_job(variant: Any, run: Any) -> str:
    """A variant's speed over the job's items, where a start-up of another length makes it
    differ from its speed on the sample."""
    job, ranged = variant.job_speedup, variant.job_speedup_range
    if job is None or ranged is None or run.job_items <= run.items:
        return ""
    if abs(job - variant.speedup) < JOB_SPEEDUP_SHOWN:
        return ""
    return (
        f"; over the job's {run.job_items:,} items {job:.2f}x (rounds {ranged[0]:.2f}-"
        f"{ranged[1]:.2f}), its start-up and last writes, {variant.once:.2f} s, once against "
        f"{run.once:.2f} s"
    )
