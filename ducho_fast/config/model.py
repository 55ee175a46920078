"""The resolved config: frozen descriptions that the exporters and the runtime read."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

Layer = str | int | tuple[str, str]  # a tuple: (image tower path, text tower path)
TOWERS = ("image", "text")


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
    fusion: str | None = None
    image_processor: str | None = None
    tower: str | None = None  # "image" | "text": one tower of a visual_textual model
    pooling: str | None = None  # audio: "mean" | "max" over time; None keeps the time axis
    max_seconds: float | None = None  # audio: embed only the first seconds
    sample_rate: int | None = None  # audio torch files: the rate the model expects
    precision: str = "fp32"  # fp32 | fp16 | int8 | bf16: the exported graph's weights and math

    @property
    def model_dir(self) -> str:
        """Ducho's ``<model dir>``: file stem for visual models, the name verbatim otherwise."""
        if self.modality == "visual":
            return (
                Path(self.model_name).stem if _looks_like_file(self.model_name) else self.model_name
            )
        return self.model_name

    def towers(self) -> tuple[ModelSpec, ...]:
        """The specs ``export`` and ``extract`` work on: each tower of a two-tower model."""
        if self.modality != "visual_textual" or self.tower is not None:
            return (self,)
        return tuple(replace(self, tower=t) for t in TOWERS)

    def layer_labels(self) -> list[str]:
        """The ``<layer>`` folder names, one per ``output_layers`` entry."""
        return [layer_label(layer, self.tower) for layer in self.output_layers]

    def tower_layers(self) -> list[str]:
        """This tower's ``output_layers`` as graph paths (two-tower models only)."""
        return [tower_path(layer, self.tower or "image") for layer in self.output_layers]


def layer_label(layer: Layer, tower: str | None = None) -> str:
    """Ducho's ``<layer>`` folder name: ``str(output_layer)``; a pair names each tower's path."""
    if isinstance(layer, tuple):
        return layer[0] if tower == "image" else layer[1] if tower == "text" else "+".join(layer)
    return str(layer)


def tower_path(layer: Layer, tower: str) -> str:
    """What a two-tower layer means for one tower.

    An integer is the projected, normalized embedding (``image_embeds`` / ``text_embeds``); a
    ``vision_model_output.X`` path implies ``text_model_output.X`` for the text tower and back.
    """
    if isinstance(layer, tuple):
        return layer[0] if tower == "image" else layer[1]
    if isinstance(layer, int) or layer in ("image_embeds", "text_embeds"):
        return "image_embeds" if tower == "image" else "text_embeds"
    head, _, rest = layer.partition(".")
    if head in ("vision_model_output", "text_model_output"):
        return f"{'vision' if tower == 'image' else 'text'}_model_output.{rest}"
    return layer


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
    # textual.interactions: the user and item id columns (None: the first two columns).
    interaction_columns: tuple[str, str] | None = None
    # visual_textual blocks: input_path/output_path above are the visual ones.
    text_input_path: Path | None = None
    text_output_path: Path | None = None
    unpaired: str = "skip"

    @property
    def name(self) -> str:
        return f"{self.modality}.{self.origin}"


@dataclass(frozen=True)
class FusionInput:
    """One side of a fusion: a folder of per-item ``.npy`` files, maybe a model's output."""

    label: str
    folder: Path | None  # None: the output folder of ``model_key``'s ``layer``
    model_key: str | None = None  # ``visual.items.model.0`` when it names a config entry
    layer: str | None = None


@dataclass(frozen=True)
class FusionSpec:
    """A ``fusion`` entry: features of separately extracted modalities, joined by item id."""

    key_path: str
    inputs: tuple[FusionInput, ...]
    mode: str
    normalize: bool
    output_path: Path


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"
    allow_fallback: bool = True
    threads: int = 0
    prefetch: int = 4
    workers: int = 0
    readers: str = "threads"  # images/audio: threads | processes (decoder crashes isolated)
    writers: int = 0  # threads saving features; 0: 1, up to 8 as they fall behind the model
    token_budget: int = 0  # text: max rows x padded length per batch; 0: batch_size x 64
    sort_window: int = 0  # text: batches per length-sorted window; 0: 64
    concurrent_batches: int = 0  # CPU: batches run at once; 0: automatic (see batch_lanes)
    io_binding: str = "auto"  # auto (on for CUDA) | on | off
    spin_wait: str = "auto"  # auto (off while images/audio decode beside) | on | off
    cuda_options: dict[str, Any] = field(default_factory=dict)  # CUDA provider options
    memory_limit: str = "auto"  # CPU: ORT's activations; auto | off | a size (8GB, 512MiB)
    on_error: str = "skip"


@dataclass(frozen=True)
class OutputOptions:
    squeeze: bool = False
    layouts: tuple[str, ...] = ("ducho",)
    dtype: str = "float32"
    id_order: Path | None = None
    resume: bool = True

    @property
    def matrix(self) -> bool:
        return "matrix" in self.layouts


@dataclass(frozen=True)
class InputOptions:
    exif_orientation: str = "apply"
    jpeg_decode: str = "full"  # reduced: libjpeg's 1/2, 1/4, 1/8 scales, never below the input
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold
    max_audio_seconds: float = 600.0  # longer files are bad items unless max_seconds crops them


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
    fusions: tuple[FusionSpec, ...] = ()
    input: InputOptions = InputOptions()

    def models(self) -> list[ModelSpec]:
        return [m for job in self.jobs for m in job.models]

    def graphs(self) -> list[ModelSpec]:
        """One spec per exported graph: two-tower models count twice."""
        return [t for m in self.models() for t in m.towers()]
