"""The per-item fast path writes the bytes np.save writes, atomically, with no leftovers."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from ducho_fast.outputs.atomic import TMP_PREFIX, NpyFiles, save_npy, write_text


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


ARRAYS: dict[str, np.ndarray] = {
    "row": np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32),
    "vector_fp16": np.arange(7, dtype=np.float16),
    "scalar": np.array(2.5, dtype=np.float32),
    "tokens": np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32),
    "strided_view": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_files_hold_the_bytes_np_save_writes(tmp_path: Path, name: str) -> None:
    """Byte for byte what np.save writes for the array in C order (the pipeline's arrays are)."""
    files = NpyFiles()
    array = ARRAYS[name]
    for round_ in range(2):  # the second write reuses the cached header
        files.save(tmp_path / f"{name}{round_}.npy", array)
        expected = npy_bytes(np.require(array, requirements="C"))
        assert (tmp_path / f"{name}{round_}.npy").read_bytes() == expected
    np.testing.assert_array_equal(np.load(tmp_path / f"{name}1.npy"), array)


def test_shapes_sharing_a_cache_keep_their_own_headers(tmp_path: Path) -> None:
    files = NpyFiles()
    for i, array in enumerate([np.zeros((1, 4), np.float32), np.zeros((1, 5), np.float32)] * 2):
        files.save(tmp_path / f"{i}.npy", array)
        assert np.load(tmp_path / f"{i}.npy").shape == array.shape


def test_an_existing_file_is_replaced_and_no_temporaries_stay(tmp_path: Path) -> None:
    target = tmp_path / "a.npy"
    target.write_bytes(b"old")
    writers = [NpyFiles(), NpyFiles()]  # two writers into one folder, as shards do
    for k, files in enumerate(writers):
        files.save(target, np.full(3, k, np.float32))
        files.save(tmp_path / f"b{k}.npy", np.zeros(2, np.float32))
    np.testing.assert_array_equal(np.load(target), np.full(3, 1, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b0.npy", "b1.npy"]


def test_a_failed_write_raises_and_leaves_neither_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        NpyFiles().save(tmp_path / "a.npy", np.zeros(3, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_a_short_write_is_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:50])))
    array = ARRAYS["row"]
    NpyFiles().save(tmp_path / "a.npy", array)
    assert (tmp_path / "a.npy").read_bytes() == npy_bytes(array)


def test_temporaries_carry_the_prefix_a_new_run_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def replace(src: str, dst: Path) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    files = NpyFiles()
    for i in range(3):
        files.save(tmp_path / f"{i}.npy", np.zeros(1, np.float32))
    assert all(name.startswith(TMP_PREFIX) for name in seen)
    assert len(set(seen)) == 3


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_files_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """Group-readable under umask 022, as np.save would leave them (a temp file from
    tempfile.mkstemp is 0600, and the rename kept that)."""
    old = os.umask(0o022)
    try:
        NpyFiles().save(tmp_path / "a.npy", np.zeros(2, np.float32))
        save_npy(tmp_path / "b.npy", np.zeros(2, np.float32))
        write_text(tmp_path / "c.txt", "x")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "a.npy": 0o644,
        "b.npy": 0o644,
        "c.txt": 0o644,
    }


@pytest.mark.parametrize("writer", ["npy_files", "save_npy", "write_text"])
def test_a_failed_rename_leaves_neither_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    def refused(src: str, dst: Path) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refused)
    array = np.zeros(3, np.float32)
    write = {
        "npy_files": lambda: NpyFiles().save(tmp_path / "a.npy", array),
        "save_npy": lambda: save_npy(tmp_path / "a.npy", array),
        "write_text": lambda: write_text(tmp_path / "a.txt", "x"),
    }[writer]
    with pytest.raises(OSError, match="Permission denied"):
        write()
    assert list(tmp_path.iterdir()) == []
