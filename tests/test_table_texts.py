"""A plain run over a text table holds its texts' digests and reads the texts again as their
windows run: what it writes is what it wrote when it held the texts, a row edited meanwhile
fails saying so, and a run with nothing to embed never reads the texts again."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast import api
from ducho_fast.api import ERRORS_FILE
from ducho_fast.data.sources import Items
from ducho_fast.data.text import deferred
from tests.conftest import npy_bytes, textual_config

pytestmark = pytest.mark.slow

ROWS = [(f"i{k:02d}", f"product {k}: " + "soft cotton shirt " * (1 + k % 5)) for k in range(12)]


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["item_id\tdescription"] + [f"{i}\t{t}" for i, t in rows]
    path.write_text("\n".join(lines) + "\n")


def _config(data: Path, store: Path, model: Path) -> dict[str, Any]:
    entry = {"model_name": str(model), "output_layers": ["pooler_output"], "batch_size": 2}
    config = textual_config(data, entry, store)
    config["runtime"] = {"sort_window": 2}  # windows of 4 texts: three windows
    return config


def _exported(data: Path, store: Path, model: Path) -> tuple[Path, dict[str, Any]]:
    """The table of ``ROWS`` in ``data`` and its config, the model exported."""
    table = data / "descriptions.tsv"
    _write(table, ROWS)
    config = _config(data, store, model)
    ducho_fast.export(config)
    return table, config


def _features(data: Path) -> Path:
    (folder,) = data.joinpath("out").rglob("pooler_output")
    return folder


def _after_the_read(monkeypatch: pytest.MonkeyPatch, then: Any) -> None:
    """Call ``then`` once each job's items are read, before any is embedded."""
    read = api.job_items

    def job_items(*args: Any, **kwargs: Any) -> Items:
        items = read(*args, **kwargs)
        then()
        return items

    monkeypatch.setattr(api, "job_items", job_items)


def test_a_plain_run_writes_what_a_run_holding_the_texts_writes(
    tmp_path: Path, store: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held, deferring, packed = tmp_path / "held", tmp_path / "deferring", tmp_path / "packed"
    for data in (held, deferring):
        data.mkdir()
        _write(data / "descriptions.tsv", ROWS)
    # A gzip table of UTF-16 in a folder (input_path names the folder): read twice alike.
    packed.joinpath("descriptions.tsv").mkdir(parents=True)
    text = (deferring / "descriptions.tsv").read_text()
    (packed / "descriptions.tsv" / "t.tsv.gz").write_bytes(gzip.compress(text.encode("utf-16")))
    ducho_fast.export(_config(held, store, tiny_bert_dir))
    for data in (deferring, packed):
        ducho_fast.extract(_config(data, store, tiny_bert_dir))
    read = api.job_items

    def holding(*args: Any, **kwargs: Any) -> Items:
        return read(*args, **{**kwargs, "defer_texts": False})

    monkeypatch.setattr(api, "job_items", holding)
    ducho_fast.extract(_config(held, store, tiny_bert_dir))
    written = npy_bytes(_features(deferring))
    assert len(written) == len(ROWS) and written == npy_bytes(_features(held))
    assert npy_bytes(_features(packed)) == written


def test_a_row_edited_while_the_run_reads_fails_and_the_next_run_embeds_it(
    tmp_path: Path, store: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, config = _exported(tmp_path, store, tiny_bert_dir)
    edited = [(i, t.upper() if i == "i06" else t) for i, t in ROWS]
    _after_the_read(monkeypatch, lambda: _write(table, edited))
    report = ducho_fast.extract(config)
    assert report.failed == 1
    with (tmp_path / "out" / ERRORS_FILE).open() as f:
        (row,) = csv.DictReader(f, delimiter="\t")
    assert row["item_id"] == "i06" and row["origin"] == "descriptions.tsv:8"
    assert "is not the one read when the run started: the table was edited" in row["reason"]
    features = _features(tmp_path)
    assert sorted(p.stem for p in features.glob("*.npy")) == [i for i, _ in ROWS if i != "i06"]

    monkeypatch.undo()
    assert ducho_fast.extract(config).failed == 0
    # The edited text's feature: a fresh run's over the edited table.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _write(fresh / "descriptions.tsv", edited)
    ducho_fast.extract(_config(fresh, store, tiny_bert_dir))
    ours, theirs = (np.load(_features(d) / "i06.npy") for d in (tmp_path, fresh))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_run_with_nothing_to_embed_reads_no_text_again(
    tmp_path: Path, store: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, config = _exported(tmp_path, store, tiny_bert_dir)
    ducho_fast.extract(config)
    before = npy_bytes(_features(tmp_path))
    reads: list[int] = []
    row_at = deferred.TextCursor._row_at

    def counted(self: deferred.TextCursor, line: int) -> Any:
        reads.append(line)
        return row_at(self, line)

    monkeypatch.setattr(deferred.TextCursor, "_row_at", counted)
    moved = tmp_path / "moved.tsv"
    _after_the_read(monkeypatch, lambda: table.rename(moved))  # gone once read
    report = ducho_fast.extract(config)
    assert report.failed == 0 and reads == []
    assert npy_bytes(_features(tmp_path)) == before
    # A run that embeds one window (i04-i07, lines 6-9) reads the texts of its rows alone.
    monkeypatch.undo()
    moved.rename(table)
    _features(tmp_path).joinpath("i05.npy").unlink()
    monkeypatch.setattr(deferred.TextCursor, "_row_at", counted)
    assert ducho_fast.extract(config).failed == 0
    assert reads == [6, 7, 8, 9]
    assert npy_bytes(_features(tmp_path)) == before
