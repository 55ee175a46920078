"""What the CLI does, callable: ``export(config)``, ``extract(config)``, ``load(artifact)``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ducho_fast.artifact import MANIFEST_FILE, MODEL_FILE, find_artifact, slug_for
from ducho_fast.config import Config, Job, ModelSpec, load_config
from ducho_fast.config.model import FusionSpec
from ducho_fast.data.pairs import paired_items
from ducho_fast.data.sources import check_inputs, job_items
from ducho_fast.errors import ConfigError, DataError
from ducho_fast.fusion import (
    FusionRun,
    check_fusion_dims,
    graph_name,
    section_fusion,
    tower_fusion,
)
from ducho_fast.model_runs import Models, RunContext, run_models
from ducho_fast.outputs.matrix import read_id_order
from ducho_fast.preflight import (
    check_distinct_folders,
    check_layers,
    check_matrix_layers,
    check_output_folders,
    lock_output_folders,
)
from ducho_fast.progress import ProgressFactory, Status
from ducho_fast.report import (
    ERRORS_FILE,
    ExtractReport,
    ModelRun,
    matrix_of,
    save_errors,
    save_fusion_errors,
    save_resolved,
)
from ducho_fast.runtime.session import (
    PendingSession,
    batch_lanes,
    for_artifact,
    lanes_advice,
    spins,
)
from ducho_fast.runtime.shard import Shard

if TYPE_CHECKING:
    from ducho_fast.runtime.raydata import RayOptions

__all__ = [
    "ERRORS_FILE",
    "ConfigLike",
    "ExtractReport",
    "ModelRun",
    "as_config",
    "export",
    "export_steps",
    "extract",
    "fuse",
]

ConfigLike = str | Path | dict[str, Any] | Config

ENGINES = ("local", "ray")


def as_config(
    config: ConfigLike, overrides: Iterable[str] | None = (), *, name: str | None = None
) -> Config:
    """``config`` as a :class:`Config`, ``overrides`` applied; ``name``: what errors call a
    mapping (the file it was read from)."""
    if not isinstance(config, Config):
        return load_config(config, overrides, name=name)
    extra = list(overrides) if overrides is not None else []
    if extra:
        raise ConfigError(
            f"overrides {extra} cannot apply to a Config, which is already resolved: "
            "pass the YAML path or the mapping with them, or the Config without them."
        )
    return config


# -- export -------------------------------------------------------------------------------


def export(config: ConfigLike, overrides: Iterable[str] = (), *, force: bool = False) -> list[Any]:
    """Export every model the config names to a parity-checked artifact in the store.

    Returns one ``ExportResult`` per model entry; artifacts already exported and valid are
    reused unless ``force``.
    """
    return [r for _, run in export_steps(config, overrides, force=force) for r in run()]


def export_steps(
    config: ConfigLike, overrides: Iterable[str] = (), *, force: bool = False
) -> Iterator[tuple[ModelSpec, Callable[[], list[Any]]]]:
    """:func:`export` model by model: each model entry, and a call that exports it (its
    ``ExportResult``s), so a caller can say which model it is on before the minutes a large
    one takes (the CLI does)."""
    from ducho_fast.exporters import export_model  # heavy frameworks load only here

    cfg = as_config(config, overrides)
    for spec in cfg.models():
        yield spec, partial(export_model, spec, cfg.store, force=force)


# -- extract -------------------------------------------------------------------------------


def extract(
    config: ConfigLike,
    overrides: Iterable[str] = (),
    *,
    progress: ProgressFactory | None = None,
    shard: Shard | str | None = None,
    engine: str = "local",
    ray: RayOptions | None = None,
    status: Status | None = None,
) -> ExtractReport:
    """Run every job of the config on its exported artifacts and write its layouts.

    Items complete from an earlier run with the same settings are skipped
    (``output.resume``); everything that can be checked is checked before any work starts.

    ``shard`` (``"i/N"``): embed only this job-array task's part of every job's items (see
    :mod:`ducho_fast.runtime.shard`). Matrices, fusions and complete manifests need every
    item: a plain run after all shards have finished writes them, reusing every item.

    ``engine="ray"`` runs each model across a Ray cluster (``ray``: where, and how many
    actors) instead of in this process; the files are the same.

    ``progress``: called with a label and a total for each model run, fusion and matrix with
    work to do, gives a context manager yielding a callback that advances it by a count.

    ``status``: called with what a long step that has no progress of its own is doing, in a
    few words (``reading reviews.tsv: 512 of 1,210 MB, 42%``, as a text table is read), and
    with None when that step is done.
    """
    cfg = as_config(config, overrides)
    part = _shard(shard, cfg)
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}.")
    if engine == "ray":
        from ducho_fast.runtime.raydata import RayOptions, import_ray

        import_ray()  # the install hint before any work
        ray = ray or RayOptions()
    else:
        ray = None  # options for the Ray engine mean nothing to the local one
    check_distinct_folders(cfg)
    check_inputs(cfg.jobs)  # first: reads only the start of each input, and a typo needs no session
    ahead = _session_ahead(cfg) if ray is None else None
    artifacts = {graph_name(g): find_artifact(cfg.store, g) for g in cfg.graphs()}
    for graph in cfg.graphs():
        check_layers(graph, artifacts[graph_name(graph)])
    check_fusion_dims(cfg, artifacts)
    check_matrix_layers(cfg, artifacts)
    check_output_folders(cfg, artifacts)
    if ray is not None:
        from ducho_fast.runtime.raydata import join_cluster

        join_cluster(ray)  # a wrong address or a missing token: before any folder is touched
    id_order = _id_order(cfg)
    ahead_list = [ahead] if ahead else []
    ctx = RunContext(cfg, artifacts, id_order, progress, part, ray, ahead_list, status)
    with lock_output_folders(cfg, part):  # another run writing them: before any work
        return _extract(ctx)


def _extract(ctx: RunContext) -> ExtractReport:
    cfg, part, ray, id_order = ctx.cfg, ctx.shard, ctx.ray, ctx.id_order
    report = ExtractReport(shard=part)
    advice = lanes_advice(cfg.runtime) if ray is None else None
    if advice:
        report.warnings.append(advice)
    for job in cfg.jobs:
        save_resolved(cfg, job)
        if job.modality == "visual_textual":
            _run_pairs(ctx, job, report)
        else:
            models = Models.of(ctx, job, job.models)
            items = job_items(job, models.keep(ctx), ctx.status, defer_texts=True)
            report.input_errors[job.name] = _own_inputs(items.bad, part)
            report.ignored_files[job.name] = _own_inputs(items.ignored, part)
            report.ignored_folders[job.name] = _own_inputs(items.folders, part)
            report.runs += run_models(ctx, job, models, items.good, report, items.texts)
        save_errors(job, report)
    if part is None:
        fusions = [_section_fusion(cfg, f, id_order, report, ctx.progress) for f in cfg.fusions]
        report.fusions += fusions
    return report


def _session_ahead(cfg: Config) -> PendingSession | None:
    """The first model's session, created in the background while the run checks its
    artifacts and inputs and reads its first items (about 0.2 s of 3-7 s for 512-1024 texts
    here). Only the first: each session holds its weights, and the later ones are made as
    their turn comes."""
    job = cfg.jobs[0] if cfg.jobs else None
    if job is None or not job.models or job.modality == "visual_textual":
        return None
    spec = job.models[0]
    folder = cfg.store / slug_for(spec)
    model = folder / MODEL_FILE
    try:  # the options its session takes (see for_artifact): a few fields of a small file
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None  # find_artifact says what is missing or broken
    if not model.is_file() or not isinstance(manifest, dict):
        return None
    options = for_artifact(cfg.runtime, manifest)
    spinning = spins(options, spec.modality, readers=True)
    lanes = batch_lanes(options)
    return PendingSession(model, options, spinning=spinning, lanes=lanes)


def _shard(shard: Shard | str | None, cfg: Config) -> Shard | None:
    part = Shard.parse(shard) if isinstance(shard, str) else shard
    if part is None or part.count == 1:
        return None
    if not cfg.output.resume:
        raise ConfigError(
            f"--shard {part} with --fresh (output.resume: false): each task would delete the "
            "features the other tasks write. Empty the output folders once before starting "
            "the job array instead."
        )
    return part


def _own_inputs(found: list[Any], part: Shard | None) -> list[Any]:
    """Bad inputs and ignored files belong to the job, not to a window: shard 0 reports them."""
    return found if part is None or part.index == 0 else []


def fuse(
    config: ConfigLike, overrides: Iterable[str] = (), *, progress: ProgressFactory | None = None
) -> list[FusionRun]:
    """Run the config's fusions over features already extracted; no model runs.

    ``progress``: called with a label and a total for each fusion and matrix with work to
    do, gives a context manager yielding a callback to advance it (as ``extract``'s).
    """
    cfg = as_config(config, overrides)
    check_distinct_folders(cfg)
    id_order = _id_order(cfg)
    report = ExtractReport()
    runs = [
        tower_fusion(job, spec, cfg.output, progress=progress)
        for job in cfg.jobs
        for spec in job.models
        if spec.fusion
    ]
    for run in runs:
        save_fusion_errors(run)
        _fusion_matrices(cfg, run, id_order, report, progress)
    runs += [_section_fusion(cfg, f, id_order, report, progress) for f in cfg.fusions]
    if report.matrix_errors:
        raise DataError("\n".join(report.matrix_errors))
    return runs


def _run_pairs(ctx: RunContext, job: Job, report: ExtractReport) -> None:
    """A two-tower block: each tower over the paired ids, then the fusion if asked."""
    pairs = paired_items(job)
    report.input_errors[job.name] = _own_inputs(pairs.bad, ctx.shard)
    report.unpaired[job.name] = _own_inputs(pairs.unpaired, ctx.shard)
    report.ignored_files[job.name] = _own_inputs(pairs.ignored, ctx.shard)
    report.ignored_folders[job.name] = _own_inputs(pairs.folders, ctx.shard)
    for spec in job.models:
        image, text = spec.towers()
        runs = [
            *run_models(ctx, job, Models.of(ctx, job, [image]), pairs.images, report),
            *run_models(ctx, job, Models.of(ctx, job, [text]), pairs.texts, report),
        ]
        report.runs += runs
        if spec.fusion is None or ctx.shard is not None:
            continue
        failed = {e.item_id for run in runs for e in run.result.errors}
        ids = [i.item_id for i in pairs.images if i.item_id not in failed]
        fusion = tower_fusion(job, spec, ctx.cfg.output, ids=ids, progress=ctx.progress)
        save_fusion_errors(fusion)
        _fusion_matrices(ctx.cfg, fusion, ctx.id_order, report, ctx.progress)
        report.fusions.append(fusion)


def _section_fusion(
    cfg: Config,
    fusion: FusionSpec,
    id_order: list[str] | None,
    report: ExtractReport,
    progress: ProgressFactory | None = None,
) -> FusionRun:
    run = section_fusion(cfg, fusion, progress)
    save_fusion_errors(run)
    _fusion_matrices(cfg, run, id_order, report, progress)
    return run


def _fusion_matrices(
    cfg: Config,
    run: FusionRun,
    id_order: list[str] | None,
    report: ExtractReport,
    progress: ProgressFactory | None = None,
) -> None:
    if not cfg.output.matrix:
        return
    for res in run.results:
        assert res.matrix_dir is not None
        label = f"{run.key} {run.mode} matrix ({res.output.name})"
        matrix = matrix_of(
            res.output, res.matrix_dir, "fused", res.ids, cfg, id_order, report, progress, label
        )
        if matrix is not None:
            res.matrix = matrix


def _id_order(cfg: Config) -> list[str] | None:
    if cfg.output.id_order is None or not cfg.output.matrix:
        return None
    return read_id_order(cfg.output.id_order)
