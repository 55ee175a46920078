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
from ducho_fast.data.items import ItemError
from ducho_fast.data.sources import Items, job_items, loader_for
from ducho_fast.errors import ArtifactError
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
    return [export_model(spec, cfg.store, force=force) for spec in cfg.models()]


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


@dataclass
class ExtractReport:
    runs: list[ModelRun] = field(default_factory=list)
    input_errors: dict[str, list[ItemError]] = field(default_factory=dict)
    ignored_files: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        item_level = sum(len(r.result.errors) for r in self.runs)
        return item_level + sum(len(v) for v in self.input_errors.values())


def extract(
    config: ConfigLike,
    overrides: Iterable[str] = (),
    *,
    progress: ProgressFactory | None = None,
) -> ExtractReport:
    """Run every job of the config on its exported artifacts and write Ducho's layout."""
    cfg = as_config(config, overrides)
    artifacts = {spec.key_path: find_artifact(cfg.store, spec) for spec in cfg.models()}
    for spec in cfg.models():
        _check_layers(spec, artifacts[spec.key_path])
    report = ExtractReport()
    for job in cfg.jobs:
        items = job_items(job)
        report.input_errors[job.name] = items.bad
        report.ignored_files[job.name] = items.ignored
        _save_resolved(cfg, job)
        for spec in job.models:
            run = _run_model(cfg, job, spec, artifacts[spec.key_path], items, progress)
            report.runs.append(run)
        _save_errors(job, report)
    return report


def _check_layers(spec: ModelSpec, artifact: Artifact) -> None:
    have = {str(o["layer"]) for o in artifact.manifest["outputs"]}
    missing = [str(x) for x in spec.output_layers if str(x) not in have]
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
    items: Items,
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
    pipeline = Pipeline(embedder, loader_for(spec), writer.write, options)
    label = f"{job.name} {Path(spec.model_name).name}"
    context = progress(label, len(items.good)) if progress else nullcontext(None)
    with context as tick:
        result = pipeline.run(items.good, tick)
    layers = tuple(str(x) for x in spec.output_layers)
    return ModelRun(job.name, spec.model_name, layers, embedder.info.provider, result, writer.dirs)


def _save_resolved(cfg: Config, job: Job) -> None:
    text = f"# Resolved by ducho-fast from {cfg.source}\n" + yaml.safe_dump(
        cfg.resolved, sort_keys=False, allow_unicode=True
    )
    write_text(job.output_path / RESOLVED_CONFIG, text)


def _save_errors(job: Job, report: ExtractReport) -> None:
    rows = [("input", e) for e in report.input_errors.get(job.name, [])]
    rows += [(r.model, e) for r in report.runs if r.job == job.name for e in r.result.errors]
    path = job.output_path / ERRORS_FILE
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
