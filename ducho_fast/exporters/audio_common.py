"""What every audio exporter shares: pooling, the waveform graph's record, parity clips."""

from __future__ import annotations

from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.exporters.base import Built
from ducho_fast.exporters.compat import import_torch


def pool_frames(value: Any, pooling: str | None) -> Any:
    """``mean``/``max`` over the frames of a ``(batch, frames, D)`` output; others as they are."""
    if value.dim() == 3 and pooling == "mean":
        return value.mean(dim=1)
    if value.dim() == 3 and pooling == "max":
        return value.amax(dim=1)
    return value


def waveform_built(
    module: Any,
    layers: list[Any],
    spec: ModelSpec,
    *,
    rate: int,
    min_samples: int,
    normalize: str | None,
    source: dict[str, Any],
    reference: Any,
) -> Built:
    """A waveform graph (float32 ``(batch, samples)`` at ``rate``) ready for conversion."""
    torch = import_torch()
    example = (torch.randn(2, rate // 2, generator=torch.Generator().manual_seed(0)),)
    with torch.no_grad():
        shapes = [tuple(o.shape) for o in module(*example)]
    return Built(
        module=module,
        example=example,
        input_names=["waveform"],
        dynamic_axes={"waveform": {0: "batch", 1: "samples"}},
        outputs=[audio_output(i, layers[i], s) for i, s in enumerate(shapes)],
        inputs=[{"name": "waveform", "dtype": "float32", "shape": ["batch", "samples"]}],
        preprocessing={
            "sample_rate": rate,
            "channels": "mono (mean of channels)",
            "resampler": "soxr HQ",
            "max_seconds": spec.max_seconds,
            "min_samples": min_samples,
            "normalize": normalize,
        },
        source=source,
        reference=reference,
    )


def audio_samples(rate: int) -> list[np.ndarray]:
    """Clips of several lengths: a tone, speech-like noise bursts, near silence."""
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * 0.9)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    bursts = (
        rng.standard_normal(int(rate * 0.55))
        * np.repeat(rng.random(11), rate // 20 + 1)[: int(rate * 0.55)]
    )
    quiet = 1e-3 * rng.standard_normal(int(rate * 0.4))
    return [w.astype(np.float32) for w in (tone, bursts, quiet)]


def audio_output(index: int, layer: str | int, shape: tuple[int, ...]) -> dict[str, Any]:
    """The manifest record of one output: ``(batch, frames, D)`` per frame, else pooled."""
    per_frame = len(shape) == 3
    return {
        "name": f"out{index}",
        "layer": str(layer),
        "dim": int(shape[-1]),
        "per_frame": per_frame,
        "squeeze": False,
        "pooling": None if per_frame else "in graph",
    }
