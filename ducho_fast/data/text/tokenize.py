"""Tokenization with ``tokenizers`` from the artifact's tokenizer.json (no transformers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Tokens:
    """One tokenized text, unpadded: what the readers hand to batch assembly."""

    ids: np.ndarray
    type_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class TextEncoder:
    """Turns texts into padded int64 ``input_ids`` / ``attention_mask`` (and token types).

    Each batch is padded to its own longest text (dynamic padding), unless the model was
    trained on fixed-length inputs and reads a fixed position (SigLIP's text tower): then
    ``pad_to_max`` pads every text to ``max_length``.
    """

    def __init__(
        self, tokenizer_file: Path, max_length: int, pad_id: int, *, pad_to_max: bool = False
    ) -> None:
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.max_length = max_length
        self.pad_id = pad_id
        self.pad_to_max = pad_to_max
        # tokenizers >= 0.21 can skip the character offsets, which nothing here reads (the same
        # ids; 8192 product descriptions on one thread: 44 against 54 us a text).
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.pad(self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> list[Tokens]:
        """Token ids of each text, truncated, unpadded (the Rust tokenizer runs in parallel,
        outside the GIL)."""
        return [
            Tokens(np.array(e.ids, dtype=np.int64), np.array(e.type_ids, dtype=np.int64))
            for e in self._encode_batch(texts)
        ]

    def padded_length(self, length: int) -> int:
        """The length a text of ``length`` tokens is padded to in a batch of its own size."""
        return self.max_length if self.pad_to_max else length

    def pad(self, tokens: Sequence[Tokens]) -> dict[str, np.ndarray]:
        """One batch, padded to its longest text (or to ``max_length``)."""
        longest = self.padded_length(max(len(t) for t in tokens))
        ids = np.full((len(tokens), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(tokens), longest), dtype=np.int64)
        types = np.zeros((len(tokens), longest), dtype=np.int64)
        for row, t in enumerate(tokens):
            n = len(t)
            ids[row, :n] = t.ids
            mask[row, :n] = 1
            types[row, :n] = t.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def length_batches(
    lengths: Sequence[int], max_rows: int, token_budget: int, padded: int | None = None
) -> list[list[int]]:
    """Batches of positions, shortest texts first, each within ``max_rows`` rows and
    ``token_budget`` padded tokens (a single text longer than the budget runs alone).

    Sorting puts texts of similar length together, so dynamic padding wastes little; the
    budget makes batches of long texts smaller and keeps batches of short ones full.
    ``padded``: every text is padded to this length (fixed-length models), sorting is moot.
    Deterministic: ties keep input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = padded or lengths[i]  # ascending: the newest text is the longest
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * width > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
