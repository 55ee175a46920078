"""What ``extract`` reports: in memory (:class:`ExtractReport`), in the errors files and
resolved configs beside the features, and the matrices whose failures it lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ducho_fast.config import Config, Job
from ducho_fast.data.items import ItemError
from ducho_fast.errors import DataError
from ducho_fast.fusion import FusionRun
from ducho_fast.outputs.atomic import write_text
from ducho_fast.outputs.errors_tsv import update_errors
from ducho_fast.outputs.matrix import FILE_NAMES, MatrixResult, write_matrix
from ducho_fast.progress import ProgressFactory
from ducho_fast.runtime.pipeline import RunResult
from ducho_fast.runtime.shard import Shard

RESOLVED_CONFIG = "ducho-fast.resolved.yml"
ERRORS_FILE = "ducho-fast.errors.tsv"


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
    ignored_folders: dict[str, list[Path]] = field(default_factory=dict)  # subfolders, not read
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


def matrix_of(
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
    """The matrix of ``ids``' features in ``parts`` (a ``kind`` of :data:`FILE_NAMES`), written
    in ``target``; None when it cannot be made, with why in ``report.matrix_errors``."""
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


def save_resolved(cfg: Config, job: Job) -> None:
    text = f"# Resolved by ducho-fast from {cfg.source}\n" + yaml.safe_dump(
        cfg.resolved, sort_keys=False, allow_unicode=True
    )
    for folder in _job_folders(job):
        write_text(folder / RESOLVED_CONFIG, text)


def _job_folders(job: Job) -> list[Path]:
    return [job.output_path] + ([job.text_output_path] if job.text_output_path else [])


def save_errors(job: Job, report: ExtractReport) -> None:
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


def save_fusion_errors(run: FusionRun) -> None:
    for result in run.results:
        rows = [("fusion", e) for e in result.missing + result.errors]
        update_errors(result.output / ERRORS_FILE, run.key, ["fusion"], rows)
