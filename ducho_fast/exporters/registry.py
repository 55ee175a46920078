"""Backend name -> exporter class, imported lazily so the CLI never imports a framework."""

from __future__ import annotations

import importlib
from typing import Any

from ducho_fast.errors import ConfigError, did_you_mean

_EXPORTERS: dict[str, str] = {}


def register(backend: str, target: str) -> None:
    """Register ``'package.module:Class'`` for ``backend``; a second registration is an error."""
    if backend in _EXPORTERS:
        raise ValueError(f"exporter for backend {backend!r} is already registered")
    _EXPORTERS[backend] = target


def list_backends() -> list[str]:
    return sorted(_EXPORTERS)


def get_exporter(backend: str) -> Any:
    if backend not in _EXPORTERS:
        raise ConfigError(
            f"no exporter for backend '{backend}'.{did_you_mean(backend, _EXPORTERS)} "
            f"Available: {', '.join(list_backends())}."
        )
    module, _, name = _EXPORTERS[backend].partition(":")
    return getattr(importlib.import_module(module), name)()


register("torch", "ducho_fast.exporters.pt:TorchExporter")
register("transformers", "ducho_fast.exporters.hf:TransformersExporter")
register("sentence_transformers", "ducho_fast.exporters.st:SentenceTransformersExporter")
register("transformers_two_tower", "ducho_fast.exporters.hf_towers:TowersExporter")
register("transformers_audio", "ducho_fast.exporters.hf_audio:AudioExporter")
register("tensorflow", "ducho_fast.exporters.tf:KerasExporter")
register("torch_audio", "ducho_fast.exporters.pt_audio:TorchAudioExporter")
