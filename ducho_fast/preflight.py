"""What ``extract`` checks of a config and its artifacts before any work starts, and the
locks it takes on the folders it writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ducho_fast.artifact import Artifact, varies_per_item
from ducho_fast.config import Config, Job, ModelSpec
from ducho_fast.config.model import layer_label
from ducho_fast.config.paths import too_long
from ducho_fast.data.ids import FolderNames
from ducho_fast.errors import ArtifactError, ConfigError
from ducho_fast.fusion import fused_dir, graph_name
from ducho_fast.outputs.ducho import layer_dir
from ducho_fast.outputs.lock import FolderLocks
from ducho_fast.outputs.manifest import check_folder
from ducho_fast.runtime.shard import Shard


def check_matrix_layers(cfg: Config, artifacts: dict[str, Artifact]) -> None:
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


def check_output_folders(cfg: Config, artifacts: dict[str, Artifact]) -> None:
    for job, graph, label in _output_layers(cfg):
        key = feature_key(cfg, graph, artifacts[graph_name(graph)], label)
        path = layer_dir(job, graph, label)
        check_folder(path, key, resume=cfg.output.resume, what=f"'{graph.key_path}'")


def check_distinct_folders(cfg: Config) -> None:
    """Each folder of features and each fusion's folder has one writer: two writing one would
    replace or remove each other's files (``--fresh`` removes the first one's as the second
    starts), and a fusion must not write into a folder it reads."""
    names = FolderNames()  # ``out/ResNet50`` is ``out/resnet50`` where case is ignored
    writers: dict[str, tuple[str, str | None, Path]] = {}
    for path, this, block in _written_folders(cfg):
        if too_long(path):  # each check of the folder would end the run in a traceback
            raise ConfigError(
                f"{this} would write {path}, longer than its file system allows (a name over "
                "255 bytes, or a whole path of 4096 or more).\nHint: shorten the output_path, or "
                "the name of the layer (output_layers) or of the model."
            )
        key = names.key(path)
        if key not in writers:
            writers[key] = (this, block, path)
            continue
        first, first_block, first_path = writers[key]
        if first == this:
            raise ConfigError(f"{this} is listed twice in output_layers: list it once.")
        also = _as_one(first_path, path, names)
        if block is None:
            hint = f"give {this} another output_path."
        elif block == first_block and also:  # ``Conv1`` and ``conv1``: not one model twice
            hint = (
                "their folders' names differ only where the file system there takes them as "
                "one: extract one of them in a second config with another output_path, or "
                "write to a file system that tells them apart."
            )
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
            f"{first} and {this} would both write {path}{also}, "
            f"so one's files would replace or remove the other's{named}.\nHint: {hint}"
        )
    for fusion in cfg.fusions:
        read = [names.key(i.folder) for i in fusion.inputs if i.folder is not None]
        if names.key(fusion.output_path) in read:
            raise ConfigError(
                f"'{fusion.key_path}' would write its fused features into {fusion.output_path}, "
                f"which it reads as an input.\nHint: give '{fusion.key_path}.output_path' "
                "another folder."
            )


def _as_one(first: Path, path: Path, names: FolderNames) -> str:
    """Where two folders are one only to their file system, the words that say so."""
    if first.resolve() == path.resolve():
        return ""
    return f" (also named {first}: the file system there {names.folds(path).describe()})"


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


def lock_output_folders(cfg: Config, part: Shard | None) -> FolderLocks:
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


def feature_key(cfg: Config, spec: ModelSpec, artifact: Artifact, label: str) -> dict[str, Any]:
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


def check_layers(spec: ModelSpec, artifact: Artifact) -> None:
    have = {str(o["layer"]) for o in artifact.manifest["outputs"]}
    missing = [x for x in spec.layer_labels() if x not in have]
    if missing:
        raise ArtifactError(
            f"'{spec.key_path}': artifact {artifact.path.name} has no layer(s) {missing}. "
            "Hint: run `ducho-fast export CONFIG` again."
        )
