"""Exporters: one module per source framework over shared conversion and parity code.

Nothing here imports torch, TensorFlow or transformers at module level; adapters import their
framework inside functions.
"""

from __future__ import annotations

from pathlib import Path

from ducho_fast.config.model import ModelSpec
from ducho_fast.exporters.base import Exporter, ExportResult, export_with
from ducho_fast.exporters.registry import get_exporter, list_backends


def export_model(spec: ModelSpec, store: Path, *, force: bool = False) -> list[ExportResult]:
    """Export one config entry to parity-checked artifacts (reused when already valid).

    One artifact per graph: a two-tower model gives one per tower, from one loaded model.
    """
    exporter = exporter_for(spec)
    return [export_with(exporter, graph, store, force=force) for graph in spec.towers()]


def exporter_for(spec: ModelSpec) -> Exporter:
    """The adapter of a config entry's framework and modality."""
    suffix = {"visual_textual": "_two_tower", "audio": "_audio"}.get(spec.modality, "")
    exporter: Exporter = get_exporter(spec.backend + suffix)
    return exporter


__all__ = ["ExportResult", "export_model", "exporter_for", "list_backends"]
