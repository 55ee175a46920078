"""A job's models over its items: planned, grouped into pipelines that read and decode each
item once, run, and recorded beside their features."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ducho_fast.artifact import Artifact
from ducho_fast.config import Config, Job, ModelSpec
from ducho_fast.data.items import ELSEWHERE, Item
from ducho_fast.data.sources import (
    ListedFiles,
    Loader,
    changed_files,
    loader_for,
    table_changed_after,
)
from ducho_fast.data.text.deferred import TableTexts, digest_of
from ducho_fast.fusion import graph_name
from ducho_fast.outputs.atomic import write_text
from ducho_fast.outputs.ducho import DuchoWriter, layer_dir, layer_parts, output_root
from ducho_fast.outputs.listed import recorded_files, save_files
from ducho_fast.outputs.manifest import OutputFolder, digest, open_folder
from ducho_fast.outputs.matrix import MATRIX_DIR, MatrixResult
from ducho_fast.outputs.texts import recorded_texts, save_texts
from ducho_fast.outputs.unreadable import forget_unreadable, load_unreadable, save_unreadable
from ducho_fast.preflight import feature_key
from ducho_fast.progress import ProgressFactory, Status, shown
from ducho_fast.report import ERRORS_FILE, ExtractReport, ModelRun, matrix_of
from ducho_fast.runtime.batcher import sorts_by_length, window_size
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.embedder import Embedder
from ducho_fast.runtime.memory import within_limit
from ducho_fast.runtime.pipeline import Member, Pipeline, PipelineOptions, RunResult, shared_window
from ducho_fast.runtime.session import PendingSession, batch_lanes, for_artifact, spins
from ducho_fast.runtime.shard import Shard

if TYPE_CHECKING:
    from ducho_fast.runtime.raydata import RayOptions, RayPipeline


@dataclass(frozen=True)
class RunContext:
    """What every model run of one ``extract`` shares."""

    cfg: Config
    artifacts: dict[str, Artifact]
    id_order: list[str] | None
    progress: ProgressFactory | None
    shard: Shard | None = None
    ray: RayOptions | None = None  # extract --engine ray
    ahead: list[PendingSession] = field(default_factory=list)  # taken by the first embedder
    status: Status | None = None  # told how far a long read without a bar got


def _embedder(ctx: RunContext, artifact: Artifact) -> Embedder:
    """A pipeline's embedder, on the session created ahead when it is this artifact's."""
    pending = ctx.ahead.pop() if ctx.ahead else None
    options = for_artifact(ctx.cfg.runtime, artifact.manifest)  # bf16: OpenVINO's
    spinning = spins(options, artifact.modality, readers=True)
    lanes = batch_lanes(options)
    if pending is not None and not pending.serves(
        artifact.model_path, spinning=spinning, lanes=lanes, options=options
    ):
        pending = None
    return Embedder(artifact, ctx.cfg.runtime, readers=True, pending=pending, lanes=lanes)


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

    def open(self, ctx: RunContext, job: Job) -> None:
        """Make the output folders ready, and learn what an earlier run left in them."""
        cfg, spec = ctx.cfg, self.spec
        self.folders = {
            label: open_folder(
                layer_dir(job, spec, label),
                feature_key(cfg, spec, self.artifact, label),
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
        self,
        job: Job,
        items: list[Item],
        texts: dict[str, str],
        files: ListedFiles,
        report: ExtractReport,
    ) -> None:
        """Reuse no feature made from another input than this run's, among ``items`` (this
        run's: a shard's own windows). An image or audio file (``files``: of ``items``, as
        listed now) not as recorded with its feature (or, with no record, modified after its
        feature was written) is embedded again, and so is a text whose digest (``texts``)
        differs from the one recorded with its feature; their stale files are removed first.
        Features with no record of their text get a warning when the TSV was modified after
        them all."""
        written = {i: min(f.written[i] for f in self.folders.values()) for i in self.done}
        now = files.of_ids(items, written)
        changed = changed_files(now, written, recorded_files(self.paths, written))
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
class Models:
    """Models over the same items, in the config's order, and the pipelines they run in.

    Models whose inputs decode alike (all texts; images with the same EXIF and size
    settings; audio with the same crop) and whose batch sizes fit one window
    (:func:`shared_window`) run in one pipeline that reads and decodes each item once. The
    pipelines, and so a shard's windows, are known before any item is read."""

    planned: list[_Planned]
    groups: list[list[_Planned]]

    @classmethod
    def of(cls, ctx: RunContext, job: Job, specs: Iterable[ModelSpec]) -> Models:
        planned = [_plan(ctx, job, spec) for spec in specs]
        groups: list[list[_Planned]] = []
        for p in planned:
            group = next((g for g in groups if ctx.ray is None and _shares(ctx, g, p)), None)
            if group is None:
                groups.append([p])
            else:
                group.append(p)
        return cls(planned, groups)

    def keep(self, ctx: RunContext) -> Callable[[int], bool] | None:
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


def run_models(
    ctx: RunContext,
    job: Job,
    models: Models,
    items: list[Item],
    report: ExtractReport,
    table: TableTexts | None = None,
) -> list[ModelRun]:
    """``models`` over ``items``; runs come back in the config's order. ``table``: where the
    texts of items that hold their digests are read (see :func:`job_items`)."""
    keep = models.keep(ctx)
    if keep is not None:
        _drop_others_windows(items, keep)
    for p in models.planned:
        p.open(ctx, job)
    texts = {i.item_id: digest_of(i.raw) for i in items if isinstance(i.raw, str)}
    runs: dict[int, ModelRun] = {}
    for group in models.groups:
        scope, files, group_runs = _run_group(ctx, job, group, items, texts, report, table)
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
            if files:
                # Reused features without a record passed the times' test: the same from now.
                listed = ((i.item_id, files.get(k)) for k, i in enumerate(scope))
                save_files(p.paths, ctx.shard, ((i, f) for i, f in listed if f is not None))
            if ctx.shard is None:
                ids = [i.item_id for i in items]
                _finish_outputs(ctx, job, p.spec, run, p.folders, ids, report)
            else:
                _record_shard(ctx.shard, p.folders, total, run.result)
    return [runs[id(p)] for p in models.planned]


def memory_advice(embedder: Embedder) -> str | None:
    """Which batch size fits, where batches of this run ran out of memory; None if none did."""
    splits = embedder.memory_splits
    if not splits.any:
        return None
    limit = embedder.info.memory_limit
    within = within_limit(limit, "on this machine")
    said = f"batches of {splits.too_big} items or more ran out of memory {within}"
    if not splits.largest_part:
        return (
            f"{said}, and so did single items (see the errors file). Raise "
            "runtime.memory_limit, or free memory."
        )
    return (
        f"{said}, and ran in parts of at most {splits.largest_part} items. Set batch_size: "
        f"{splits.largest_part} for this model, which saves the attempts that failed"
        + (", or raise runtime.memory_limit where the machine has the memory." if limit else ".")
    )


def precision_advice(precision: str, provider: str) -> str | None:
    """Why an artifact's precision does not suit what its session ran on; None if it does."""
    if precision == "fp16" and provider == "CPUExecutionProvider":
        return (
            "this fp16 graph ran on the CPU, which has no fast half-precision math "
            "(all-MiniLM-L6-v2 in fp16 ran at 0.83x its fp32 graph here). fp16 is for GPUs: "
            "on CPUs export with precision: fp32, int8 for transformer models, or bf16 where "
            "`ducho-fast doctor` says it runs."
        )
    if precision == "bf16" and provider == "CUDAExecutionProvider":
        return (
            "this bf16 artifact ran its graph, the fp32 one, with CUDA at fp32's speed: bf16 is "
            "for Intel CPUs with bfloat16 math (OpenVINO's CPU plugin). On GPUs export with "
            "precision: fp16 (or fp32)."
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


def _shares(ctx: RunContext, group: list[_Planned], p: _Planned) -> bool:
    """Whether ``p`` can join ``group``'s pipeline: same decoding, and a shared window."""
    windows = _own_windows(ctx, [*group, p])
    return group[0].loader.decode_key == p.loader.decode_key and shared_window(windows) is not None


def _own_windows(ctx: RunContext, planned: list[_Planned]) -> list[int]:
    """Each model's own window (items), as its pipeline member cuts them."""
    sort_window = ctx.cfg.runtime.sort_window
    return [
        window_size(sorts_by_length(q.artifact.modality), q.spec.batch_size, sort_window)
        for q in planned
    ]


def _group_window(ctx: RunContext, group: list[_Planned]) -> int:
    """The window of ``group``'s pipeline (:attr:`Pipeline.window`), known before it is made."""
    window = shared_window(_own_windows(ctx, group))
    assert window is not None, "a group is made of models that share a window"
    return window


def _drop_others_windows(items: list[Item], keep: Callable[[int], bool]) -> None:
    """Keep only what a shard reads (``keep``, :meth:`Models.keep`): the inputs of the other
    items are dropped, in place, from the caller's list, which would hold them until the job
    ends. A text job's table is read so already (:func:`job_items`); a two-tower block's
    texts are paired first. The items keep their places (windows are cut by position), as
    :data:`ELSEWHERE`."""
    for k, item in enumerate(items):
        if item.raw is not None and not keep(k):
            items[k] = ELSEWHERE


def _plan(ctx: RunContext, job: Job, spec: ModelSpec) -> _Planned:
    """A model's artifact, reader and writer; its folders are opened later (:meth:`open`)."""
    cfg, artifact = ctx.cfg, ctx.artifacts[graph_name(spec)]
    writer = DuchoWriter(job, spec, squeeze=cfg.output.squeeze, dtype=cfg.output.dtype)
    return _Planned(spec, artifact, writer, loader_for(spec, artifact.manifest, cfg.input))


def _run_group(
    ctx: RunContext,
    job: Job,
    group: list[_Planned],
    items: list[Item],
    texts: dict[str, str],
    report: ExtractReport,
    table: TableTexts | None = None,
) -> tuple[list[Item], ListedFiles, list[ModelRun]]:
    """The items this run embeds (all, or its shard's windows'), their files as listed
    before any is read, and each model's run. Stale features of those items are removed
    first (``texts``: the digests of the texts)."""
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
        writers=cfg.runtime.writers,
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
    if pipeline.window != expected:  # Models.keep kept the inputs of these windows
        raise RuntimeError(f"the pipeline's window is {pipeline.window}, not {expected}")
    names = " + ".join(_model_label(p.spec) for p in group)
    shard = f" (shard {ctx.shard})" if ctx.shard else ""
    scope = [item for chunk in pipeline.windows(items) for item in chunk]
    total = len(scope)
    files = ListedFiles.of(scope)  # before any is read
    # A shard looks at its own windows only: another task may be writing the others again.
    for p in group:
        p.forget_changed(job, scope, texts, files, report)
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
            results, providers = pipeline.run(items, tick, table), pipeline.providers
        else:
            ran = pipeline.run(items, tick, group[0].done, table)
            results, providers = [ran], [pipeline.provider]
    if isinstance(pipeline, Pipeline):
        for member, p in zip(pipeline.members, group, strict=True):
            advice = memory_advice(member.embedder)
            if advice:
                report.warnings.append(f"{p.spec.key_path}: {advice}")
    return (
        scope,
        files,
        [
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
        ],
    )


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
    ctx: RunContext,
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
            matrix = matrix_of(
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


def _timing_record(r: RunResult) -> dict[str, float | None]:
    """Where the run's time went (local engine), for a manifest: see :class:`Timing`."""
    if r.timing is None:
        return {}
    warm = r.timing.warm_up
    return {
        "seconds_to_first_batch": round(r.timing.first_batch, 3),
        "seconds_in_model": round(r.timing.model, 3),
        "seconds_waiting_for_inputs": round(r.timing.inputs, 3),
        "seconds_waiting_for_writer": round(r.timing.writer, 3),
        "seconds_of_last_writes": round(r.timing.last_writes, 3),
        "seconds_first_batch_ran_longer": None if warm is None else round(warm, 3),
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
