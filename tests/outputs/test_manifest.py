"""Output manifests: reuse only under the same feature key, clear errors otherwise."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ducho_fast.errors import DataError, OutputError
from ducho_fast.outputs import manifest as manifest_module
from ducho_fast.outputs.atomic import TMP_PREFIX
from ducho_fast.outputs.manifest import (
    MANIFEST_FILE,
    check_complete,
    check_folder,
    feature_path,
    open_folder,
)
from ducho_fast.outputs.manifest import features as listed_features

KEY = {"model_sha256": "abc", "layer": "avgpool", "dtype": "float32", "squeeze": False}


def features(folder: Path, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item_id in ids:
        np.save(folder / f"{item_id}.npy", np.zeros((1, 4), np.float32))


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def test_running_then_complete_then_reused(tmp_path: Path) -> None:
    out = tmp_path / "avgpool"
    folder = open_folder(out, KEY, resume=True, what="'m'")
    assert folder.existing == set() and manifest(out)["status"] == "running"
    with pytest.raises(DataError, match=r"unfinished run"):
        check_complete(out)
    features(out, ["a", "b"])
    (out / ".tmp-123.npy").write_bytes(b"half a file")  # a killed write
    folder.finish({"written": 2})
    record = manifest(out)
    assert record["status"] == "complete" and record["counts"] == {"written": 2}
    assert record["key"] == KEY and len(record["key_sha256"]) == 64
    again = open_folder(out, KEY, resume=True, what="'m'")
    assert again.existing == {"a", "b"} and not (out / ".tmp-123.npy").exists()


def test_other_settings_are_refused_naming_what_changed(tmp_path: Path) -> None:
    out = tmp_path / "avgpool"
    open_folder(out, KEY, resume=True, what="'m'").finish({})
    features(out, ["a"])
    changed = {**KEY, "dtype": "float16"}
    with pytest.raises(OutputError, match=r'other settings \(dtype: "float32" -> "float16"\)'):
        check_folder(out, changed, resume=True, what="'m'")
    with pytest.raises(OutputError, match=r"--fresh"):
        open_folder(out, changed, resume=True, what="'m'")
    fresh = open_folder(out, changed, resume=False, what="'m'")
    assert fresh.existing == set() and listed_features(out) == {}  # ours, so removed


def test_features_no_manifest_describes_are_not_reused(tmp_path: Path) -> None:
    out = tmp_path / "from-ducho"
    features(out, ["a", "b"])
    for check in (check_folder, open_folder):
        with pytest.raises(OutputError, match=r"2 .npy file\(s\) that no ducho-fast.manifes"):
            check(out, KEY, resume=True, what="'m'")
    open_folder(out, KEY, resume=False, what="'m'")
    # Not ours: overwritten item by item, not removed.
    assert set(listed_features(out)) == {"a", "b"}


@pytest.mark.parametrize("damage", [b'{"key": ', b"\xff\xfe{}"])
def test_a_damaged_manifest_is_named_with_the_fix(tmp_path: Path, damage: bytes) -> None:
    """Whose features the folder holds is unknown: refused even with --fresh until the
    manifest is deleted, then --fresh overwrites them."""
    out = tmp_path / "avgpool"
    open_folder(out, KEY, resume=True, what="'m'").finish({})
    features(out, ["a"])
    (out / MANIFEST_FILE).write_bytes(damage)
    says = rf"{MANIFEST_FILE} cannot be read \(.+\)\. Delete it and run with --fresh"
    for check, resume in ((check_folder, True), (open_folder, True), (open_folder, False)):
        with pytest.raises(OutputError, match=says):
            check(out, KEY, resume=resume, what="'m'")
    (out / MANIFEST_FILE).unlink()
    assert open_folder(out, KEY, resume=False, what="'m'").existing == set()


def test_a_file_in_place_of_the_folder_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match=r"output folder .*out: .*out is a file, not a folder"):
        open_folder(tmp_path / "out", KEY, resume=True, what="'m'")


def test_empty_and_header_only_files_are_not_complete(tmp_path: Path) -> None:
    """What a power loss can leave of a write that was renamed but never synced: resume
    embeds those items again instead of reusing them."""
    out = tmp_path / "avgpool"
    features(out, ["a", "b", "c"])
    (out / "b.npy").write_bytes(b"")
    header_only = (out / "c.npy").read_bytes()[:128]
    (out / "c.npy").write_bytes(header_only)
    (out / "d.npy").symlink_to(out / "gone.npy")  # dangling
    (out / "e.npy").symlink_to(out / "e.npy")  # a loop
    assert set(listed_features(out)) == {"a"}
    assert (out / "a.npy").stat().st_size == 144  # the smallest real feature is larger


def test_features_are_the_npy_files_sorted_by_name_without_temporaries(tmp_path: Path) -> None:
    """Another shard's write in progress (a complete-looking temp file), other files and
    folders are not features; the ids come sorted by name."""
    out = tmp_path / "avgpool"
    ids = [f"item{k}" for k in range(30)]  # listed by the file system in its own order
    features(out, ids)
    np.save(out / f"{TMP_PREFIX}1234-5-6.npy", np.zeros((1, 4), np.float32))
    (out / "notes.txt").write_text("not a feature")
    (out / "dir.npy").mkdir()
    assert list(listed_features(out)) == sorted(ids)  # item0, item1, item10, item11, ...
    assert listed_features(out)["item7"] == (out / "item7.npy").stat().st_mtime_ns
    assert feature_path(out, "item7") == out / "item7.npy"


def test_fresh_sets_the_earlier_features_aside_and_deletes_them_on_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fresh: the earlier run's features leave the folder at once (renamed into a temp
    folder), are deleted while the run goes on, and are gone once the folder settles; other
    files stay. A temp folder a killed run left is removed by the next run, not by a shard."""
    out = tmp_path / "avgpool"
    open_folder(out, KEY, resume=True, what="'m'").finish({"written": 3})
    features(out, ["a", "b", "c"])
    (out / "notes.txt").write_text("the user's")
    real_rmtree = shutil.rmtree

    def slow_rmtree(path: Path, **kwargs: Any) -> None:
        time.sleep(0.3)  # as deleting thousands of files on a disk takes
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(manifest_module.shutil, "rmtree", slow_rmtree)
    fresh = open_folder(out, KEY, resume=False, what="'m'")
    assert fresh.existing == set() and listed_features(out) == {}
    assert fresh.removing is not None
    fresh.settle()
    assert not fresh.removing.is_alive()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "notes.txt"]
    monkeypatch.undo()

    left = out / f"{TMP_PREFIX}abcd-1-2"  # what a run killed while deleting leaves
    features(left, ["a"])
    open_folder(out, KEY, resume=True, what="'m'", alone=False)
    assert left.is_dir()  # other shards may be writing the folder
    open_folder(out, KEY, resume=True, what="'m'")
    assert not left.exists()


def test_checking_a_folder_made_with_the_same_settings_lists_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a run checks of each output folder before any work: under the same settings
    every feature is reusable, so none is listed (300,000 took 1.6 s here); a run that will
    open the folder lists them once then."""
    out = tmp_path / "avgpool"
    open_folder(out, KEY, resume=True, what="'m'").finish({})
    features(out, ["a", "b"])

    def listing(folder: Path) -> dict[str, int]:
        raise AssertionError(f"{folder} listed")

    monkeypatch.setattr(manifest_module, "features", listing)
    check_folder(out, KEY, resume=True, what="'m'")
    with pytest.raises(AssertionError, match="listed"):
        open_folder(out, KEY, resume=True, what="'m'")
