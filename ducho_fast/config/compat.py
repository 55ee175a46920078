"""Ducho v1/v2 spellings, rewritten to the one form the schema checks.

Ducho accepts loose YAML: lists of one-key mappings where a mapping is meant, ``name`` for
``model_name``, ``interaction_column`` (Ducho's name for the review column) for
``text_column``, scalars where lists are meant. Each rewrite here is one of those, so any
Ducho config passes through unchanged in meaning.
"""

from __future__ import annotations

from typing import Any

from ducho_fast.config.schema import MODALITIES, ORIGINS

_MODEL_RENAMES = {"name": "model_name", "image_processor_name": "image_processor"}
# Lists whose mappings are separate entries, never merged into one.
_LISTS_OF_MAPPINGS = ("model", "output_layers", "fusion")


def normalize(raw: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` in ducho-fast's canonical spelling."""
    data = _flatten(raw)
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


def _flatten(value: Any, key: str = "") -> Any:
    """Merge Ducho's lists of mappings into one mapping, except under ``model``."""
    if isinstance(value, dict):
        return {k: _flatten(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        items = [_flatten(v, key) for v in value]
        if key not in _LISTS_OF_MAPPINGS and items and all(isinstance(v, dict) for v in items):
            merged: dict[str, Any] = {}
            for v in items:
                merged.update(v)
            return merged
        return items
    return value


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
