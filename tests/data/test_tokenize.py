"""The text encoder's token ids are the source tokenizer's, whichever tokenizers call makes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ducho_fast.data.text.tokenize import TextEncoder

TEXTS = [
    "Nordvik running shoes",
    "The lightweight rain jacket from Acme comes with taped seams. " * 30,  # truncated
    "Café au lait — naïve façade, 北京, emoji 🙂 and tabs\tinside",
    "   leading and trailing spaces   ",
    "x",
]


def test_ids_and_type_ids_are_the_source_tokenizers(minilm_dir: Path) -> None:
    from ducho_fast.exporters.compat import import_transformers

    source = import_transformers().AutoTokenizer.from_pretrained(minilm_dir)
    encoder = TextEncoder(minilm_dir / "tokenizer.json", max_length=128, pad_id=0)

    tokens = encoder.tokenize(TEXTS)
    expected = source(TEXTS, truncation=True, max_length=128)

    assert len(tokens[1]) == 128
    rows = zip(tokens, expected["input_ids"], expected["token_type_ids"], strict=True)
    for got, ids, types in rows:
        assert got.ids.dtype == got.type_ids.dtype == np.int64
        assert got.ids.tolist() == ids
        assert got.type_ids.tolist() == types


def test_padding_a_batch_keeps_each_texts_ids_and_masks_the_rest(minilm_dir: Path) -> None:
    encoder = TextEncoder(minilm_dir / "tokenizer.json", max_length=16, pad_id=0)
    feeds = encoder(["a short one", "x"])
    longest = len(encoder.tokenize(["a short one"])[0])

    assert feeds["input_ids"].shape == (2, longest)
    assert feeds["attention_mask"].sum(axis=1).tolist() == [longest, 3]  # [CLS] x [SEP]
    assert (feeds["input_ids"][1, 3:] == 0).all()
