"""The matrix layout: rows in input or id_order order, gaps filled with the mean and listed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ducho_fast.errors import DataError
from ducho_fast.outputs.matrix import read_id_order, write_matrix


def parts(folder: Path, rows: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item_id, row in rows.items():
        np.save(folder / f"{item_id}.npy", row)


def vectors(n: int, dim: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.standard_normal((1, dim)).astype(np.float32) for _ in range(n)]


def test_rows_follow_the_input_order_and_skip_failed_items(tmp_path: Path) -> None:
    a, b, c = vectors(3)
    parts(tmp_path / "p", {"a": a, "b": b, "c": c})
    result = write_matrix(tmp_path / "p", tmp_path / "m", "image_feat", ["c", "x", "a"])
    matrix = np.load(tmp_path / "m" / "image_feat.npy")
    np.testing.assert_array_equal(matrix, np.concatenate([c, a]))
    assert (tmp_path / "m" / "ids.txt").read_text() == "c\na\n"
    assert result.rows == 2 and result.filled == [] and not (tmp_path / "m/missing.tsv").exists()


def test_id_order_fills_the_mean_and_lists_gaps(tmp_path: Path) -> None:
    a, b, extra = vectors(3)
    parts(tmp_path / "p", {"a": a, "b": b, "extra": extra})
    result = write_matrix(
        tmp_path / "p", tmp_path / "m", "text_feat", ["a", "b", "extra"], id_order=["b", "z", "a"]
    )
    matrix = np.load(tmp_path / "m" / "text_feat.npy")
    np.testing.assert_allclose(matrix, np.concatenate([b, (a + b) / 2, a]), rtol=1e-6)
    assert [e.item_id for e in result.filled] == ["z"]
    assert [e.item_id for e in result.dropped] == ["extra"]
    listed = (tmp_path / "m" / "missing.tsv").read_text().splitlines()
    assert listed[0] == "item_id\treason" and listed[1].startswith("z\tno feature")
    assert listed[2].startswith("extra\tnot in the id_order file")


def test_squeezed_parts_float16_and_shape_mismatch(tmp_path: Path) -> None:
    a, b = vectors(2)
    parts(tmp_path / "p", {"a": a[0], "b": b[0]})  # (D,) files from output.squeeze
    write_matrix(tmp_path / "p", tmp_path / "m", "f", ["a", "b"], dtype="float16")
    matrix = np.load(tmp_path / "m" / "f.npy")
    assert matrix.dtype == np.float16 and matrix.shape == (2, 3)
    np.save(tmp_path / "p" / "c.npy", np.zeros((1, 5, 3), np.float32))
    with pytest.raises(DataError, match=r"c.npy has shape \(1, 5, 3\), other items \(3,\)"):
        write_matrix(tmp_path / "p", tmp_path / "m2", "f", ["a", "b", "c"])
    assert not (tmp_path / "m2" / "f.npy").exists() and not list((tmp_path / "m2").glob(".tmp-*"))


def test_id_order_file(tmp_path: Path) -> None:
    path = tmp_path / "order.txt"
    path.write_text("b\n\n a \nc\n")
    assert read_id_order(path) == ["b", "a", "c"]
    path.write_text("b\na\nb\n")
    with pytest.raises(DataError, match=r"order.txt:3: id 'b' is listed twice \(first at line 1\)"):
        read_id_order(path)
    with pytest.raises(DataError, match=r"does not exist \(check 'output.id_order'\)"):
        read_id_order(tmp_path / "none.txt")


@pytest.mark.parametrize("damage", ["zeros", "text"])
def test_an_unreadable_feature_file_is_named(tmp_path: Path, damage: str) -> None:
    """numpy's own errors (a ValueError here; an EOFError for an empty file, which Click
    reports as just 'Aborted.') become a DataError that names the file and how to remake it."""
    a, b = vectors(2)
    parts(tmp_path / "p", {"a": a, "b": b})
    size = (tmp_path / "p" / "b.npy").stat().st_size
    garbage = bytes(size) if damage == "zeros" else b"x" * size
    (tmp_path / "p" / "b.npy").write_bytes(garbage)
    with pytest.raises(DataError, match=r"p/b\.npy is not a readable \.npy feature.*Delete it"):
        write_matrix(tmp_path / "p", tmp_path / "m", "image_feat", ["a", "b"])
