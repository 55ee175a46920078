"""Tokenization with ``tokenizers`` from the artifact's tokenizer.json (no transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


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

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self._tok.encode_batch(texts)
        longest = self.max_length if self.pad_to_max else max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), longest), dtype=np.int64)
        types = np.zeros((len(texts), longest), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
