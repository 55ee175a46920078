from __future__ import annotations

from pathlib import Path

import pytest

from ducho_fast.data.text.tsv import read_text_items
from ducho_fast.errors import DataError


def write(tmp_path: Path, text: str, name: str = "d.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_ids_stay_strings_and_text_defaults_to_last_column(tmp_path: Path) -> None:
    path = write(tmp_path, "id\ttitle\tdesc\n007\tA\tfirst\n10\tB\tsecond\n")
    items = read_text_items(path, None, None)
    assert [(i.item_id, i.raw) for i in items] == [("007", "first"), ("10", "second")]
    assert items[0].origin == "d.tsv:2"


def test_named_columns(tmp_path: Path) -> None:
    path = write(tmp_path, 'desc\tasin\n"quoted\ttab"\tX1\n')
    (item,) = read_text_items(path, "asin", "desc")
    assert item.item_id == "X1" and item.raw == "quoted\ttab"


def test_missing_column_lists_header(tmp_path: Path) -> None:
    path = write(tmp_path, "id\tdesc\n1\ta\n")
    with pytest.raises(
        DataError, match=r"no column 'asin' \(from 'item_column'\); the header has: id, desc"
    ):
        read_text_items(path, "asin", None)


def test_folder_with_one_file_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, "id\tdesc\n1\ta\n")
    assert len(read_text_items(tmp_path, None, None)) == 1


def test_short_rows_have_no_text(tmp_path: Path) -> None:
    path = write(tmp_path, "id\tdesc\n1\n\n2\tb\n")
    items = read_text_items(path, None, None)
    assert [(i.item_id, i.raw) for i in items] == [("1", None), ("2", "b")]


def test_not_utf8_and_empty_files(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("id\tdesc\n1\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8"):
        read_text_items(bad, None, None)
    with pytest.raises(DataError, match=r"the file is empty"):
        read_text_items(write(tmp_path, "", "empty.tsv"), None, None)
    with pytest.raises(DataError, match=r"does not exist"):
        read_text_items(tmp_path / "nope.tsv", None, None)
