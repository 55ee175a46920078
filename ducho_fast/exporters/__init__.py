"""Exporters: one module per source framework over shared conversion and parity code.

Nothing here imports torch, TensorFlow or transformers at module level; adapters import their
framework inside functions.
"""

from __future__ import annotations

from pathlib import Path

from ducho_fast.config.model import ModelSpec
from ducho_fast.exporters.base import ExportResult, export_with
from ducho_fast.exporters.registry import get_exporter, list_backends


def export_model(spec: ModelSpec, store: Path, *, force: bool = False) -> ExportResult:
    """Export one config entry to a parity-checked artifact (reused when already valid)."""
    return export_with(get_exporter(spec.backend), spec, store, force=force)


__all__ = ["ExportResult", "export_model", "list_backends"]
