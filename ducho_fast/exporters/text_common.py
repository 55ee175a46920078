"""What the two text adapters (Transformers, sentence-transformers) share."""

from __future__ import annotations

from typing import Any

from ducho_fast.errors import ExportError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SAMPLE_TEXTS = [
    "A lightweight waterproof jacket with taped seams and a packable hood.",
    "ok",
    "Stainless steel 12-cup coffee maker, programmable timer; keeps coffee hot for 2 hours!",
    "Livre de cuisine: 200 recettes faciles pour tous les jours. Édition illustrée.",
    "Great value. " * 40,
]

# What int8 calibrates on (SmoothQuant's activation peaks): apart from the parity samples, so
# the parity check measures text the calibration has not seen.
CALIBRATION_TEXTS = [
    "yes",
    "Men's running shoes, breathable mesh, size 42.",
    "Wireless noise-cancelling headphones with 30 hours of battery life and a carrying case.",
    "Hand-made ceramic mug",
    "Ce roman policier se déroule à Marseille dans les années 1950; une enquête haletante.",
    "Ergonomic office chair with lumbar support, adjustable armrests and breathable back. "
    "Assembly takes about 15 minutes; all tools are included in the box.",
    "4K",
    "Organic green tea, 100 bags. Smooth, slightly sweet taste.",
]


def fast_tokenizer(tokenizer: Any, where: str) -> Any:
    """The Rust tokenizer behind a Transformers tokenizer; the runtime needs its JSON."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"'{where}': the tokenizer {type(tokenizer).__name__} has no fast (Rust) version, "
            "which the ONNX runtime needs (tokenizer.json). Choose a model with a fast tokenizer."
        )
    return backend


def text_inputs(tokenizer: Any) -> list[str]:
    names = list(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
    return [n for n in TEXT_INPUTS if n in names or n in ("input_ids", "attention_mask")]


def max_length(requested: int | None, tokenizer: Any, positions: int | None) -> int:
    limits = [x for x in (getattr(tokenizer, "model_max_length", None), positions) if x]
    natural = min(x for x in limits if x < 1_000_000) if limits else 512
    return min(requested, natural) if requested else natural


def text_io(
    names: list[str], torch: Any
) -> tuple[tuple[Any, ...], dict[str, dict[int, str]], list[dict[str, Any]]]:
    """Example tensors, dynamic axes and manifest entries for int64 (batch, sequence) inputs."""
    # Token type 0 exists in every vocabulary; 1 does not (RoBERTa has one type).
    example = tuple(
        (torch.zeros if n == "token_type_ids" else torch.ones)((2, 8), dtype=torch.int64)
        for n in names
    )
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    spec = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in names]
    return example, axes, spec


def text_preprocessing(tokenizer: Any, limit: int, **extra: Any) -> dict[str, Any]:
    """The manifest's text preprocessing: what the runtime's TextEncoder rebuilds."""
    return {
        "tokenizer": "tokenizer.json",
        "max_length": limit,
        "pad_id": int(tokenizer.pad_token_id or 0),
        "padding": "dynamic (longest in batch)",
        "truncation": True,
        **extra,
    }


def save_tokenizer(backend: Any) -> Any:
    def write(path: Any) -> None:
        backend.save(str(path))

    return write
