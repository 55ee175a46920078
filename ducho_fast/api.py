"""What the CLI does, callable: ``export(config)``, ``extract(config)``, ``load(artifact)``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ducho_fast.artifact import (
    MANIFEST_FILE,
    MODEL_FILE,
    Artifact,
    find_artifact,
    slug_for,
    varies_per_item,
)
from ducho_fast.config import Config, Job, ModelSpec, load_config
from ducho_fast.config.model import FusionSpec, layer_label
from ducho_fast.data.items import Item, ItemError
from ducho_fast.data.pairs import paired_items
from ducho_fast.data.sources import (
    Loader,
    changed_files,
    check_inputs,
    job_items,
    loader_for,
    table_changed_after,
)
from ducho_fast.errors import ArtifactError, ConfigError, DataError
from ducho_fast.fusion import (
    FusionRun,
    check_fusion_dims,
    fused_dir,
    graph_name,
    section_fusion,
    tower_fusion,
)
from ducho_fast.outputs.atomic import write_text
from ducho_fast.outputs.ducho import DuchoWriter, layer_dir, layer_parts, output_root
from ducho_fast.outputs.errors_tsv import update_errors
from ducho_fast.outputs.lock import FolderLocks
from ducho_fast.outputs.manifest import OutputFolder, check_folder, digest, open_folder
from ducho_fast.outputs.matrix import (
    FILE_NAMES,
    MATRIX_DIR,
    MatrixResult,
    read_id_order,
    write_matrix,
)
from ducho_fast.outputs.texts import recorded_texts, save_texts, text_digest
from ducho_fast.outputs.unreadable import forget_unreadable, load_unreadable, save_unreadable
from ducho_fast.progress import ProgressFactory, shown
from ducho_fast.runtime.batcher import sorts_by_length, window_size
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.embedder import Embedder
from ducho_fast.runtime.pipeline import (
    Member,
    Pipeline,
    PipelineOptions,
    RunResult,
    shared_window,
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
    from ducho_fast.runtime.raydata import RayOptions, RayPipeline

ConfigLike = str | Path | dict[str, Any] | Config

RESOLVED_CONFIG = "ducho-fast.resolved.yml"
ENGINES = ("local", "ray")
ERRORS_FILE = "ducho-fast.errors.tsv"


def as_config(config: ConfigLike, overrides: Iterable[str] | None = ()) -> Config:
    if not isinstance(config, Config):
        return load_config(config, overrides)
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


# -- extract ------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """One model over one job's items."""

    job: str
    model: str
    layers: tuple[str, ...]
    provider: str
    result: RunResult
    output_dirs: list[Path] = field(default_factory=list)
    tower: str | None = None
    matrices: list[MatrixResult] = field(default_factory=list)
    changed: int = 0  # items embedded again: their input file or text changed since


@dataclass
class ExtractReport:
    runs: list[ModelRun] = field(default_factory=list)
    input_errors: dict[str, list[ItemError]] = field(default_factory=dict)
    ignored_files: dict[str, list[Path]] = field(default_factory=dict)
    unpaired: dict[str, list[ItemError]] = field(default_factory=dict)
    fusions: list[FusionRun] = field(default_factory=list)
    matrix_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shard: Shard | None = None  # a job array's task: matrices, fusions, manifests deferred

    @property
    def failed(self) -> int:
        """Items and matrices that could not be made; unpaired ids are reported, not failed."""
        return self.failed_items + len(self.matrix_errors)

    @property
    def failed_items(self) -> int:
        """Items that could not be embedded or fused, and input items with bad ids."""
        item_level = sum(len(r.result.errors) for r in self.runs)
        fused = sum(len(res.errors) for f in self.fusions for res in f.results)
        inputs = sum(len(v) for v in self.input_errors.values())
        return item_level + fused + inputs


@dataclass(frozen=True)
class _Context:
    """What every model run of one ``extract`` shares."""

    cfg: Config
    artifacts: dict[str, Artifact]
    id_order: list[str] | None
    progress: ProgressFactory | None
    shard: Shard | None = None
    ray: RayOptions | None = None  # extract --engine ray
    ahead: list[PendingSession] = field(default_factory=list)  # taken by the first embedder


def extract(
    config: ConfigLike,
    overrides: Iterable[str] = (),
    *,
    progress: ProgressFactory | None = None,
    shard: Shard | str | None = None,
    engine: str = "local",
    ray: RayOptions | None = None,
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
    _check_distinct_folders(cfg)
    check_inputs(cfg.jobs)  # first: reads only the start of each input, and a typo needs no session
    ahead = _session_ahead(cfg) if ray is None else None
    artifacts = {graph_name(g): find_artifact(cfg.store, g) for g in cfg.graphs()}
    for graph in cfg.graphs():
        _check_layers(graph, artifacts[graph_name(graph)])
    check_fusion_dims(cfg, artifacts)
    _check_matrix_layers(cfg, artifacts)
    _check_output_folders(cfg, artifacts)
    if ray is not None:
        from ducho_fast.runtime.raydata import join_cluster

        join_cluster(ray)  # a wrong address or a missing token: before any folder is touched
    id_order = _id_order(cfg)
    ctx = _Context(cfg, artifacts, id_order, progress, part, ray, [ahead] if ahead else [])
    with _lock_output_folders(cfg, part):  # another run writing them: before any work
        return _extract(ctx)


def _extract(ctx: _Context) -> ExtractReport:
    cfg, part, ray, id_order = ctx.cfg, ctx.shard, ctx.ray, ctx.id_order
    report = ExtractReport(shard=part)
    advice = lanes_advice(cfg.runtime) if ray is None else None
    if advice:
        report.warnings.append(advice)
    for job in cfg.jobs:
        _save_resolved(cfg, job)
        if job.modality == "visual_textual":
            _run_pairs(ctx, job, report)
        else:
            models = _Models.of(ctx, job, job.models)
            items = job_items(job, models.keep(ctx))
            report.input_errors[job.name] = _own_inputs(items.bad, part)
            report.ignored_files[job.name] = _own_inputs(items.ignored, part)
            report.runs += _run_models(ctx, job, models, items.good, report)
        _save_errors(job, report)
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
    spinning = spins(cfg.runtime, spec.modality, readers=True)
    lanes = batch_lanes(cfg.runtime)
    options = for_artifact(cfg.runtime, manifest)
    return PendingSession(model, options, spinning=spinning, lanes=lanes)


def _embedder(ctx: _Context, artifact: Artifact) -> Embedder:
    """A pipeline's embedder, on the session created ahead when it is this artifact's."""
    pending = ctx.ahead.pop() if ctx.ahead else None
    spinning = spins(ctx.cfg.runtime, artifact.modality, readers=True)
    lanes = batch_lanes(ctx.cfg.runtime)
    options = for_artifact(ctx.cfg.runtime, artifact.manifest)
    if pending is not None and not pending.serves(
        artifact.model_path, spinning=spinning, lanes=lanes, options=options
    ):
        pending = None
    return Embedder(artifact, ctx.cfg.runtime, readers=True, pending=pending, lanes=lanes)


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
    _check_distinct_folders(cfg)
    id_order = _id_order(cfg)
    report = ExtractReport()
    runs = [
        tower_fusion(job, spec, cfg.output, progress=progress)
        for job in cfg.jobs
        for spec in job.models
        if spec.fusion
    ]
    for run in runs:
        _save_fusion_errors(run)
        _fusion_matrices(cfg, run, id_order, report, progress)
    runs += [_section_fusion(cfg, f, id_order, report, progress) for f in cfg.fusions]
    if report.matrix_errors:
        raise DataError("\n".join(report.matrix_errors))
    return runs


def _run_pairs(ctx: _Context, job: Job, report: ExtractReport) -> None:
    """A two-tower block: each tower over the paired ids, then the fusion if asked."""
    pairs = paired_items(job)
    report.input_errors[job.name] = _own_inputs(pairs.bad, ctx.shard)
    report.unpaired[job.name] = _own_inputs(pairs.unpaired, ctx.shard)
    report.ignored_files[job.name] = _own_inputs(pairs.ignored, ctx.shard)
    for spec in job.models:
        image, text = spec.towers()
        runs = [
            *_run_models(ctx, job, _Models.of(ctx, job, [image]), pairs.images, report),
            *_run_models(ctx, job, _Models.of(ctx, job, [text]), pairs.texts, report),
        ]
        report.runs += runs
        if spec.fusion is None or ctx.shard is not None:
            continue
        failed = {e.item_id for run in runs for e in run.result.errors}
        ids = [i.item_id for i in pairs.images if i.item_id not in failed]
        fusion = tower_fusion(job, spec, ctx.cfg.output, ids=ids, progress=ctx.progress)
        _save_fusion_errors(fusion)
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
    _save_fusion_errors(run)
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
        matrix = _matrix(
            res.output, res.matrix_dir, "fused", res.ids, cfg, id_order, report, progress, label
        )
        if matrix is not None:
            res.matrix = matrix


def _matrix(
    parts: Path,
    target: Path,
    kind: str,
    ids: list[str],
    cfg: Config,
    id_order: list[str] | None,
    report: ExtractReport,
    progress: ProgressFactory | None = None,
    label: str = "matrix",
) -> MatrixResult | None:
    try:
        return write_matrix(
            parts,
            target,
            FILE_NAMES[kind],
            ids,
            id_order=id_order,
            dtype=cfg.output.dtype,
            progress=progress,
            label=label,
        )
    except DataError as e:
        report.matrix_errors.append(f"matrix {target}: {e}")
        return None


def _id_order(cfg: Config) -> list[str] | None:
    if cfg.output.id_order is None or not cfg.output.matrix:
        return None
    return read_id_order(cfg.output.id_order)


# -- checks before any work starts ------------------------------------------------------------


def _check_matrix_layers(cfg: Config, artifacts: dict[str, Artifact]) -> None:
    """A matrix needs one shape per item: token-level layers cannot form one."""
    if not cfg.output.matrix:
        return
    for graph in cfg.graphs():
        for label in graph.layer_labels():
            out = artifacts[graph_name(graph)].output(label)
            if varies_per_item(out):
                raise ConfigError(
                    f"'{graph.key_path}': layer '{label}' gives one vector per token or audio "
                    "frame, a different number for every item; output.layouts 'matrix' needs "
                    "one shape per item. Choose a pooled layer (audio: pooling: mean), or "
                    "remove 'matrix' from output.layouts."
                )


def _check_output_folders(cfg: Config, artifacts: dict[str, Artifact]) -> None:
    for job, graph, label in _output_layers(cfg):
        key = _feature_key(cfg, graph, artifacts[graph_name(graph)], label)
        path = layer_dir(job, graph, label)
        check_folder(path, key, resume=cfg.output.resume, what=f"'{graph.key_path}'")


def _check_distinct_folders(cfg: Config) -> None:
    """Each folder of features and each fusion's folder has one writer: two writing one would
    replace or remove each other's files (``--fresh`` removes the first one's as the second
    starts), and a fusion must not write into a folder it reads."""
    writers: dict[Path, tuple[str, str | None]] = {}
    for path, this, block in _written_folders(cfg):
        key = path.resolve()
        if key not in writers:
            writers[key] = (this, block)
            continue
        first, first_block = writers[key]
        if first == this:
            raise ConfigError(f"{this} is listed twice in output_layers: list it once.")
        if block is None:
            hint = f"give {this} another output_path."
        elif block == first_block:
            hint = (
                "list the model once; the same model at other settings (another input size, "
                "other preprocessing) goes in a second config with another output_path."
            )
        else:
            hint = f"give {first_block} and {block} different output_paths."
        named = (
            " (a folder of features is named after the output_path, the backend, the model "
            "and the layer only)"
            if block is not None and first_block is not None
            else ""
        )
        raise ConfigError(
            f"{first} and {this} would both write {path}, so one's files would replace or "
            f"remove the other's{named}.\nHint: {hint}"
        )
    for fusion in cfg.fusions:
        read = [i.folder.resolve() for i in fusion.inputs if i.folder is not None]
        if fusion.output_path.resolve() in read:
            raise ConfigError(
                f"'{fusion.key_path}' would write its fused features into {fusion.output_path}, "
                f"which it reads as an input.\nHint: give '{fusion.key_path}.output_path' "
                "another folder."
            )


def _written_folders(cfg: Config) -> Iterator[tuple[Path, str, str | None]]:
    """Every folder of features or fused features the config writes: its path, who writes
    it, and the block (None for an entry of the ``fusion`` section)."""
    for job, graph, label in _output_layers(cfg):
        yield layer_dir(job, graph, label), f"'{graph.key_path}' layer '{label}'", job.name
    for job in cfg.jobs:
        for spec in job.models:
            for layer in spec.output_layers if spec.fusion else ():
                where = f"'{spec.key_path}.fusion' layer '{layer_label(layer)}'"
                yield fused_dir(job, spec, layer), where, job.name
    for fusion in cfg.fusions:
        yield fusion.output_path, f"'{fusion.key_path}'", None


def _output_layers(cfg: Config) -> Iterator[tuple[Job, ModelSpec, str]]:
    """Every (job, graph, layer label) whose features the config writes."""
    for job in cfg.jobs:
        for spec in job.models:
            for graph in spec.towers():
                for label in graph.layer_labels():
                    yield job, graph, label


def _lock_output_folders(cfg: Config, part: Shard | None) -> FolderLocks:
    """This run's locks on its feature folders: its own, or a job array task's share."""
    holder = (
        "ducho-fast extract"
        if part is None
        else f"the tasks of a job array, --shard i/{part.count}"
    )
    locks = FolderLocks(holder, shared=part is not None)
    try:
        for job, graph, label in _output_layers(cfg):
            locks.take(layer_dir(job, graph, label))
    except BaseException:
        locks.release()
        raise
    return locks


def _feature_key(cfg: Config, spec: ModelSpec, artifact: Artifact, label: str) -> dict[str, Any]:
    """Everything that determines the bytes of this layer's feature files."""
    manifest = artifact.manifest
    key: dict[str, Any] = {
        **artifact.hashes,
        "layer": label,
        "output": artifact.output(label).get("name"),
        "preprocessing": manifest.get("preprocessing"),
        "dtype": cfg.output.dtype,
        "squeeze": cfg.output.squeeze,
    }
    if artifact.modality == "visual":
        key["exif_orientation"] = cfg.input.exif_orientation
        if cfg.input.jpeg_decode != "full":  # absent when full: older folders' keys hold
            key["jpeg_decode"] = cfg.input.jpeg_decode
    elif artifact.modality == "textual":
        key["clear_text"] = spec.clear_text
    return key


def _check_layers(spec: ModelSpec, artifact: Artifact) -> None:
    have = {str(o["layer"]) for o in artifact.manifest["outputs"]}
    missing = [x for x in spec.layer_labels() if x not in have]
    if missing:
        raise ArtifactError(
            f"'{spec.key_path}': artifact {artifact.path.name} has no layer(s) {missing}. "
            "Hint: run `ducho-fast export CONFIG` again."
        )


@dataclass
class _Planned:
    """One model's part of a run: its artifact, its reader, where it writes (``folders``,
    once :meth:`open`) and what is already there."""

    spec: ModelSpec
    artifact: Artifact
    writer: DuchoWriter
    loader: Loader
    folders: dict[str, OutputFolder] = field(default_factory=dict)
    changed: int = 0
    # Reused features with no record of their text: id -> when written (st_mtime_ns).
    unknown: dict[str, int] = field(default_factory=dict)

    def open(self, ctx: _Context, job: Job) -> None:
        """Make the output folders ready, and learn what an earlier run left in them."""
        cfg, spec = ctx.cfg, self.spec
        self.folders = {
            label: open_folder(
                layer_dir(job, spec, label),
                _feature_key(cfg, spec, self.artifact, label),
                resume=cfg.output.resume,
                what=f"'{spec.key_path}'",
                alone=ctx.shard is None,
            )
            for label in spec.layer_labels()
        }
        if cfg.output.resume:
            self.loader.unreadable = load_unreadable(self.paths, repr(self.loader.decode_key))
        else:
            for path in self.paths:
                forget_unreadable(path)

    @property
    def done(self) -> set[str]:
        """Ids complete in every layer folder, from an earlier run."""
        return set.intersection(*(f.existing for f in self.folders.values()))

    def forget_changed(
        self, job: Job, items: list[Item], texts: dict[str, str], report: ExtractReport
    ) -> None:
        """Reuse no feature older than its input, among ``items`` (this run's: a shard's own
        windows). An image or audio file modified after its feature was written is embedded
        again, and so is a text whose digest (``texts``) differs from the one recorded with
        its feature; their stale files are removed first.
        Features with no record of their text get a warning when the TSV was modified after
        them all."""
        written = {i: min(f.written[i] for f in self.folders.values()) for i in self.done}
        changed = changed_files(items, written)
        unknown = written
        if texts:
            recorded = recorded_texts(self.paths, written)
            # A text emptied since (no digest now) has changed too; ids no longer listed not.
            listed = {i.item_id for i in items}
            changed |= {i for i, d in recorded.items() if i in listed and texts.get(i) != d}
            unknown = {i: at for i, at in written.items() if i not in recorded}
            self.unknown = unknown
        for folder in self.folders.values():
            folder.forget(changed)
        self.changed = len(changed)
        tsv = table_changed_after(job, unknown) if self.artifact.modality == "textual" else None
        if tsv is not None:
            report.warnings.append(
                f"{self.spec.key_path}: {tsv} was modified after the {len(unknown)} feature(s) "
                "this run reuses with no record of their texts (from an older ducho-fast, or "
                "a killed run) were written. Their ids are not embedded again; if texts "
                "changed under the same ids, run with --fresh."
            )

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.folders.values()]

    def still_unknown(self) -> set[str]:
        """The ids of ``unknown`` whose feature this run did not write again: what made it
        is still not known, so no record vouches for it."""
        still = set()
        for item_id, at in self.unknown.items():
            try:
                when = [f.feature(item_id).stat().st_mtime_ns for f in self.folders.values()]
            except OSError:
                continue
            if min(when) == at:
                still.add(item_id)
        return still


@dataclass
class _Models:
    """Models over the same items, in the config's order, and the pipelines they run in.

    Models whose inputs decode alike (all texts; images with the same EXIF and size
    settings; audio with the same crop) and whose batch sizes fit one window
    (:func:`shared_window`) run in one pipeline that reads and decodes each item once. The
    pipelines, and so a shard's windows, are known before any item is read."""

    planned: list[_Planned]
    groups: list[list[_Planned]]

    @classmethod
    def of(cls, ctx: _Context, job: Job, specs: Iterable[ModelSpec]) -> _Models:
        planned = [_plan(ctx, job, spec) for spec in specs]
        groups: list[list[_Planned]] = []
        for p in planned:
            group = next((g for g in groups if ctx.ray is None and _shares(ctx, g, p)), None)
            if group is None:
                groups.append([p])
            else:
                group.append(p)
        return cls(planned, groups)

    def keep(self, ctx: _Context) -> Callable[[int], bool] | None:
        """Whether this run reads the item at a position of the item list: a shard, one in
        any of its windows of any pipeline (cut at fixed positions, see
        :mod:`ducho_fast.runtime.shard`). None without a shard: every item is read."""
        shard = ctx.shard
        if shard is None:
            return None
        windows = sorted({_group_window(ctx, g) for g in self.groups})
        if len(windows) == 1:
            (window,) = windows
            return lambda k: shard.owns(k // window)
        return lambda k: any(shard.owns(k // w) for w in windows)


def _run_models(
    ctx: _Context, job: Job, models: _Models, items: list[Item], report: ExtractReport
) -> list[ModelRun]:
    """``models`` over ``items``; runs come back in the config's order."""
    keep = models.keep(ctx)
    if keep is not None:
        _drop_others_windows(items, keep)
    for p in models.planned:
        p.open(ctx, job)
    texts = {i.item_id: text_digest(i.raw) for i in items if isinstance(i.raw, str)}
    runs: dict[int, ModelRun] = {}
    for group in models.groups:
        scope, group_runs = _run_group(ctx, job, group, items, texts, report)
        total = len(scope)
        for p in group:
            for folder in p.folders.values():
                folder.settle()
        for p, run in zip(group, group_runs, strict=True):
            runs[id(p)] = run
            advice = precision_advice(p.artifact.manifest.get("precision", "fp32"), run.provider)
            if advice:
                report.warnings.append(f"{p.spec.key_path}: {advice}")
            save_unreadable(p.paths, ctx.shard, repr(p.loader.decode_key), run.result.errors)
            if texts:
                # Only the ids with a feature count (see recorded_texts): failures need no care.
                unknown = p.still_unknown()
                made = {
                    i.item_id: texts[i.item_id]
                    for i in scope
                    if i.item_id in texts and i.item_id not in unknown
                }
                save_texts(p.paths, ctx.shard, made)
            if ctx.shard is None:
                ids = [i.item_id for i in items]
                _finish_outputs(ctx, job, p.spec, run, p.folders, ids, report)
            else:
                _record_shard(ctx.shard, p.folders, total, run.result)
    return [runs[id(p)] for p in models.planned]


def precision_advice(precision: str, provider: str) -> str | None:
    """Why an artifact's precision does not suit what its session ran on; None if it does."""
    if precision == "fp16" and provider == "CPUExecutionProvider":
        return (
            "this fp16 graph ran on the CPU, which has no fast half-precision math "
            "(all-MiniLM-L6-v2 in fp16 ran at 0.83x its fp32 graph here). fp16 is for GPUs: "
            "on CPUs export with precision: fp32, or int8 for transformer models."
        )
    if precision == "int8" and provider == "CUDAExecutionProvider":
        # onnxruntime registers no CUDA kernel for these contrib ops (contrib_ops/cuda/
        # cuda_contrib_kernels.cc); not measured here, where no GPU was lent.
        return (
            "this int8 graph ran with CUDA, but ONNX Runtime's CUDA provider has no kernels for "
            "its quantized products (MatMulIntegerToFloat, DynamicQuantizeMatMul): they run on "
            "the CPU, with copies to and from the GPU around each. int8 is for CPUs: on GPUs "
            "export with precision: fp16 (or fp32)."
        )
    return None


def _shares(ctx: _Context, group: list[_Planned], p: _Planned) -> bool:
    """Whether ``p`` can join ``group``'s pipeline: same decoding, and a shared window."""
    windows = _own_windows(ctx, [*group, p])
    return group[0].loader.decode_key == p.loader.decode_key and shared_window(windows) is not None


def _own_windows(ctx: _Context, planned: list[_Planned]) -> list[int]:
    """Each model's own window (items), as its pipeline member cuts them."""
    sort_window = ctx.cfg.runtime.sort_window
    return [
        window_size(sorts_by_length(q.artifact.modality), q.spec.batch_size, sort_window)
        for q in planned
    ]


def _group_window(ctx: _Context, group: list[_Planned]) -> int:
    """The window of ``group``'s pipeline (:attr:`Pipeline.window`), known before it is made."""
    window = shared_window(_own_windows(ctx, group))
    assert window is not None, "a group is made of models that share a window"
    return window


def _drop_others_windows(items: list[Item], keep: Callable[[int], bool]) -> None:
    """Keep only what a shard reads (``keep``, :meth:`_Models.keep`): the inputs of the other
    items are dropped, in place, from the caller's list, which would hold them until the job
    ends. A text job's table is read so already (:func:`job_items`); a two-tower block's
    texts are paired first. The items keep their places (windows are cut by position) and
    ids; their input is None and their origin empty."""
    for k, item in enumerate(items):
        if item.raw is not None and not keep(k):
            items[k] = Item(item.item_id, "", None)


def _plan(ctx: _Context, job: Job, spec: ModelSpec) -> _Planned:
    """A model's artifact, reader and writer; its folders are opened later (:meth:`open`)."""
    cfg, artifact = ctx.cfg, ctx.artifacts[graph_name(spec)]
    writer = DuchoWriter(job, spec, squeeze=cfg.output.squeeze, dtype=cfg.output.dtype)
    return _Planned(spec, artifact, writer, loader_for(spec, artifact.manifest, cfg.input))


def _run_group(
    ctx: _Context,
    job: Job,
    group: list[_Planned],
    items: list[Item],
    texts: dict[str, str],
    report: ExtractReport,
) -> tuple[list[Item], list[ModelRun]]:
    """The items this run embeds (all, or its shard's windows') and each model's run. Stale
    features of those items are removed first (``texts``: the digests of the texts)."""
    cfg = ctx.cfg
    options = PipelineOptions(
        batch_size=group[0].spec.batch_size,
        prefetch=cfg.runtime.prefetch,
        workers=cfg.runtime.workers or cpu_quota(),
        on_error=cfg.runtime.on_error,
        token_budget=cfg.runtime.token_budget,
        shard=ctx.shard,
        sort_window=cfg.runtime.sort_window,
        readers=cfg.runtime.readers,
    )
    pipeline: Pipeline | RayPipeline
    if ctx.ray is None:
        members = [
            Member(
                _embedder(ctx, p.artifact),
                p.loader,
                p.writer.write,
                batch_size=p.spec.batch_size,
            )
            for p in group
        ]
        pipeline = Pipeline(members, options)
    else:
        from ducho_fast.runtime.raydata import RayPipeline

        (only,) = group
        pipeline = RayPipeline(
            only.artifact, cfg.runtime, only.loader, only.writer.write, options, ctx.ray
        )
    expected = _group_window(ctx, group)
    if pipeline.window != expected:  # _Models.keep kept the inputs of these windows
        raise RuntimeError(f"the pipeline's window is {pipeline.window}, not {expected}")
    names = " + ".join(_model_label(p.spec) for p in group)
    shard = f" (shard {ctx.shard})" if ctx.shard else ""
    scope = [item for chunk in pipeline.windows(items) for item in chunk]
    total = len(scope)
    # A shard looks at its own windows only: another task may be writing the others again.
    for p in group:
        p.forget_changed(job, scope, texts, report)
    if isinstance(pipeline, Pipeline):
        for member, p in zip(pipeline.members, group, strict=True):
            member.done = p.done
        todo = pipeline.todo(items)
    else:
        todo = pipeline.todo(items, group[0].done)
    # The bar and its rate count the items embedded now, not those an earlier run wrote.
    before = f" ({total - todo} of {total} done before)" if todo < total else ""
    label = f"{job.name} {names}{shard}{before}"
    # Nothing to embed (all done before, or an empty shard): the summary line says so, no bar.
    with shown(ctx.progress, label, todo) as tick:
        if isinstance(pipeline, Pipeline):
            results, providers = pipeline.run(items, tick), pipeline.providers
        else:
            results, providers = [pipeline.run(items, tick, group[0].done)], [pipeline.provider]
    return scope, [
        ModelRun(
            job.name,
            p.spec.model_name,
            tuple(p.spec.layer_labels()),
            provider,
            result,
            p.writer.dirs,
            p.spec.tower,
            changed=p.changed,
        )
        for p, result, provider in zip(group, results, providers, strict=True)
    ]


def _record_shard(shard: Shard, folders: dict[str, OutputFolder], total: int, r: RunResult) -> None:
    """What one task did, beside the folder's manifest (which a plain run completes)."""
    record = {
        "shard": str(shard),
        "items": total,
        "written": r.written,
        "reused": r.reused,
        "failed": len(r.errors),
        "seconds_extracting": round(r.seconds, 3),
        **_timing_record(r),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for folder in folders.values():
        write_text(folder.path / f"ducho-fast.{shard.tag}.json", json.dumps(record, indent=2))


def _finish_outputs(
    ctx: _Context,
    job: Job,
    spec: ModelSpec,
    run: ModelRun,
    folders: dict[str, OutputFolder],
    ids: list[str],
    report: ExtractReport,
) -> None:
    """Matrices from the complete per-item files, then each folder's manifest."""
    r = run.result
    counts = {"items": len(ids), "written": r.written, "reused": r.reused, "failed": len(r.errors)}
    artifact = ctx.artifacts[graph_name(spec)]
    for label, folder in folders.items():
        extra: dict[str, Any] = {}
        if ctx.cfg.output.matrix:
            target = output_root(job, spec).joinpath(MATRIX_DIR, *layer_parts(spec, label))
            kind = spec.tower or spec.modality
            shown_as = f"{job.name} {_model_label(spec)} matrix ({label})"
            matrix = _matrix(
                folder.path,
                target,
                kind,
                ids,
                ctx.cfg,
                ctx.id_order,
                report,
                ctx.progress,
                shown_as,
            )
            if matrix is not None:
                run.matrices.append(matrix)
                extra["matrix"] = _matrix_record(matrix)
        folder.finish(
            counts,
            config=ctx.cfg.source,
            config_sha256=digest(ctx.cfg.resolved),
            resolved_config=ctx.cfg.resolved,  # the root's resolved file is the last run's
            artifact={"slug": artifact.path.name, **artifact.hashes},
            model=spec.key_path,
            seconds_extracting=round(r.seconds, 3),
            items_per_second=round(r.items_per_second, 2),
            **_timing_record(r),
            errors_file=str(output_root(job, spec) / ERRORS_FILE) if r.errors else None,
            **extra,
        )


def _timing_record(r: RunResult) -> dict[str, float]:
    """Where the run's time went (local engine), for a manifest: see :class:`Timing`."""
    if r.timing is None:
        return {}
    return {
        "seconds_to_first_batch": round(r.timing.first_batch, 3),
        "seconds_in_model": round(r.timing.model, 3),
        "seconds_waiting_for_inputs": round(r.timing.inputs, 3),
        "seconds_waiting_for_writer": round(r.timing.writer, 3),
        "writer_cpu_seconds": round(r.timing.writer_cpu, 3),
        "concurrent_batches": r.timing.lanes,
    }


def _model_label(spec: ModelSpec) -> str:
    """A model as progress shows it: ``all-MiniLM-L6-v2``, ``clip [image]``."""
    return Path(spec.model_name).name + (f" [{spec.tower}]" if spec.tower else "")


def _matrix_record(matrix: MatrixResult) -> dict[str, Any]:
    return {
        "path": str(matrix.path),
        "rows": matrix.rows,
        "filled_with_mean": len(matrix.filled),
        "left_out": len(matrix.dropped),
        "reused": matrix.reused,
    }


def _save_resolved(cfg: Config, job: Job) -> None:
    text = f"# Resolved by ducho-fast from {cfg.source}\n" + yaml.safe_dump(
        cfg.resolved, sort_keys=False, allow_unicode=True
    )
    for folder in _job_folders(job):
        write_text(folder / RESOLVED_CONFIG, text)


def _job_folders(job: Job) -> list[Path]:
    return [job.output_path] + ([job.text_output_path] if job.text_output_path else [])


def _save_errors(job: Job, report: ExtractReport) -> None:
    """The job's rows in its errors file; a shard writes its own file, whose rows of this job
    a plain run's replace. Other jobs' and fusions' rows in those files stay."""
    rows = [("input", e) for e in report.input_errors.get(job.name, [])]
    rows += [("pairing", e) for e in report.unpaired.get(job.name, [])]
    runs = [r for r in report.runs if r.job == job.name]
    rows += [(_stage(r), e) for r in runs for e in r.result.errors]
    stages = {"input", "pairing"} | {_stage(r) for r in runs}
    for folder in _job_folders(job):
        if report.shard is not None:
            update_errors(folder / errors_file(report.shard), job.name, stages, rows)
            continue
        update_errors(folder / ERRORS_FILE, job.name, stages, rows)
        for stale in folder.glob("ducho-fast.errors.shard-*.tsv"):
            update_errors(stale, job.name, stages, [])


def errors_file(shard: Shard | None) -> str:
    """``ducho-fast.errors.tsv``, or a shard's ``ducho-fast.errors.shard-0-of-4.tsv``."""
    return ERRORS_FILE if shard is None else f"ducho-fast.errors.{shard.tag}.tsv"


def _stage(run: ModelRun) -> str:
    return f"{run.model} [{run.tower}]" if run.tower else run.model


def _save_fusion_errors(run: FusionRun) -> None:
    for result in run.results:
        rows = [("fusion", e) for e in result.missing + result.errors]
        update_errors(result.output / ERRORS_FILE, run.key, ["fusion"], rows)
