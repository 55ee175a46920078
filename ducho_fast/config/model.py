"""The resolved config: frozen descriptions that the exporters and the runtime read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Layer = str | int


@dataclass(frozen=True)
class ModelSpec:
    """One entry of a ``model`` list, with defaults applied and local paths resolved."""

    modality: str
    origin: str
    key_path: str
    model_name: str
    backend: str
    backend_dir: str
    output_layers: tuple[Layer, ...]
    batch_size: int
    reshape: tuple[int, int] | None = None
    preprocessing: str | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    clear_text: bool = False
    tokenizer_name: str | None = None
    weights: str | None = None
    architecture: str | None = None
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    trust: bool = False
    max_length: int | None = None
    local_path: Path | None = None
    weights_path: Path | None = None

    @property
    def model_dir(self) -> str:
        """Ducho's ``<model dir>``: file stem for visual models, the name verbatim otherwise."""
        if self.modality == "visual":
            return (
                Path(self.model_name).stem if _looks_like_file(self.model_name) else self.model_name
            )
        return self.model_name


def _looks_like_file(name: str) -> bool:
    return "/" in name or "\\" in name or Path(name).suffix != ""


@dataclass(frozen=True)
class Job:
    """One modality block (``visual.items`` …): its data, its outputs and its models."""

    modality: str
    origin: str
    input_path: Path
    output_path: Path
    models: tuple[ModelSpec, ...]
    item_column: str | None = None
    text_column: str | None = None

    @property
    def name(self) -> str:
        return f"{self.modality}.{self.origin}"


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"
    allow_fallback: bool = True
    threads: int = 0
    prefetch: int = 4
    workers: int = 0
    on_error: str = "skip"


@dataclass(frozen=True)
class OutputOptions:
    squeeze: bool = False


@dataclass(frozen=True)
class Config:
    """A whole validated config: the jobs to run and how to run them."""

    source: str
    dataset_path: Path
    store: Path
    jobs: tuple[Job, ...]
    runtime: RuntimeOptions
    output: OutputOptions
    resolved: dict[str, Any]

    def models(self) -> list[ModelSpec]:
        return [m for job in self.jobs for m in job.models]
