"""What the CLI does, callable: ``export(config)``, ``extract(config)``, ``load(artifact)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ducho_fast.artifact import Artifact, find_artifact
from ducho_fast.config import Config, Job, ModelSpec, load_config
from ducho_fast.config.model import FusionSpec
from ducho_fast.data.items import Item, ItemError
from ducho_fast.data.pairs import paired_items
from ducho_fast.data.sources import job_items, loader_for
from ducho_fast.errors import ArtifactError
from ducho_fast.fusion import (
    FusionRun,
    check_fusion_dims,
    graph_name,
    section_fusion,
    tower_fusion,
)
from ducho_fast.outputs.atomic import write_text
from ducho_fast.outputs.ducho import DuchoWriter
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.embedder import Embedder
from ducho_fast.runtime.pipeline import Pipeline, PipelineOptions, ProgressFn, RunResult

ConfigLike = str | Path | dict[str, Any] | Config
# Given a label and a total, returns a context manager yielding a progress callback.
ProgressFactory = Callable[[str, int], AbstractContextManager[ProgressFn]]

RESOLVED_CONFIG = "ducho-fast.resolved.yml"
ERRORS_FILE = "ducho-fast.errors.tsv"


def as_config(config: ConfigLike, overrides: Iterable[str] = ()) -> Config:
    return config if isinstance(config, Config) else load_config(config, overrides)


# -- export -------------------------------------------------------------------------------


def export(config: ConfigLike, overrides: Iterable[str] = (), *, force: bool = False) -> list[Any]:
    """Export every model the config names to a parity-checked artifact in the store.

    Returns one ``ExportResult`` per model entry; artifacts already exported and valid are
    reused unless ``force``.
    """
    from ducho_fast.exporters import export_model  # heavy frameworks load only here

    cfg = as_config(config, overrides)
    return [r for spec in cfg.models() for r in export_model(spec, cfg.store, force=force)]


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


@dataclass
class ExtractReport:
    runs: list[ModelRun] = field(default_factory=list)
    input_errors: dict[str, list[ItemError]] = field(default_factory=dict)
    ignored_files: dict[str, list[Path]] = field(default_factory=dict)
    unpaired: dict[str, list[ItemError]] = field(default_factory=dict)
    fusions: list[FusionRun] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Items that could not be extracted or fused (unpaired ids are reported, not failed)."""
        item_level = sum(len(r.result.errors) for r in self.runs)
        fused = sum(len(res.errors) for f in self.fusions for res in f.results)
        return item_level + fused + sum(len(v) for v in self.input_errors.values())


def extract(
    config: ConfigLike,
    overrides: Iterable[str] = (),
    *,
    progress: ProgressFactory | None = None,
) -> ExtractReport:
    """Run every job of the config on its exported artifacts and write Ducho's layout."""
    cfg = as_config(config, overrides)
    artifacts = {graph_name(g): find_artifact(cfg.store, g) for g in cfg.graphs()}
    for graph in cfg.graphs():
        _check_layers(graph, artifacts[graph_name(graph)])
    check_fusion_dims(cfg, artifacts)
    report = ExtractReport()
    for job in cfg.jobs:
        _save_resolved(cfg, job)
        if job.modality == "visual_textual":
            _run_pairs(cfg, job, artifacts, report, progress)
        else:
            items = job_items(job)
            report.input_errors[job.name] = items.bad
            report.ignored_files[job.name] = items.ignored
            for spec in job.models:
                run = _run_model(cfg, job, spec, artifacts[spec.key_path], items.good, progress)
                report.runs.append(run)
        _save_errors(job, report)
    report.fusions += [_section_fusion(cfg, f) for f in cfg.fusions]
    return report


def fuse(config: ConfigLike, overrides: Iterable[str] = ()) -> list[FusionRun]:
    """Run the config's fusions over features already extracted; no model runs."""
    cfg = as_config(config, overrides)
    runs = [
        tower_fusion(job, spec, squeeze=cfg.output.squeeze)
        for job in cfg.jobs
        for spec in job.models
        if spec.fusion is not None
    ]
    for run in runs:
        _save_fusion_errors(run)
    return runs + [_section_fusion(cfg, f) for f in cfg.fusions]


def _run_pairs(
    cfg: Config,
    job: Job,
    artifacts: dict[str, Artifact],
    report: ExtractReport,
    progress: ProgressFactory | None,
) -> None:
    """A two-tower block: each tower over the paired ids, then the fusion if asked."""
    pairs = paired_items(job)
    report.input_errors[job.name] = pairs.bad
    report.unpaired[job.name] = pairs.unpaired
    report.ignored_files[job.name] = pairs.ignored
    for spec in job.models:
        image, text = spec.towers()
        runs = [
            _run_model(cfg, job, image, artifacts[graph_name(image)], pairs.images, progress),
            _run_model(cfg, job, text, artifacts[graph_name(text)], pairs.texts, progress),
        ]
        report.runs += runs
        if spec.fusion is None:
            continue
        failed = {e.item_id for run in runs for e in run.result.errors}
        ids = [i.item_id for i in pairs.images if i.item_id not in failed]
        fusion = tower_fusion(job, spec, squeeze=cfg.output.squeeze, ids=ids)
        _save_fusion_errors(fusion)
        report.fusions.append(fusion)


def _section_fusion(cfg: Config, fusion: FusionSpec) -> FusionRun:
    run = section_fusion(cfg, fusion)
    _save_fusion_errors(run)
    return run


def _check_layers(spec: ModelSpec, artifact: Artifact) -> None:
    have = {str(o["layer"]) for o in artifact.manifest["outputs"]}
    missing = [x for x in spec.layer_labels() if x not in have]
    if missing:
        raise ArtifactError(
            f"'{spec.key_path}': artifact {artifact.path.name} has no layer(s) {missing}. "
            "Hint: run `ducho-fast export CONFIG` again."
        )


def _run_model(
    cfg: Config,
    job: Job,
    spec: ModelSpec,
    artifact: Artifact,
    items: list[Item],
    progress: ProgressFactory | None,
) -> ModelRun:
    embedder = Embedder(artifact, cfg.runtime)
    writer = DuchoWriter(job, spec, squeeze=cfg.output.squeeze)
    options = PipelineOptions(
        batch_size=spec.batch_size,
        prefetch=cfg.runtime.prefetch,
        workers=cfg.runtime.workers or cpu_quota(),
        on_error=cfg.runtime.on_error,
    )
    pipeline = Pipeline(embedder, loader_for(spec, artifact.manifest), writer.write, options)
    tower = f" [{spec.tower}]" if spec.tower else ""
    label = f"{job.name} {Path(spec.model_name).name}{tower}"
    context = progress(label, len(items)) if progress else nullcontext(None)
    with context as tick:
        result = pipeline.run(items, tick)
    layers = tuple(spec.layer_labels())
    provider = embedder.info.provider
    return ModelRun(job.name, spec.model_name, layers, provider, result, writer.dirs, spec.tower)


def _save_resolved(cfg: Config, job: Job) -> None:
    text = f"# Resolved by ducho-fast from {cfg.source}\n" + yaml.safe_dump(
        cfg.resolved, sort_keys=False, allow_unicode=True
    )
    for folder in _job_folders(job):
        write_text(folder / RESOLVED_CONFIG, text)


def _job_folders(job: Job) -> list[Path]:
    return [job.output_path] + ([job.text_output_path] if job.text_output_path else [])


def _save_errors(job: Job, report: ExtractReport) -> None:
    rows = [("input", e) for e in report.input_errors.get(job.name, [])]
    rows += [("pairing", e) for e in report.unpaired.get(job.name, [])]
    rows += [(_stage(r), e) for r in report.runs if r.job == job.name for e in r.result.errors]
    for folder in _job_folders(job):
        _write_errors(folder / ERRORS_FILE, rows)


def _stage(run: ModelRun) -> str:
    return f"{run.model} [{run.tower}]" if run.tower else run.model


def _save_fusion_errors(run: FusionRun) -> None:
    for result in run.results:
        rows = [("fusion", e) for e in result.missing + result.errors]
        _write_errors(result.output / ERRORS_FILE, rows)


def _write_errors(path: Path, rows: list[tuple[str, ItemError]]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    lines = ["stage\titem_id\torigin\treason"]
    lines += [
        f"{stage}\t{_cell(e.item_id)}\t{_cell(e.origin)}\t{_cell(e.reason)}" for stage, e in rows
    ]
    write_text(path, "\n".join(lines) + "\n")


def _cell(value: str) -> str:
    return value.replace("\t", " ").replace("\n", " ").encode("unicode_escape").decode("ascii")
