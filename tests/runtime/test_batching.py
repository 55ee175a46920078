"""Text batch assembly: length buckets within a token budget, ids kept, outputs unchanged."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

import ducho_fast
from ducho_fast.data.text.tokenize import length_batches
from tests.conftest import textual_config


def test_length_batches_sorted_within_budget_and_complete() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(300)]
    batches = length_batches(lengths, max_rows=16, token_budget=1024)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(300))  # every position once
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 1024
    # Short texts fill batches to max_rows; long ones get fewer rows.
    assert len(batches[0]) == 16 and len(batches[-1]) < 16


def test_length_batches_edge_cases() -> None:
    assert length_batches([], 8, 100) == []
    assert length_batches([500, 3], 8, 100) == [[1], [0]]  # over budget: runs alone
    assert length_batches([4, 4, 4], 8, 1000) == [[0, 1, 2]]  # ties keep input order
    # Fixed-length models: every row costs the padded length.
    assert length_batches([1, 2, 3, 4], 8, 64, padded=32) == [[0, 1], [2, 3]]


def _texts(n: int) -> list[str]:
    rng = random.Random(1)
    words = ["red", "soft", "cotton", "shirt", "with", "long", "sleeves"]
    words += ["and", "a", "durable", "waterproof", "zip"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 90))) for _ in range(n)]


@pytest.mark.slow
def test_bucketing_keeps_ids_and_outputs_for_any_batch_size_and_workers(
    tmp_path: Path, store: Path, minilm_dir: Path
) -> None:
    texts = _texts(70)
    (tmp_path / "descriptions.tsv").write_text(
        "item_id\tdescription\n" + "".join(f"id{i:03d}\t{t}\n" for i, t in enumerate(texts))
    )
    model = {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1}
    runs = []
    for batch_size, workers, budget in [(1, 1, 0), (4, 2, 64), (32, 3, 0), (64, 1, 100000)]:
        out = f"out{batch_size}"
        config = textual_config(tmp_path, {**model, "batch_size": batch_size}, store)
        config["textual"]["items"]["output_path"] = out
        config["runtime"] = {
            "workers": workers,
            "prefetch": 1,
            "token_budget": budget,
            "sort_window": 16,
        }
        ducho_fast.export(config)
        assert ducho_fast.extract(config).failed == 0
        folder = tmp_path.joinpath(out, "sentence_transformers", *minilm_dir.parts[1:], "1")
        runs.append({p.stem: np.load(p) for p in folder.glob("*.npy")})
    # Batch size 4 puts 4 x 16 = 64 texts in a window: 70 texts span two windows.
    assert len(texts) > 4 * 16
    emb = ducho_fast.load(ducho_fast.export(config)[0].artifact.path)
    alone = emb.embed(texts, batch_size=1)  # one text at a time: no padding at all
    for run in runs:
        assert sorted(run) == [f"id{i:03d}" for i in range(len(texts))]
        for i in range(len(texts)):
            np.testing.assert_allclose(run[f"id{i:03d}"][0], alone[i], rtol=1e-5, atol=2e-6)
    # The check can fail: neighbouring texts give clearly different vectors.
    assert np.abs(alone[0] - alone[1]).max() > 1e-2
