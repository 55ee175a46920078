"""How decoded items become batches, without a session: what readers and Ray tasks run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ducho_fast.artifact import Artifact
from ducho_fast.data.text.tokenize import TextEncoder, length_batches

# Texts are sorted by length within windows of this many batches, cut at fixed positions of the
# item list: the longer, the less padding (2048 generated descriptions in batches of 32: 7.5%
# of the tokens padding in windows of 16 batches, 2.2% in 64; the bare session 1.06x faster in
# fp32 and 1.12x in int8), the later the first batch (tokenizing 2048 texts: 0.17 s) and the
# coarser the windows that shards and resumed runs share out.
TEXT_WINDOW_BATCHES = 64
AUTO_TOKENS_PER_ROW = 64

# Images: items read ahead per reader worker (see Pipeline.windows_ahead; embed's too, see
# embedder.read_ahead). On 16 CPUs with an H100 (the device tool's machine; 1024 JPEGs,
# batches of 32, one machine, runs alternated), windows read one at a time left the model
# waiting 0.9-1.2 s per run for its inputs, 8 items ahead per worker 0.0 s: ResNet50
# 1.03-1.18x the images/s, EfficientNet-Lite0 within noise (the writer was then what it waited
# for). On 2 CPUs with batches of 32 the depth stays one window, as before.
AHEAD_ITEMS_PER_WORKER = 8


def window_size(sorts_by_length: bool, batch_size: int, sort_window: int = 0) -> int:
    """Items per window for a model: one batch, or ``sort_window`` batches of texts
    (``sorts_by_length``; 0: ``TEXT_WINDOW_BATCHES``)."""
    return batch_size * (sort_window or TEXT_WINDOW_BATCHES) if sorts_by_length else batch_size


class Batcher:
    """Tokenizes texts, plans batches and builds a batch's graph inputs for one artifact."""

    def __init__(self, artifact: Artifact) -> None:
        self.modality = artifact.modality
        self.encoder = _encoder(artifact) if self.modality == "textual" else None
        self._input_names = {str(i["name"]) for i in artifact.manifest["inputs"]}

    @property
    def sorts_by_length(self) -> bool:
        """Whether batch assembly sorts a window of items by length (texts)."""
        return sorts_by_length(self.modality)

    def tokenize(self, payloads: Sequence[Any]) -> list[Any]:
        """Texts to :class:`Tokens` (readers do this off the model's thread); others as is."""
        if self.encoder is None:
            return list(payloads)
        texts = [p for p in payloads if isinstance(p, str)]
        tokens = iter(self.encoder.tokenize(texts) if texts else [])
        return [next(tokens) if isinstance(p, str) else p for p in payloads]

    def plan(self, payloads: Sequence[Any], batch_size: int, token_budget: int) -> list[list[int]]:
        """Positions of ``payloads`` per batch: length buckets within a token budget for
        tokenized texts; for images and audio, consecutive runs of ``batch_size`` cut into
        their same-shape groups (:func:`shape_groups`)."""
        if self.encoder is None:
            return [
                group
                for b in range(0, len(payloads), batch_size)
                for group in shape_groups(payloads, range(b, min(b + batch_size, len(payloads))))
            ]
        padded = self.encoder.max_length if self.encoder.pad_to_max else None
        lengths = [len(p) for p in payloads]
        return length_batches(lengths, batch_size, token_budget, padded)

    def feeds(self, payloads: Sequence[Any]) -> dict[str, np.ndarray]:
        """The graph's inputs for decoded items of one shape (texts: tokenized, padded)."""
        if self.modality == "visual":
            return {"pixels": np.stack(payloads)}
        if self.modality == "audio":
            return {"waveform": np.stack(payloads)}
        assert self.encoder is not None
        feeds = self.encoder.pad(self.tokenize(payloads))
        return {k: v for k, v in feeds.items() if k in self._input_names}


def shape_groups(payloads: Sequence[Any], positions: Sequence[int]) -> list[list[int]]:
    """``positions`` grouped by their payload's shape, each group in input order, the groups in
    the order of their first item. Items of other shapes never share a session run (padding
    would change what a convolution or a per-clip normalization sees), so clips of five
    lengths are five runs. Kept as one batch, those runs went one after another on one model
    lane (on 2 CPUs, one thread) while the other lane waited; as batches of their own, the
    lanes share them out (benchmarks/RESULTS.md, "Audio")."""
    groups: dict[Any, list[int]] = {}
    for i in positions:
        groups.setdefault(getattr(payloads[i], "shape", None), []).append(i)
    return list(groups.values())


def sorts_by_length(modality: str) -> bool:
    """Whether a model of ``modality`` has its windows of items sorted by length (texts)."""
    return modality == "textual"


def _encoder(artifact: Artifact) -> TextEncoder:
    pre = artifact.manifest["preprocessing"]
    return TextEncoder(
        artifact.tokenizer_path,
        pre["max_length"],
        pre["pad_id"],
        pad_to_max=pre.get("padding") == "max_length",
    )
