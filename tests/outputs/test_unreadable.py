"""The record of input files that did not decode: written per run, merged across shards."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ducho_fast.data.items import FileStamp, ItemError
from ducho_fast.errors import OutputError
from ducho_fast.outputs import records
from ducho_fast.outputs.unreadable import load_unreadable, save_unreadable
from ducho_fast.runtime.shard import Shard

DECODING = "('image', 'apply', 89478485)"


def _error(tmp_path: Path, name: str, stamped: bool = True) -> ItemError:
    path = tmp_path / name
    path.write_bytes(b"<html>" + name.encode())
    stamp = FileStamp.of(path) if stamped else None
    return ItemError(path.stem, str(path), f"not a readable image ({name})", stamp)


def test_a_record_round_trips_and_only_stamped_errors_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "features"
    folder.mkdir()
    bad, transient = _error(tmp_path, "a.jpg"), _error(tmp_path, "b.jpg", stamped=False)
    save_unreadable([folder], None, DECODING, [bad, transient])
    assert load_unreadable([folder], DECODING) == {(bad.origin, bad.stamp): bad.reason}
    assert load_unreadable([folder], "('image', 'ignore', 89478485)") == {}  # decoded otherwise
    save_unreadable([folder], None, DECODING, [transient])  # none left: no record
    assert not list(folder.iterdir())


def test_shard_records_merge_and_a_plain_run_replaces_them(tmp_path: Path) -> None:
    folder = tmp_path / "features"
    folder.mkdir()
    first, second = _error(tmp_path, "a.jpg"), _error(tmp_path, "b.jpg")
    save_unreadable([folder], Shard(0, 2), DECODING, [first])
    save_unreadable([folder], Shard(1, 2), DECODING, [second])
    assert set(load_unreadable([folder], DECODING)) == {
        (first.origin, first.stamp),
        (second.origin, second.stamp),
    }
    save_unreadable([folder], None, DECODING, [second])
    assert [p.name for p in folder.iterdir()] == ["ducho-fast.unreadable.json"]
    assert set(load_unreadable([folder], DECODING)) == {(second.origin, second.stamp)}


def test_a_file_counts_only_if_every_layer_folder_records_it(tmp_path: Path) -> None:
    layers = [tmp_path / "avgpool", tmp_path / "fc"]
    for layer in layers:
        layer.mkdir()
    first, second = _error(tmp_path, "a.jpg"), _error(tmp_path, "b.jpg")
    save_unreadable(layers, None, DECODING, [first, second])
    save_unreadable(layers[1:], None, DECODING, [second])  # fc re-made: a.jpg not in its record
    assert set(load_unreadable(layers, DECODING)) == {(second.origin, second.stamp)}


def test_damaged_records_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "features"
    folder.mkdir()
    good = _error(tmp_path, "a.jpg")
    save_unreadable([folder], Shard(0, 2), DECODING, [good])
    (folder / "ducho-fast.unreadable.shard-1-of-2.json").write_text('{"files": [')
    (folder / "ducho-fast.unreadable.json").write_text(
        f'{{"decoding": "{DECODING}", "files": [{{"path": "x"}}, {{"stamp": 3}}, 7]}}'
    )
    assert load_unreadable([folder], DECODING) == {(good.origin, good.stamp): good.reason}


def test_a_record_that_cannot_be_written_is_an_output_error(tmp_path, monkeypatch) -> None:
    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records, "write_text", full)
    with pytest.raises(OutputError, match=r"ducho-fast.unreadable.json: No space left on device"):
        save_unreadable([tmp_path], None, DECODING, [_error(tmp_path, "a.jpg")])
