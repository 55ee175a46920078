"""The top-level ``fusion`` section: fuse separately extracted modalities of the same items.

Each input is either a model entry of the same config (``visual.items.model.0``, optionally
``:layer``), whose Ducho output folder is then known, or a folder of per-item ``.npy`` files
relative to ``dataset_path`` (features extracted earlier, by ducho-fast or by Ducho).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ducho_fast.config.model import FusionInput, FusionSpec, Job, ModelSpec
from ducho_fast.config.paths import resolved
from ducho_fast.errors import ConfigError

_MODEL_REF = re.compile(r"^(?P<key>[a-z_]+\.(items|interactions)\.model\.\d+)(:(?P<layer>.+))?$")


def fusion_specs(
    entries: list[dict[str, Any]], jobs: tuple[Job, ...], name: str, dataset: Path
) -> tuple[FusionSpec, ...]:
    models = {m.key_path: m for job in jobs for m in job.models}
    return tuple(_spec(e, f"fusion.{i}", models, name, dataset) for i, e in enumerate(entries))


def _spec(
    entry: dict[str, Any], where: str, models: dict[str, ModelSpec], name: str, dataset: Path
) -> FusionSpec:
    for key in ("inputs", "mode", "output_path"):
        if entry.get(key) in (None, "", []):
            raise ConfigError(f"{name}: '{where}' needs the key '{where}.{key}'.")
    inputs = tuple(
        _input(text, f"{where}.inputs.{i}", models, name, dataset)
        for i, text in enumerate(entry["inputs"])
    )
    if len(inputs) < 2:
        raise ConfigError(f"{name}: '{where}.inputs' needs at least two inputs to fuse.")
    return FusionSpec(
        key_path=where,
        inputs=inputs,
        mode=entry["mode"],
        normalize=bool(entry.get("normalize", False)),
        output_path=resolved(dataset / entry["output_path"], name, f"{where}.output_path"),
    )


def _input(
    text: str, where: str, models: dict[str, ModelSpec], name: str, dataset: Path
) -> FusionInput:
    match = _MODEL_REF.match(text)
    if match is None:
        return FusionInput(label=text, folder=resolved(dataset / text, name, where))
    key, layer = match["key"], match["layer"]
    spec = models.get(key)
    if spec is None:
        known = ", ".join(sorted(models)) or "none"
        raise ConfigError(
            f"{name}: key '{where}' names the model entry '{key}', which this config does not "
            f"have (it has: {known}). Give a model entry or a folder of .npy features."
        )
    if spec.modality == "visual_textual":
        raise ConfigError(
            f"{name}: key '{where}' names a visual_textual model; fuse its two towers with "
            f"'{key}.fusion' instead."
        )
    labels = spec.layer_labels()
    if layer is not None and layer not in labels:
        raise ConfigError(
            f"{name}: key '{where}' asks for layer '{layer}' of '{key}', which extracts {labels}."
        )
    return FusionInput(label=text, folder=None, model_key=key, layer=layer or labels[0])
