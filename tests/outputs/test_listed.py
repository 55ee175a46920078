"""The record of which input file (size, modification time) each feature was made from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ducho_fast.outputs.listed import recorded_files, save_files
from ducho_fast.runtime.shard import Shard


def test_a_record_gives_back_what_was_listed_for_features_written_before_it(
    tmp_path: Path,
) -> None:
    save_files([tmp_path], None, {"a": (10, 1_000), "b": (20, -5_000)}.items())  # b: before 1970
    record = tmp_path / "ducho-fast.files.json"
    assert json.loads(record.read_text()) == {
        "schema_version": 1,
        "files": {"a": [10, 1_000], "b": [20, -5_000]},
    }
    os.utime(record, ns=(2000, 2000))
    assert recorded_files([tmp_path], {"a": 2000, "b": 1000, "c": 0}) == {
        "a": (10, 1_000),
        "b": (20, -5_000),
    }
    assert recorded_files([tmp_path], {"a": 2001}) == {}  # written after: not vouched for


def test_malformed_entries_vouch_for_nothing(tmp_path: Path) -> None:
    entries = {"a": [10, 1], "b": [10], "c": ["10", 1], "d": [-1, 1], "e": [1.5, 1], "f": 7}
    (tmp_path / "ducho-fast.files.json").write_text(json.dumps({"files": entries}))
    (tmp_path / "ducho-fast.files.shard-1-of-2.json").write_text('{"files": [1, 2]}')
    assert recorded_files([tmp_path], dict.fromkeys(entries, 0)) == {"a": (10, 1)}


def test_shards_merge_layers_must_agree_and_a_plain_run_replaces_them(tmp_path: Path) -> None:
    layers = [tmp_path / "avgpool", tmp_path / "fc"]
    for layer in layers:
        layer.mkdir()
    save_files(layers, Shard(0, 2), {"a": (1, 1)}.items())
    save_files(layers, Shard(1, 2), {"b": (2, 2)}.items())
    save_files(layers[1:], Shard(1, 2), {"b": (2, 3)}.items())
    assert recorded_files(layers, {"a": 0, "b": 0}) == {"a": (1, 1)}
    save_files(layers, None, {"b": (2, 2)}.items())
    assert [p.name for p in layers[0].iterdir()] == ["ducho-fast.files.json"]
    assert recorded_files(layers, {"a": 0, "b": 0}) == {"b": (2, 2)}


def test_any_id_round_trips_and_nothing_listed_leaves_no_record(tmp_path: Path) -> None:
    ids = ['a"b', "c\\d", "\udc80x", "é,:[]{}"]  # \udc80: a name that is not UTF-8
    save_files([tmp_path], None, ((item_id, (k, k)) for k, item_id in enumerate(ids)))
    assert recorded_files([tmp_path], dict.fromkeys(ids, 0)) == {
        item_id: (k, k) for k, item_id in enumerate(ids)
    }
    save_files([tmp_path], None, iter(()))
    assert not list(tmp_path.iterdir())
