"""The record of which text each feature was made from."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ducho_fast.data.text.deferred import text_digest
from ducho_fast.errors import OutputError
from ducho_fast.outputs import records
from ducho_fast.outputs.texts import recorded_texts, save_texts
from ducho_fast.runtime.shard import Shard


def _saved_at(folder: Path, name: str, at: int) -> None:
    os.utime(folder / name, ns=(at, at))


def test_a_record_vouches_only_for_features_written_before_it(tmp_path: Path) -> None:
    save_texts([tmp_path], None, {"a": text_digest("red"), "b": text_digest("blue")})
    _saved_at(tmp_path, "ducho-fast.texts.json", 2000)
    # "b" was written again after the record (by a run killed before saving its own).
    assert recorded_texts([tmp_path], {"a": 1000, "b": 3000, "c": 1000}) == {
        "a": text_digest("red")
    }
    assert recorded_texts([tmp_path], {"a": 2000}) == {"a": text_digest("red")}  # same tick


def test_every_layer_folder_must_agree(tmp_path: Path) -> None:
    layers = [tmp_path / "avgpool", tmp_path / "fc"]
    for layer in layers:
        layer.mkdir()
    save_texts(layers, None, {"a": text_digest("red"), "b": text_digest("blue")})
    save_texts(layers[1:], None, {"a": text_digest("red"), "b": text_digest("navy")})
    for layer in layers:
        _saved_at(layer, "ducho-fast.texts.json", 2000)
    assert recorded_texts(layers, {"a": 1000, "b": 1000}) == {"a": text_digest("red")}


def test_shard_records_merge_and_a_plain_run_replaces_them(tmp_path: Path) -> None:
    save_texts([tmp_path], Shard(0, 2), {"a": "1"})
    save_texts([tmp_path], Shard(1, 2), {"b": "2"})
    (tmp_path / "ducho-fast.texts.shard-2-of-3.json").write_text("{not json")
    assert recorded_texts([tmp_path], {"a": 0, "b": 0}) == {"a": "1", "b": "2"}
    save_texts([tmp_path], None, {"b": "2"})
    assert [p.name for p in tmp_path.iterdir()] == ["ducho-fast.texts.json"]
    assert recorded_texts([tmp_path], {"a": 0, "b": 0}) == {"b": "2"}
    save_texts([tmp_path], None, {})
    assert not list(tmp_path.iterdir())


def test_digests_tell_edits_and_take_any_string() -> None:
    assert text_digest("red shirt") != text_digest("red shirt.")
    assert len(text_digest("lone surrogate \udc80")) == 16


def test_a_record_that_cannot_be_written_is_an_output_error(tmp_path, monkeypatch) -> None:
    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records, "write_text", full)
    with pytest.raises(OutputError, match=r"ducho-fast.texts.json: No space left on device"):
        save_texts([tmp_path], None, {"a": "1"})


def test_record_files_lists_one_kind_among_the_features(tmp_path: Path) -> None:
    names = [
        "ducho-fast.texts.shard-1-of-2.json",
        "ducho-fast.texts.json",
        "ducho-fast.unreadable.json",  # another kind
        "ducho-fast.texts.json.tmp",  # not a record
        "0001.npy",
        "ducho-fast.texts.npy",  # an item whose id starts like a record
    ]
    for name in names:
        (tmp_path / name).write_text("{}")
    assert [p.name for p in records.record_files(tmp_path, "texts")] == [
        "ducho-fast.texts.json",
        "ducho-fast.texts.shard-1-of-2.json",
    ]
    assert records.record_files(tmp_path / "absent", "texts") == []
