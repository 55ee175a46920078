"""Ducho v1/v2 spellings, rewritten to the one form the schema checks.

Ducho accepts loose YAML: lists of one-key mappings where a mapping is meant, ``name`` for
``model_name``, ``interaction_column`` (Ducho's name for the review column) for
``text_column``, scalars where lists are meant. Each rewrite here is one of those, so any
Ducho config passes through unchanged in meaning.
"""

from __future__ import annotations

from typing import Any

from ducho_fast.config.schema import MODALITIES, ORIGINS
from ducho_fast.errors import ConfigError

_MODEL_RENAMES = {"name": "model_name", "image_processor_name": "image_processor"}
# Lists whose mappings are separate entries, never merged into one.
_LISTS_OF_MAPPINGS = ("model", "output_layers", "fusion")
# Mappings passed on as they are (to a model's builder, to ONNX Runtime): a list of mappings
# in them is an argument's value, such as a network's blocks, not a loose spelling.
_VERBATIM = ("architecture_kwargs", "cuda_options")


def normalize(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    """Return a copy of ``raw`` in ducho-fast's canonical spelling; ``source`` names the
    file in errors."""
    data = _flatten(raw, "", source)
    if isinstance(data.get("fusion"), dict):
        data["fusion"] = [data["fusion"]]
    for modality in MODALITIES:
        section = data.get(modality)
        if not isinstance(section, dict):
            continue
        for origin in ORIGINS:
            block = section.get(origin)
            if isinstance(block, dict):
                section[origin] = _normalize_block(block)
    return data


def _flatten(value: Any, where: str, source: str, deep: bool = True) -> Any:
    """Merge Ducho's lists of mappings into one mapping, except under ``model``; a key that
    two of the mappings give is refused, as YAML's own mappings' are (which would keep
    only the last). ``deep=False``: that value alone, what it holds kept as written."""
    key = where.rsplit(".", 1)[-1]
    if isinstance(value, dict):
        if not deep:
            return value
        return {
            k: _flatten(v, f"{where}.{k}" if where else str(k), source, k not in _VERBATIM)
            for k, v in value.items()
        }
    if isinstance(value, list):
        items = (
            [_flatten(v, f"{where}.{i}", source) for i, v in enumerate(value)] if deep else value
        )
        if key not in _LISTS_OF_MAPPINGS and items and all(isinstance(v, dict) for v in items):
            return _merged(items, where, source)
        return items
    return value


def _merged(items: list[dict[str, Any]], where: str, source: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for i, v in enumerate(items):
        for k in v.keys() & merged.keys():
            first = next(j for j, w in enumerate(items[:i]) if k in w)
            raise ConfigError(
                f"{source}: key '{where}.{k}' is given twice, in entries {first} and {i} of "
                f"the list under '{where}', which are read as one mapping (the later would "
                "replace the earlier): give it once, merging what the two hold."
            )
        merged.update(v)
    return merged


def _normalize_block(block: dict[str, Any]) -> dict[str, Any]:
    out = dict(block)
    if "interaction_column" in out:
        # Ducho: the review column of textual.interactions; a list is our [user, item] spelling.
        value = out.pop("interaction_column")
        out["interaction_columns" if isinstance(value, list) else "text_column"] = value
    models = out.get("model")
    if isinstance(models, dict):
        models = [models]
    if isinstance(models, list):
        out["model"] = [_normalize_model(m) if isinstance(m, dict) else m for m in models]
    return out


def _normalize_model(model: dict[str, Any]) -> dict[str, Any]:
    out = {_MODEL_RENAMES.get(k, k): v for k, v in model.items()}
    layers = out.get("output_layers")
    if layers is not None and not isinstance(layers, list):
        out["output_layers"] = [layers]
    backend = out.get("backend")
    if isinstance(backend, list) and len(backend) == 1:
        out["backend"] = backend[0]
    return out
