"""What a model entry of a config may say: values in range, and keys its model reads.

Run by :func:`ducho_fast.config.load.load_config` on each entry, after its defaults are
applied (``check_model``) and against the keys the entry writes itself (``check_applies``).
"""

from __future__ import annotations

from typing import Any

from ducho_fast.config.model import ModelSpec
from ducho_fast.config.schema import MODALITIES
from ducho_fast.errors import ConfigError

# Keys of ducho-fast's own that only some models read, and those models (modality, backend).
# Any other model would ignore them, silently: a text model's `weights` (its fine-tuned
# state dict) or `architecture` left the pretrained model in place. Ducho's own keys
# (reshape, clear_text, task, preprocessing) stay accepted anywhere, as Ducho takes them.
APPLIES: dict[str, tuple[tuple[str, str], ...]] = {
    "weights": (("visual", "torch"), ("visual", "tensorflow"), ("audio", "torch")),
    "architecture": (("visual", "torch"), ("audio", "torch")),
    "architecture_kwargs": (("visual", "torch"), ("visual", "tensorflow"), ("audio", "torch")),
    "tokenizer_name": (("textual", "transformers"), ("visual_textual", "transformers")),
    "image_processor": (("visual_textual", "transformers"),),
    "max_length": (
        ("textual", "transformers"),
        ("textual", "sentence_transformers"),
        ("visual_textual", "transformers"),
    ),
}


def entry_keys(raw: dict[str, Any]) -> dict[str, set[str]]:
    """The keys each model entry of ``raw`` writes itself, by its key path."""
    keys: dict[str, set[str]] = {}
    for modality in MODALITIES:
        for origin, block in (raw.get(modality) or {}).items():
            if isinstance(block, dict) and isinstance(block.get("model"), list):
                for i, entry in enumerate(block["model"]):
                    if isinstance(entry, dict):
                        keys[f"{modality}.{origin}.model.{i}"] = set(entry)
    return keys


def check_applies(spec: ModelSpec, written: set[str], name: str) -> None:
    """Refuse a key the entry writes that its model would ignore (``APPLIES``). From the
    top-level ``model`` defaults, such a key applies only where it can."""
    for key, models in APPLIES.items():
        if key in written and (spec.modality, spec.backend) not in models:
            takers = ", ".join(f"{m} {b}" for m, b in models)
            fix = (
                " A Transformers model's weights are those model_name names: save the "
                "fine-tuned model with save_pretrained and name its folder."
                if key.startswith(("weights", "architecture"))
                and spec.backend in ("transformers", "sentence_transformers")
                else ""
            )
            raise ConfigError(
                f"{name}: key '{spec.key_path}.{key}' does not apply to {spec.modality} models "
                f"of backend {spec.backend}, which would ignore it; only {takers} models read "
                f"it. Remove it.{fix}"
            )


def check_model(spec: ModelSpec, raw: dict[str, Any], name: str) -> None:
    where = spec.key_path
    if spec.batch_size < 1:
        raise ConfigError(f"{name}: key '{where}.batch_size' must be >= 1.")
    if spec.max_length is not None and spec.max_length < 2:
        raise ConfigError(f"{name}: key '{where}.max_length' must be >= 2.")
    numbered = any(isinstance(x, int) for x in spec.output_layers)
    if spec.backend == "torch" and spec.modality == "visual" and numbered:
        raise ConfigError(
            f"{name}: key '{where}.output_layers' must name torch layers, not indices "
            f"(found {list(spec.output_layers)!r}). Hint: run "
            f"`ducho-fast layers torch {spec.model_name}`"
        )
    if spec.modality != "audio" and ({"pooling", "max_seconds", "sample_rate"} & set(raw)):
        raise ConfigError(
            f"{name}: keys '{where}.pooling', '.max_seconds' and '.sample_rate' apply to audio "
            "models only."
        )
    if spec.sample_rate is not None and (spec.sample_rate < 1 or spec.backend != "torch"):
        raise ConfigError(
            f"{name}: key '{where}.sample_rate' must be >= 1 and is for torch audio model "
            "files only (Transformers models and torchaudio bundles know their rate)."
        )
    if spec.max_seconds is not None and spec.max_seconds <= 0:
        raise ConfigError(f"{name}: key '{where}.max_seconds' must be > 0.")
    if spec.modality == "visual_textual":
        _check_two_tower(spec, raw, name)
    elif spec.fusion is not None:
        raise ConfigError(
            f"{name}: key '{where}.fusion' only applies to visual_textual models. To fuse "
            "separately extracted modalities, add a top-level 'fusion' entry (see the README)."
        )
    keras_only = ("caffe", "tf", "torch", "raw", "unit")
    if spec.preprocessing in keras_only and spec.backend != "tensorflow":
        raise ConfigError(
            f"{name}: key '{where}.preprocessing' is '{spec.preprocessing}', a Keras scheme for "
            "backend: tensorflow. Torch models take zscore, minmax or nothing (x / 255)."
        )
    if ("mean" in raw or "std" in raw) and spec.preprocessing != "zscore":
        raise ConfigError(
            f"{name}: '{where}' sets mean/std, which only apply with preprocessing: zscore "
            f"(found preprocessing: {spec.preprocessing})."
        )
    if len(spec.mean) != 3 or len(spec.std) != 3 or any(s == 0 for s in spec.std):
        raise ConfigError(
            f"{name}: '{where}.mean' and '.std' need three values each, std without zeros."
        )


def _check_two_tower(spec: ModelSpec, raw: dict[str, Any], name: str) -> None:
    for key in ("reshape", "preprocessing", "mean", "std", "architecture", "weights"):
        if raw.get(key) is not None:
            raise ConfigError(
                f"{name}: key '{spec.key_path}.{key}' does not apply to visual_textual models: "
                "their image processor (resize, crop, normalization) comes with the model. "
                "Remove the key, or name another processor with image_processor."
            )
