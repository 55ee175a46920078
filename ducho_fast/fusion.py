"""Fusion of per-item features: ``concat | sum | mul | mean`` as Ducho 2.0, joined by item id.

Inputs are folders of ``<id>.npy`` files (one modality's features each); the fused feature of
an id is written only when every input has it, and ids missing from some input are reported.
Ducho computes on its (1, D) arrays: concat along the feature axis, element-wise sum and
product, and ``np.mean`` over the stacked inputs; the same numpy operations run here, for every
batch size (Ducho writes the visual embedding unfused when a batch holds one item).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.artifact import Artifact, varies_per_item
from ducho_fast.config.model import (
    Config,
    FusionInput,
    FusionSpec,
    Job,
    Layer,
    ModelSpec,
    OutputOptions,
    layer_label,
)
from ducho_fast.data.ids import EXACT, name_folding
from ducho_fast.data.items import Item, ItemError
from ducho_fast.data.sources import check_ids
from ducho_fast.data.visual.images import human_key
from ducho_fast.errors import ConfigError, DataError
from ducho_fast.outputs.atomic import NpyFiles
from ducho_fast.outputs.ducho import (
    check_range,
    layer_dir,
    layer_parts,
    load_feature,
    save_feature,
)
from ducho_fast.outputs.lock import FolderLocks
from ducho_fast.outputs.manifest import (
    OutputFolder,
    check_complete,
    feature_path,
    features,
    open_folder,
    read_manifest,
    written_under,
)
from ducho_fast.outputs.matrix import MATRIX_DIR, MatrixResult
from ducho_fast.progress import ProgressFactory, Ticks, shown

ELEMENTWISE = ("sum", "mul", "mean")
TICK_ITEMS = 64  # the progress moves every this many fused items


@dataclass
class FusionResult:
    """What one fusion wrote, and which ids it could not fuse (and why)."""

    output: Path
    written: int = 0
    reused: int = 0  # fused by an earlier run from the same input features
    ids: list[str] = field(default_factory=list)  # fused (now or before), in order
    matrix_dir: Path | None = None  # where output.layouts 'matrix' puts this fusion's matrix
    matrix: MatrixResult | None = None
    missing: list[ItemError] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)


def check_dims(dims: Sequence[int], labels: Sequence[str], mode: str, where: str) -> None:
    """Element-wise fusion needs one dimension; said before any work starts."""
    if mode in ELEMENTWISE and len(set(dims)) > 1:
        shown = ", ".join(f"{label} ({d})" for label, d in zip(labels, dims, strict=True))
        raise ConfigError(
            f"'{where}': fusion '{mode}' is element-wise and needs features of one dimension; "
            f"found {shown}. Use fusion: concat, or choose layers of equal size."
        )


def fuse(vectors: Sequence[np.ndarray], mode: str, *, normalize: bool = False) -> np.ndarray:
    """Fuse one item's features (each (D,) or (1, D)) into a (1, D') float32 array."""
    rows = [_row(v) for v in vectors]
    if normalize:
        rows = [_unit(r) for r in rows]
    if mode == "concat":
        return np.concatenate(rows, axis=1)
    if len({r.shape for r in rows}) > 1:
        raise DataError(f"'{mode}' needs equal shapes, found {[r.shape[1] for r in rows]}")
    stacked = np.stack(rows)
    if mode == "sum":
        return np.sum(stacked, axis=0)
    if mode == "mul":
        return np.prod(stacked, axis=0)
    if mode == "mean":
        return np.mean(stacked, axis=0)
    raise ConfigError(f"unknown fusion mode {mode!r}; allowed: concat, sum, mul, mean.")


def _row(value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":  # a complex one lost its imaginary part
        raise DataError(f"fusion needs features of real numbers, found an array of {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if array.ndim == 0 or array.size != array.shape[-1]:
        raise DataError(
            f"fusion needs one vector per item, found an array of shape {array.shape} "
            "(token- or patch-level features); fuse pooled layers instead"
        )
    return array.reshape(1, -1)


def _unit(row: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(row))
    return row / np.float32(norm) if norm > 0 else row


def feature_ids(folder: Path) -> dict[str, int]:
    """``{id: when written}`` for the features of an input folder, refusing an unfinished
    run's."""
    if not folder.is_dir():
        raise DataError(
            f"feature folder {folder} does not exist. Extract that modality first, or fix the "
            "fusion input."
        )
    check_complete(folder)
    return features(folder)


def fuse_folders(
    folders: Sequence[Path],
    output: Path,
    mode: str,
    *,
    normalize: bool = False,
    options: OutputOptions | None = None,
    where: str = "fusion",
    order: Sequence[str] | None = None,
    progress: ProgressFactory | None = None,
) -> FusionResult:
    """Fuse the features every folder has for an id into ``output/<id>.npy``.

    A fused file is reused when an earlier run made it with the same fusion settings from the
    same input folders and settings, after every input feature it reads was written (an input
    embedded again is fused again); other settings remake every file.

    Args:
        order: ids in the order to write; by default the first folder's, in Ducho's natural
            order (``img2`` before ``img10``), as an image folder is read.
        progress: shows the ids fused now (not those reused), labelled with ``where``.
    """
    options = options or OutputOptions()
    found = [feature_ids(f) for f in folders]
    result = FusionResult(output)
    ids = [i for i in (order or sorted(found[0], key=human_key)) if all(i in f for f in found)]
    result.missing = _missing(found, folders, set(ids))
    ids, result.errors = _nameable(ids, folders[0], output)
    if ids:
        first = [load_feature(feature_path(folder, ids[0])) for folder in folders]
        check_dims([a.shape[-1] for a in first], [str(f) for f in folders], mode, where)
    key = _fusion_key(folders, mode, normalize, options)
    with FolderLocks(f"ducho-fast fusion '{where}'") as locks:  # another run fusing into it
        locks.take(output)
        record = open_folder(
            output, key, resume=written_under(output, key), what=f"fusion '{where}'"
        )
        todo = sum(not _reusable(record, i, [f[i] for f in found]) for i in ids)
        files = NpyFiles()  # into the folder open_folder made
        before = f" ({len(ids) - todo} of {len(ids)} done before)" if todo < len(ids) else ""
        with shown(progress, f"{where} {mode} -> {output.name}{before}", todo) as tick:
            ticks = Ticks(tick, TICK_ITEMS)
            for item_id in ids:
                inputs = [
                    (feature_path(d, item_id), f[item_id])
                    for d, f in zip(folders, found, strict=True)
                ]
                if not _fuse_item(result, record, item_id, inputs, mode, normalize, options, files):
                    ticks.add()
            ticks.flush()
        counts = {
            "fused": result.written,
            "reused": result.reused,
            "failed": len(result.errors),
            "missing": len(result.missing),
        }
        record.finish(counts, inputs=[str(f) for f in folders])
    return result


def _nameable(ids: list[str], folder: Path, output: Path) -> tuple[list[str], list[ItemError]]:
    """The ids whose fused files the output folder's file system holds apart and takes, and
    an error for each other one: inputs on a file system telling ``B00X`` and ``b00x`` apart
    and an output ignoring case would otherwise fuse both into one file, the second over the
    first."""
    folding = name_folding([output])
    if folding == EXACT:
        return ids, []
    named = (Item(i, str(feature_path(folder, i)), None) for i in ids)
    checked = check_ids(named, [], folding=folding)
    return [item.item_id for item in checked.good], checked.bad


def _fuse_item(
    result: FusionResult,
    record: OutputFolder,
    item_id: str,
    inputs: list[tuple[Path, int]],
    mode: str,
    normalize: bool,
    options: OutputOptions,
    files: NpyFiles,
) -> bool:
    """Fuse one id's input features into ``record``'s folder, or reuse its fused file:
    True when it was reused."""
    if _reusable(record, item_id, [written for _, written in inputs]):
        result.reused += 1
        result.ids.append(item_id)
        return True
    try:
        fused = fuse([_finite_feature(path) for path, _ in inputs], mode, normalize=normalize)
        check_range(fused, options.dtype, "the fused features")
    except (DataError, ValueError, OSError) as e:
        result.errors.append(ItemError(item_id, str(inputs[0][0]), str(e)))
        return False
    target = record.path / f"{item_id}.npy"
    try:
        save_feature(target, fused[0] if options.squeeze else fused, options.dtype, files)
    except DataError as e:  # a name its file system refuses; any other failure stops the run
        result.errors.append(ItemError(item_id, str(inputs[0][0]), str(e)))
        return False
    result.written += 1
    result.ids.append(item_id)
    return False


def _reusable(record: OutputFolder, item_id: str, inputs_written: Sequence[int]) -> bool:
    """Whether an id's fused file was written after every input feature it reads (when
    each was written: ``st_mtime_ns``)."""
    return record.written.get(item_id, -1) >= max(inputs_written)


def _finite_feature(path: Path) -> np.ndarray:
    """An input's feature; one holding NaN or infinity (an input folder not made by
    ``extract``, which refuses such outputs) fails its item instead of being fused."""
    feature = load_feature(path)
    if np.issubdtype(feature.dtype, np.number) and not np.isfinite(feature).all():
        raise DataError(
            f"{path} holds NaN or infinite values, which fusing would pass on; remake or remove it"
        )
    return feature


def _fusion_key(
    folders: Sequence[Path], mode: str, normalize: bool, options: OutputOptions
) -> dict[str, Any]:
    inputs = []
    for folder in folders:
        manifest = read_manifest(folder)
        inputs.append({"folder": str(folder), "key": manifest and manifest.get("key_sha256")})
    return {
        "fusion": mode,
        "normalize": normalize,
        "inputs": inputs,
        "dtype": options.dtype,
        "squeeze": options.squeeze,
    }


def _missing(
    found: list[dict[str, int]], folders: Sequence[Path], fused: set[str]
) -> list[ItemError]:
    missing = []
    for index, present in enumerate(found):
        for item_id in present:
            if item_id in fused:
                continue
            absent = [str(folders[j]) for j, f in enumerate(found) if item_id not in f]
            if absent and index == min(j for j, f in enumerate(found) if item_id in f):
                reason = f"not fused: no feature in {', '.join(absent)}"
                origin = str(feature_path(folders[index], item_id))
                missing.append(ItemError(item_id, origin, reason))
    return missing


# -- fusions a config asks for ---------------------------------------------------------------


@dataclass
class FusionRun:
    """One configured fusion: a two-tower model's ``fusion`` key, or a ``fusion`` entry."""

    key: str
    mode: str
    results: list[FusionResult] = field(default_factory=list)


def fused_root(job: Job, spec: ModelSpec) -> Path:
    """Ducho's ``<visual_out>_<textual_out>_<fusion>`` folder."""
    assert job.text_output_path is not None and spec.fusion is not None
    return (
        job.output_path.parent / f"{job.output_path.name}_{job.text_output_path.name}_{spec.fusion}"
    )


def fused_dir(job: Job, spec: ModelSpec, layer: Layer) -> Path:
    """Ducho's ``<visual_out>_<textual_out>_<fusion>/<backend>/<model dir>/<layer>``."""
    return fused_root(job, spec).joinpath(*layer_parts(spec, layer_label(layer)))


def tower_fusion(
    job: Job,
    spec: ModelSpec,
    options: OutputOptions,
    ids: Sequence[str] | None = None,
    progress: ProgressFactory | None = None,
) -> FusionRun:
    """Fuse a two-tower model's image and text features, layer by layer."""
    assert spec.fusion is not None
    image, text = spec.towers()
    run = FusionRun(spec.key_path, spec.fusion)
    for layer in spec.output_layers:
        folders = [
            layer_dir(job, image, layer_label(layer, "image")),
            layer_dir(job, text, layer_label(layer, "text")),
        ]
        out = fused_dir(job, spec, layer)
        where = f"{spec.key_path}.fusion"
        result = fuse_folders(
            folders, out, spec.fusion, options=options, where=where, order=ids, progress=progress
        )
        parts = layer_parts(spec, layer_label(layer))
        result.matrix_dir = fused_root(job, spec).joinpath(MATRIX_DIR, *parts)
        run.results.append(result)
    return run


def section_fusion(
    cfg: Config, fusion: FusionSpec, progress: ProgressFactory | None = None
) -> FusionRun:
    """Run one entry of the top-level ``fusion`` section over existing features."""
    folders = [_folder(cfg, i) for i in fusion.inputs]
    result = fuse_folders(
        folders,
        fusion.output_path,
        fusion.mode,
        normalize=fusion.normalize,
        options=cfg.output,
        where=fusion.key_path,
        progress=progress,
    )
    result.matrix_dir = fusion.output_path / MATRIX_DIR
    return FusionRun(fusion.key_path, fusion.mode, [result])


def _folder(cfg: Config, source: FusionInput) -> Path:
    if source.folder is not None:
        return source.folder
    job, spec = _entry(cfg, source)
    assert source.layer is not None
    return layer_dir(job, spec, source.layer)


def _entry(cfg: Config, source: FusionInput) -> tuple[Job, ModelSpec]:
    for job in cfg.jobs:
        for spec in job.models:
            if spec.key_path == source.model_key:
                return job, spec
    raise ConfigError(f"no model entry {source.model_key!r}")  # config loading checked this


def check_fusion_dims(cfg: Config, artifacts: Mapping[str, Artifact]) -> None:
    """Every configured fusion's dimensions, from the artifacts, before any work starts.

    ``artifacts`` maps ``graph_name(spec)`` to the artifact exported for that graph.
    """
    for spec in cfg.models():
        if spec.fusion is None:
            continue
        image, text = spec.towers()
        for layer in spec.output_layers:
            outs = [
                artifacts[graph_name(image)].output(layer_label(layer, "image")),
                artifacts[graph_name(text)].output(layer_label(layer, "text")),
            ]
            _check_outputs(outs, ["image tower", "text tower"], spec.fusion, spec.key_path)
    for fusion in cfg.fusions:
        refs = [i for i in fusion.inputs if i.model_key is not None]
        if len(refs) < 2:
            continue  # folders are checked on their first item, before anything is written
        outs = [artifacts[graph_name(_entry(cfg, i)[1])].output(str(i.layer)) for i in refs]
        _check_outputs(outs, [i.label for i in refs], fusion.mode, fusion.key_path)


def _check_outputs(outs: list[dict[str, Any]], labels: list[str], mode: str, where: str) -> None:
    for out, label in zip(outs, labels, strict=True):
        shape = out.get("item_shape") or [out["dim"]]
        if varies_per_item(out) or sum(1 for d in shape if d != 1) > 1:
            raise ConfigError(
                f"'{where}': {label} layer '{out['layer']}' gives token-, frame- or patch-level "
                f"features {shape}; fusion needs one vector per item. Fuse pooled layers."
            )
    check_dims([int(o["dim"]) for o in outs], labels, mode, where)


def graph_name(spec: ModelSpec) -> str:
    """A key for one graph of a config: the entry's key path, plus the tower if any."""
    return f"{spec.key_path}[{spec.tower}]" if spec.tower else spec.key_path
