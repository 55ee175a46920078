"""The matrix layout: rows in input or id_order order, gaps filled with the mean and listed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def test_an_id_order_line_is_its_id_as_written_or_else_without_its_spaces(
    tmp_path: Path,
) -> None:
    """Ids keep their spaces (a TSV's cells, file names), and so does a matrix's ids.txt
    given back as an id order; a hand-written line's trailing spaces still find their id.
    Each line was stripped, so ' x' (from ids.txt) was filled with the mean and ' x' left out."""
    a, b, c = vectors(3)
    parts(tmp_path / "p", {" x": a, "b": b, "c": c})
    first = write_matrix(tmp_path / "p", tmp_path / "m", "f", [" x", "b", "c"])
    assert first.rows == 3 and (tmp_path / "m" / "ids.txt").read_text() == " x\nb\nc\n"
    (tmp_path / "order.txt").write_text("c \n x\n\tb\n")
    order = read_id_order(tmp_path / "order.txt")
    result = write_matrix(tmp_path / "p", tmp_path / "m2", "f", [" x", "b", "c"], id_order=order)
    assert result.filled == [] and result.dropped == []
    assert (tmp_path / "m2" / "ids.txt").read_text() == "c\n x\nb\n"
    np.testing.assert_array_equal(np.load(tmp_path / "m2" / "f.npy"), np.concatenate([c, a, b]))


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
    assert read_id_order(path) == ["b", " a ", "c"]  # matched to 'a' unless ' a ' is an id
    path.write_bytes(b"\xef\xbb\xbfb\r\na\r\n\r\n")  # saved on Windows: its first row was 'b'
    assert read_id_order(path) == ["b", "a"]  # with the mark, so filled with the mean
    path.write_text("b\na\nb\n")
    with pytest.raises(DataError, match=r"order.txt:3: id 'b' is listed twice \(first at line 1\)"):
        read_id_order(path)
    path.write_text("b\na\na \n")
    with pytest.raises(
        DataError, match=r"order.txt:3: id 'a ' is listed twice \(first at line 2 as 'a'\)"
    ):
        read_id_order(path)
    with pytest.raises(DataError, match=r"does not exist \(check 'output.id_order'\)"):
        read_id_order(tmp_path / "none.txt")
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"order.txt lists no ids"):
        read_id_order(path)
    path.write_bytes(b"a\n\xff\n")
    with pytest.raises(DataError, match=r"order.txt cannot be read as UTF-8 text"):
        read_id_order(path)


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


def test_a_matrix_is_kept_until_its_rows_or_a_feature_change(tmp_path: Path) -> None:
    """A rerun keeps the matrix when it would make the same one: same rows, gaps and dtype,
    no feature written since, matrix and ids file untouched. Any change makes it again."""
    a, b, c, b2 = vectors(4)
    parts(tmp_path / "p", {"a": a, "b": b, "c": c})
    matrix = tmp_path / "m" / "image_feat.npy"

    def make(ids: list[str], **kwargs: Any) -> bool:
        result = write_matrix(tmp_path / "p", tmp_path / "m", "image_feat", ids, **kwargs)
        assert (tmp_path / "m" / "ids.txt").read_text() == "".join(f"{i}\n" for i in ids)
        return result.reused

    assert not make(["a", "b", "c"])
    made = matrix.stat()
    assert make(["a", "b", "c"])
    assert (matrix.stat().st_mtime_ns, matrix.stat().st_ino) == (made.st_mtime_ns, made.st_ino)

    np.save(tmp_path / "p" / "b.npy", b2)  # embedded again: a later time
    later = made.st_mtime_ns + 10**9
    os.utime(tmp_path / "p" / "b.npy", ns=(later, later))
    assert not make(["a", "b", "c"])
    np.testing.assert_array_equal(np.load(matrix), np.concatenate([a, b2, c]))
    assert make(["a", "b", "c"])
    assert not make(["c", "b", "a"])  # other rows
    assert not make(["c", "b", "a"], dtype="float16")
    (tmp_path / "m" / "ids.txt").unlink()
    assert not make(["c", "b", "a"], dtype="float16")
    np.save(matrix, np.zeros((3, 3), np.float16))  # replaced by hand
    assert not make(["c", "b", "a"], dtype="float16")
    assert make(["c", "b", "a"], dtype="float16")
    (tmp_path / "p" / "a.npy").unlink()  # a failed this time: filled with the mean
    result = write_matrix(
        tmp_path / "p",
        tmp_path / "m",
        "image_feat",
        ["c", "b"],
        id_order=["c", "b", "a"],
        dtype="float16",
    )
    assert not result.reused and [e.item_id for e in result.filled] == ["a"]


def test_a_half_made_matrix_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while it makes a matrix again leaves no record that would keep it."""
    from ducho_fast.outputs import matrix as module

    a, b = vectors(2)
    parts(tmp_path / "p", {"a": a, "b": b})
    write_matrix(tmp_path / "p", tmp_path / "m", "image_feat", ["a", "b"])

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_save_missing", killed)  # after the matrix, before the record
    with pytest.raises(KeyboardInterrupt):
        write_matrix(tmp_path / "p", tmp_path / "m", "image_feat", ["b", "a"])
    monkeypatch.undo()
    # The matrix holds rows b, a now; the first run's record (rows a, b) must not keep it.
    again = write_matrix(tmp_path / "p", tmp_path / "m", "image_feat", ["a", "b"])
    assert not again.reused
    np.testing.assert_array_equal(np.load(tmp_path / "m/image_feat.npy"), np.concatenate([a, b]))


def test_the_gaps_list_is_remade_when_a_left_out_feature_goes(tmp_path: Path) -> None:
    a, b, x = vectors(3)
    parts(tmp_path / "p", {"a": a, "b": b, "x": x})
    order = ["a", "b"]
    first = write_matrix(tmp_path / "p", tmp_path / "m", "f", ["a", "b", "x"], id_order=order)
    assert [e.item_id for e in first.dropped] == ["x"] and (tmp_path / "m/missing.tsv").exists()
    (tmp_path / "p" / "x.npy").unlink()
    again = write_matrix(tmp_path / "p", tmp_path / "m", "f", ["a", "b"], id_order=order)
    assert not again.reused and not (tmp_path / "m/missing.tsv").exists()


def test_assembling_shows_progress_over_the_files_it_reads(tmp_path: Path) -> None:
    """A matrix of a million rows reads a million files (twice those of rows it averages):
    its bar moves every ``TICK_ROWS`` files; a matrix kept from an earlier run shows none."""
    from ducho_fast.outputs.matrix import TICK_ROWS
    from tests.test_fusion import Recorder

    ids = [f"i{k}" for k in range(TICK_ROWS + 3)]
    parts(tmp_path / "p", dict(zip(ids, vectors(len(ids)), strict=True)))
    shown = Recorder()
    write_matrix(tmp_path / "p", tmp_path / "m", "f", ids, progress=shown, label="m of x")
    assert shown.bars == [("m of x", len(ids), [TICK_ROWS, 3])]
    write_matrix(tmp_path / "p", tmp_path / "m", "f", ids, progress=shown, label="m of x")
    assert len(shown.bars) == 1  # kept
    order = ["gap", *ids]
    write_matrix(tmp_path / "p", tmp_path / "m", "f", ids, id_order=order, progress=shown)
    assert shown.bars[1] == ("matrix", 2 * len(ids) + 1, [TICK_ROWS, TICK_ROWS, 2 * 3 + 1])
