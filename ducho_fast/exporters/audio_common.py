"""What every audio exporter shares: its parity clips and its output records."""

from __future__ import annotations

from typing import Any

import numpy as np


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
