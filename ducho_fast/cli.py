"""The ``ducho-fast`` command: export, extract, layers, inspect, doctor.

Importing this module never imports torch, TensorFlow or transformers: ``export`` and
``layers`` load the exporters inside the command.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from ducho_fast import __version__
from ducho_fast.console import (
    Watched,
    err,
    out,
    print_bench,
    print_bench_round,
    print_exported,
    print_fusions,
    print_report,
)
from ducho_fast.errors import DuchoError

if TYPE_CHECKING:
    from ducho_fast.config.model import ModelSpec

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    help="Export feature extractors to ONNX and extract multimodal features with ONNX Runtime.",
)

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
# What a second signal, which ends the process at once, leaves (None: the command's STOPPED_).
QUIT_BENCH = (
    "Nothing of the config's outputs was touched; bench's work folder (.ducho-fast-bench-*, "
    "beside the first job's output folder, or in --work) is left: remove it."
)
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

ConfigArg = Annotated[
    Path,
    typer.Argument(
        metavar="CONFIG",
        help="Ducho-style YAML config; - reads it from standard input.",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a key: a.b.c=VALUE (YAML-typed; list indices allowed; repeat for more).",
    ),
]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Backend(str, Enum):
    torch = "torch"
    tensorflow = "tensorflow"
    transformers = "transformers"
    sentence_transformers = "sentence_transformers"


def _quiet_frameworks() -> None:
    """Keep framework chatter (download bars, tracing notes) out of the command's output."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")


# The options of ``ducho-fast`` itself (:func:`_main`), which a command's arguments may hold.
_MAIN_OPTIONS = frozenset({"-v", "--verbose", "--version"})


def _overrides(ctx: typer.Context, sets: list[str] | None) -> list[str]:
    """``--set`` values, then Ducho's own ``--a.b.c=VALUE`` arguments."""
    extra = list(ctx.args)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    main_options = [a for a in bad if a in _MAIN_OPTIONS]
    if main_options:
        raise typer.BadParameter(
            f"{main_options[0]} is an option of ducho-fast itself, not of the command: put it "
            f"before the command, as in ducho-fast {main_options[0]} {ctx.info_name} CONFIG."
        )
    if bad:
        raise typer.BadParameter(
            f"unexpected argument(s) {bad}; an override is --set a.b.c=VALUE or --a.b.c=VALUE "
            "(one argument, with its '=')"
        )
    return [*(sets or []), *extra]


@contextmanager
def _errors(stopped: str | None = None, quit_now: str | None = None) -> Iterator[None]:
    """A DuchoError as a message and exit 1. With ``stopped`` (what a stopped run leaves and
    how to go on), SIGTERM stops the command as Ctrl-C does, and both end it with that
    message and exit 128 + the signal's number (130, 143); a second signal while it stops
    ends the process at once, saying ``quit_now`` (default: ``stopped``) (see
    :func:`_stop_on_signals`)."""
    caught: list[int] = []
    stopping = _stop_on_signals(caught, quit_now or stopped or "") if stopped else nullcontext()
    with stopping:
        try:
            yield
        except DuchoError as e:
            message = f"[bold red]error:[/] {escape(str(e))}"
            err.print(message, highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from e
        except KeyboardInterrupt as e:
            if stopped is None:
                raise
            number = caught[0] if caught else signal.SIGINT  # raised by the code, not a signal
            err.print(
                f"\nstopped by {signal.Signals(number).name}. {stopped}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            raise typer.Exit(128 + number) from e


@contextmanager
def _watched(progress: bool, doing: str, every: float | None) -> Iterator[Watched | None]:
    """What gives a command's work its progress bars (None with ``--no-progress``); where
    it shows no bar for a while, it says the command is still at work (:class:`Watched`)."""
    if not progress:
        yield None
        return
    with Watched(doing, every) as watched:
        yield watched


@contextmanager
def _stop_on_signals(caught: list[int], quit_now: str) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM (a batch scheduler's stop, ``kill``) raise
    KeyboardInterrupt in the main thread, so that a run stops in order: once the main thread's
    batch ends, the other lanes finish theirs and the writer saves every feature queued
    (``Pipeline.run``). That can take a while (a large batch, a reader stuck on a network
    file system), so the first signal says so at once. A second signal, of either kind, ends
    the process at once (``os._exit``): features already written are complete (each is
    renamed into place whole), the batches under way are lost, and the next run removes
    what was half written. Before, a second Ctrl-C broke into the stop's own clean-up and the
    process could end in ONNX Runtime's "terminate called" abort (SIGABRT) or hang on a
    thread. The first signal's number goes into ``caught``. A signal that was ignored when
    the command began (SIGINT in a background job, ``nohup``'s SIGTERM...) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread sets handlers
        return

    def stop(number: int, _: Any) -> None:
        name = signal.Signals(number).name
        if caught:
            _end_now(name, 128 + number, quit_now)
        caught.append(number)
        err.print(
            f"\n{name}: stopping once the work under way is done; Ctrl-C or SIGTERM again "
            "stops at once.",
            highlight=False,
            soft_wrap=True,
        )
        raise KeyboardInterrupt

    taken = [
        s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN
    ]
    previous = {s: signal.signal(s, stop) for s in taken}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _end_now(name: str, code: int, quit_now: str) -> None:
    """End the process at once, after saying what it leaves: no clean-up, no thread joined."""
    try:
        err.show_cursor(True)  # a progress bar hides it
        err.print(
            f"\nstopped at once by a second {name}. {quit_now}", highlight=False, soft_wrap=True
        )
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


ProgressEveryOpt = Annotated[
    float | None,
    typer.Option(
        min=1.0,
        metavar="SECONDS",
        envvar="DUCHO_FAST_PROGRESS_EVERY",
        help="Where stderr is not a terminal (a batch job's log): seconds between progress "
        "lines, and between the lines saying the command is still at work  [default: 30]",
        show_default=False,
    ),
]


@app.command(
    context_settings=_EXTRA, short_help="Export CONFIG's models to parity-checked ONNX artifacts."
)
def export(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Export again even if valid.")] = False,
    progress_every: ProgressEveryOpt = None,
) -> None:
    """Export every model of CONFIG to a parity-checked ONNX artifact in the model store."""
    from ducho_fast.api import export_steps

    _quiet_frameworks()
    with _errors(stopped=STOPPED_EXPORT):
        # Saying which model is being worked on (loading, converting and checking a large
        # one takes minutes), and each one's line when it is done: those lines stay on screen
        # (and in a log) if a later model fails.
        # While one is: a spinner on a terminal, a line every 30 s in a log (:class:`Watched`).
        for spec, run in export_steps(config, _overrides(ctx, set_), force=force):
            model = f"{spec.key_path} {Path(spec.model_dir).name}"
            err.print(f"{model}: exporting...", highlight=False, soft_wrap=True)
            with Watched(f"{model}: exporting", progress_every):
                results = run()
            for r in results:
                print_exported(r)


@app.command(
    context_settings=_EXTRA, short_help="Extract CONFIG's features with its exported artifacts."
)
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
            metavar="INDEX/COUNT",
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
            metavar="HOST:PORT",
            help="A running Ray cluster to join from one of its nodes: HOST:PORT (port 6379 "
            "by default) or auto. Not ray:// (Ray Data does not run through Ray Client).",
        ),
    ] = None,
    ray_actors: Annotated[
        int,
        typer.Option(
            min=0, metavar="N", help="Model actors per model (0: one per GPU on CUDA, else one)."
        ),
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
    doing = "extract: checking inputs, artifacts and outputs"
    with _errors(stopped=STOPPED_EXTRACT), _watched(progress, doing, progress_every) as shown:
        report = ducho_fast.extract(
            config,
            overrides,
            progress=shown.progress if shown else None,
            shard=shard,
            engine=engine.value,
            ray=ray,
            status=shown.status if shown else None,
        )
    print_report(report)
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


@app.command(
    context_settings=_EXTRA,
    short_help="Fuse features CONFIG has extracted, without running models.",
)
def fuse(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    progress_every: ProgressEveryOpt = None,
) -> None:
    """Fuse features CONFIG has already extracted (its fusion keys), without running models."""
    import ducho_fast

    doing = "fuse: reading features"
    with _errors(stopped=STOPPED_FUSE), _watched(progress, doing, progress_every) as shown:
        runs = ducho_fast.fuse(
            config, _overrides(ctx, set_), progress=shown.progress if shown else None
        )
    print_fusions(runs)
    if not runs:
        err.print("nothing to fuse: the config has no 'fusion' keys.")
    failed = sum(len(res.errors) for run in runs for res in run.results)
    if failed:
        err.print(
            f"[yellow]{failed} item(s) failed to fuse; see ducho-fast.errors.tsv.[/]", markup=True
        )
        raise typer.Exit(ITEMS_FAILED_EXIT)


@app.command(
    context_settings=_EXTRA,
    short_help="Time extract on a sample of CONFIG's data, against the sessions.",
)
def bench(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    items: Annotated[
        int,
        typer.Option(min=1, metavar="N", help="The sample: the first that many items of each job."),
    ] = 256,
    repeats: Annotated[int, typer.Option(min=1, metavar="N", help="Timed rounds of each way.")] = 3,
    work: Annotated[
        Path | None,
        typer.Option(
            metavar="FOLDER",
            help="Where the sample's features go, in a folder removed at the end (default: "
            "beside the first job's output folder, on the disk a real run writes to); made if "
            "it does not exist, and then removed too.",
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
            metavar="KEY=VALUE",
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
    with _errors(stopped=STOPPED_BENCH, quit_now=QUIT_BENCH):
        report = run_bench(
            config,
            _overrides(ctx, set_),
            items=items,
            repeats=repeats,
            work=work,
            source=source,
            variants=vs or (),
            on_run=print_bench,
            on_round=print_bench_round,
        )
    for reason in report.skipped:
        err.print(f"not timed: {reason}", highlight=False, soft_wrap=True)
    if not report.runs and not report.skipped:
        err.print("nothing to time: the config has no model jobs.")
    if as_json:
        runs = [r.as_dict() for r in report.runs]
        out.print(json.dumps({"runs": runs, "skipped": report.skipped}), soft_wrap=True)


@app.command()
def layers(
    backend: Annotated[Backend, typer.Argument(metavar="BACKEND", help="Source framework.")],
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model name or local path.")],
    architecture: Annotated[
        str | None, typer.Option(metavar="NAME", help="For a state-dict file.")
    ] = None,
    architecture_kwargs: Annotated[
        str | None,
        typer.Option(
            metavar="JSON",
            help='The architecture\'s arguments, as JSON: \'{"model_name": "b0"}\'.',
        ),
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
    from ducho_fast.config.load import check_name, find_local
    from ducho_fast.config.paths import working_folder

    check_name(model, "the MODEL of `ducho-fast layers`")
    if backend is Backend.sentence_transformers:
        return [
            "(any label: sentence-transformers models output their sentence embedding; "
            "the output_layers value names the output folder, as in Ducho)"
        ]
    if backend is Backend.transformers:
        from ducho_fast.exporters.hf import list_layers

        return list_layers(model, trust)
    cwd = working_folder()
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


@app.command(short_help="Print an artifact's manifest.")
def inspect(
    artifact: Annotated[
        Path, typer.Argument(metavar="ARTIFACT", help="Artifact directory in the model store.")
    ],
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


@app.command(short_help="Versions, working execution providers, the CPU quota.")
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
        out.print(line, highlight=False, soft_wrap=True)
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
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show log messages of level INFO.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    app()
