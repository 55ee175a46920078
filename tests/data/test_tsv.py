from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import random
import zipfile
from pathlib import Path

import pytest

from ducho_fast.data.text import tsv
from ducho_fast.data.text.tsv import BadText, read_text_items
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


def test_the_text_column_cannot_be_the_id_column(tmp_path: Path) -> None:
    """Not the ids embedded as texts: a table of one column, or both keys on one column."""
    from ducho_fast.data.text.tsv import check_text_table

    one = write(tmp_path, "asin\nB01\nB02\n")
    for read in (read_text_items, check_text_table):
        with pytest.raises(
            DataError, match=r"text column 'asin' is also the id column \(the header has no other"
        ):
            read(one, None, None)
    two = write(tmp_path, "asin\tdesc\nB01\thello\n", "two.tsv")
    said = r"'desc' is also the id column; each item needs an id column and a text column\. Set"
    with pytest.raises(DataError, match=said):
        read_text_items(two, "desc", None)


def test_a_comma_separated_file_is_named_as_such(tmp_path: Path) -> None:
    """A CSV read as a TSV has one column named 'id,text': say what the file is, not only
    which column is missing."""
    from ducho_fast.data.text.tsv import check_text_table, read_interaction_items

    csv_file = write(tmp_path, 'id,text\n1,"a, b"\n', "items.csv")
    said = r"has no tab but has commas: the file looks comma-separated\. Tables are read tab-sep"
    with pytest.raises(DataError, match=said) as caught:
        check_text_table(csv_file, None, None)
    assert "Set item_column" not in str(caught.value)  # that would not fix it
    with pytest.raises(DataError, match=r"no column 'id' .*the header has: id,text\. The header"):
        read_text_items(csv_file, "id", "text")
    with pytest.raises(DataError, match=r"interactions need .* looks comma-separated"):
        read_interaction_items(csv_file, None, None)
    semicolons = write(tmp_path, "id;text\n1;a\n", "items2.csv")
    with pytest.raises(DataError, match=r"has semicolons: the file looks semicolon-separated"):
        read_text_items(semicolons, None, None)
    plain = write(tmp_path, "asin\nB01\n", "one.tsv")  # one column, no separator: no guess
    with pytest.raises(DataError) as caught:
        read_text_items(plain, None, None)
    assert "looks" not in str(caught.value) and "Set item_column" in str(caught.value)
    tabs = write(tmp_path, "title, long\tid\na\t1\n", "two.tsv")  # a TSV: a comma in a name
    with pytest.raises(DataError, match=r"no column 'text'") as caught:
        read_text_items(tabs, None, "text")
    assert "looks" not in str(caught.value)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts the file with one; pandas (Ducho) drops it, and so do we.
    path = tmp_path / "excel.tsv"
    path.write_bytes("\ufeffitem_id\tdescription\r\n007\tfirst\r\n".encode())
    (item,) = read_text_items(path, "item_id", "description")
    assert (item.item_id, item.raw, item.origin) == ("007", "first", "excel.tsv:2")
    # only a leading mark is dropped: one inside a cell is text
    path.write_bytes("id\tdesc\n1\t\ufeffx\n".encode())
    assert read_text_items(path, None, None)[0].raw == "\ufeffx"


def test_folder_with_one_file_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, "id\tdesc\n1\ta\n")
    assert len(read_text_items(tmp_path, None, None)) == 1


def test_short_rows_have_no_text(tmp_path: Path) -> None:
    path = write(tmp_path, "id\tdesc\n1\n\n2\tb\n")
    items = read_text_items(path, None, None)
    assert [(i.item_id, i.raw) for i in items] == [("1", None), ("2", "b")]


def test_a_row_that_is_not_utf8_fails_alone(tmp_path: Path) -> None:
    bad = tmp_path / "mixed.tsv"
    bad.write_bytes("id\tdesc\n1\tcaf\xe9\n2\tfine\n".encode("latin-1"))
    items = read_text_items(bad, None, None)
    assert items[0].raw == BadText("the text is not valid UTF-8; re-encode the file as UTF-8")
    assert (items[1].item_id, items[1].raw) == ("2", "fine")
    header = tmp_path / "header.tsv"
    header.write_bytes("id\tdescripci\xf3n\n1\ta\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"header row is not UTF-8"):
        read_text_items(header, None, None)


def test_pandas_missing_markers_are_missing_texts(tmp_path: Path) -> None:
    path = write(tmp_path, "id\tdesc\n1\tNaN\n2\tnull\n3\tNaNa is fine\n4\t\n")
    items = read_text_items(path, None, None)
    assert isinstance(items[0].raw, BadText) and "'NaN'" in items[0].raw.reason
    assert isinstance(items[1].raw, BadText)
    assert items[2].raw == "NaNa is fine"
    assert items[3].raw == ""  # empty: the loader reports "the text is empty"


def test_quoting_embedded_tabs_and_newlines(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'id\tdesc\n1\t"tab\there and\nnewline"\n2\t5" screen, "best"\n3\ttoo\tmany\n'
    )
    items = read_text_items(path, None, None)
    assert [i.item_id for i in items] == ["1", "2", "3"]
    assert items[0].raw == "tab\there and\nnewline"
    assert items[1].raw == '5" screen, "best"'  # quotes inside a cell are text
    assert items[1].origin.endswith(":4")  # line numbers count the quoted newline
    assert isinstance(items[2].raw, BadText) and "3 cells, the header 2" in items[2].raw.reason


def test_unclosed_quote_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'id\tdesc\n1\tok\n2\t"never closed\n3\tlost\n')
    with pytest.raises(DataError, match=r"d.tsv:3: the row starting on this line is badly"):
        read_text_items(path, None, None)


def test_a_quote_followed_by_text_names_the_tab_it_expected(tmp_path: Path) -> None:
    path = write(tmp_path, 'id\tdesc\n1\t"a "quoted" text\n2\tok\n')
    with pytest.raises(DataError, match=r"d.tsv:2: .* badly quoted \('\\t' expected after") as e:
        read_text_items(path, None, None)
    assert "\t" not in str(e.value)  # printed as an escape, not as blank space


def test_blank_lines_before_the_header_are_skipped_as_pandas_skips_them(tmp_path: Path) -> None:
    items = read_text_items(write(tmp_path, "\n\nid\tdesc\n\n1\ta\n"), None, None)
    assert [(i.item_id, i.raw) for i in items] == [("1", "a")]
    # Lines of spaces are blank to pandas too, before the header or among the rows.
    items = read_text_items(write(tmp_path, "   \nid\tdesc\n1\ta\n  \n2\tb\n"), None, None)
    assert [(i.item_id, i.raw, i.origin) for i in items] == [
        ("1", "a", "d.tsv:3"),
        ("2", "b", "d.tsv:5"),
    ]


def test_a_header_of_empty_cells_is_refused_naming_its_line(tmp_path: Path) -> None:
    """A first row of tabs (and spaces) would name no column, and the real header below it
    would be embedded as an item (what pandas, and so Ducho, does)."""
    from ducho_fast.data.text.tsv import check_text_table

    for first in ("\t", " \t ", "\t\t"):
        path = write(tmp_path, f"\n{first}\nitem_id\tdesc\nA\thello\n")
        expected = r"d\.tsv:2: the header row .* has only empty cells"
        with pytest.raises(DataError, match=expected):
            read_text_items(path, None, None)  # the defaults took the real header as an item
        with pytest.raises(DataError, match=expected):
            check_text_table(path, "item_id", "desc")  # before any work


def test_a_header_cell_padded_or_empty_is_quoted_in_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, "id\t desc\t\n1\ta\tb\n")
    with pytest.raises(DataError, match=r"the header has: id, ' desc', ''\.$"):
        read_text_items(path, "id", "desc")


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"the file is empty"):
        read_text_items(write(tmp_path, "", "empty.tsv"), None, None)
    with pytest.raises(DataError, match=r"does not exist"):
        read_text_items(tmp_path / "nope.tsv", None, None)
    os.mkfifo(tmp_path / "piped.tsv")  # a shell's <(zcat texts.tsv.gz): it could be read once
    with pytest.raises(DataError, match=r"piped\.tsv is not a regular file but a named pipe: a t"):
        read_text_items(tmp_path / "piped.tsv", None, None)


def test_check_refuses_a_table_with_no_data_rows(tmp_path: Path) -> None:
    from ducho_fast.data.text.tsv import check_text_table

    for text in ("id\tdesc\n", "id\tdesc\n\n\n"):
        path = write(tmp_path, text)
        with pytest.raises(DataError, match=r"d\.tsv: the file has a header row but no data"):
            check_text_table(path, None, None)
    for blank in ("", "\n\n"):
        with pytest.raises(DataError, match=r"the file is empty or blank; it needs a header row"):
            check_text_table(write(tmp_path, blank), None, None)  # it said "no column 'item_id'"


def test_check_names_bad_columns_as_reading_would(tmp_path: Path) -> None:
    from ducho_fast.data.text.tsv import check_text_table, read_interaction_items

    path = write(tmp_path, "id\tdesc\n1\ta\n")
    check_text_table(path, "id", "desc")
    with pytest.raises(DataError, match=r"no column 'asin' \(from 'item_column'\)"):
        check_text_table(path, "asin", None)
    with pytest.raises(DataError, match=r"interactions need a user, an item and a text column"):
        check_text_table(path, None, None, interactions=True)
    with pytest.raises(DataError, match=r"no column 'user' \(from 'interaction_columns'\)"):
        check_text_table(path, None, "desc", ("user", "id"), interactions=True)
    reviews = write(tmp_path, "user\titem\treview\nu1\ti1\tgood\n", "r.tsv")
    check_text_table(reviews, None, None, interactions=True)
    assert [i.item_id for i in read_interaction_items(reviews, None, None)] == ["u1__i1"]


def test_a_configured_column_named_twice_reads_the_first_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pandas (so Ducho) reads the first of two columns of one name; that stays, and the check
    a run makes before any work says which was read, and how to read the other."""
    from ducho_fast.data.text.tsv import check_text_table, read_interaction_items

    path = write(tmp_path, "id\tdesc\tdesc\tid\n1\tfirst\tsecond\t9\n")
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        check_text_table(path, "id", "desc")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: the header names the column 'id' (from 'item_column') 2 times, as columns "
        "1, 4; the first is read, as Ducho (pandas) reads it. Rename the others if one of "
        "them is meant.",
        f"{path}: the header names the column 'desc' (from 'text_column') 2 times, as columns "
        "2, 3; the first is read, as Ducho (pandas) reads it. Rename the others if one of "
        "them is meant.",
    ]
    (item,) = read_text_items(path, "id", "desc")
    assert (item.item_id, item.raw) == ("1", "first")

    caplog.clear()
    reviews = write(tmp_path, "user\titem\tuser\treview\nu1\ti1\tu2\tgood\n", "r.tsv")
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        check_text_table(reviews, None, "review", ("user", "item"), interactions=True)
        check_text_table(reviews, None, None, interactions=True)  # no name: nothing to warn
    assert [r.getMessage()[len(str(reviews)) :] for r in caplog.records] == [
        ": the header names the column 'user' (from 'interaction_columns') 2 times, as "
        "columns 1, 3; the first is read, as Ducho (pandas) reads it. Rename the others if "
        "one of them is meant."
    ]
    assert [i.item_id for i in read_interaction_items(reviews, ("user", "item"), None)] == [
        "u1__i1"
    ]


def test_check_reads_only_up_to_the_first_data_row(tmp_path: Path) -> None:
    """A bad row further down is found when the job reads the table, not by the check."""
    from ducho_fast.data.text.tsv import check_text_table

    path = write(tmp_path, 'id\tdesc\n1\tfine\n2\t"never closed\n')
    check_text_table(path, None, None)
    with pytest.raises(DataError, match=r"d\.tsv:3: the row starting on this line is badly"):
        read_text_items(path, None, None)


def test_an_unreadable_table_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    from ducho_fast.data.text.tsv import check_text_table

    path = write(tmp_path, "id\tdesc\n1\ta\n")

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)  # root reads any file: simulate the denial
    for read in (
        lambda: read_text_items(path, None, None),
        lambda: check_text_table(path, None, None),
    ):
        with pytest.raises(DataError, match=r"d\.tsv: cannot be read \(Permission denied\); check"):
            read()


def test_reading_a_large_table_holds_no_rows_beside_the_items(tmp_path: Path) -> None:
    """The rows are read as the items are made: at the peak, memory is the items' (plus a
    little), not the items' and every row's, which took 40% more for a table of millions."""
    import tracemalloc

    text = "A sturdy kettle of brushed steel with a whistle and a cool-touch handle. " * 2
    path = write(tmp_path, "id\tdesc\n" + "".join(f"B{k:09d}\t{text}{k}\n" for k in range(20000)))
    tracemalloc.start()
    try:
        items = read_text_items(path, None, None)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(items) == 20000 and items[-1].raw == f"{text}19999"
    assert peak < 1.1 * held, (held, peak)


BODY = 'item_id\tdescription\nA1\thello \u00e9\n\nA2\t"two\nlines"\nA3\tlast\n'
WANTED = [("A1", "hello \u00e9", 2), ("A2", "two\nlines", 4), ("A3", "last", 6)]


def _zipped(*members: tuple[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members:
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("d.tsv.gz", gzip.compress(BODY.encode())),
        ("d.tsv", gzip.compress(BODY.encode())),  # told by its content, not its name
        ("d.tsv.bz2", bz2.compress(BODY.encode())),
        ("d.tsv.xz", lzma.compress(BODY.encode())),
        (
            "d.zip",
            _zipped(
                ("d.tsv", BODY),
                ("__MACOSX/._d.tsv", "x"),
                ("__MACOSX/Icon", "x"),
                ("sub/.DS_Store", "x"),
            ),
        ),
        ("excel.txt", BODY.encode("utf-16")),  # Excel's "Unicode Text": UTF-16 LE with a mark
        ("d.tsv", b"\xfe\xff" + BODY.encode("utf-16-be")),
        ("d.tsv.gz", gzip.compress(BODY.encode("utf-16"))),
    ],
)
def test_compressed_and_utf16_tables_read_as_the_plain_one(
    tmp_path: Path, name: str, content: bytes
) -> None:
    """pandas (so Ducho) reads .gz, .bz2, .xz and .zip tables decompressed; a UTF-16 table
    (which pandas fails on) is read as its byte order mark says."""
    from ducho_fast.data.text.tsv import check_text_table

    path = tmp_path / name
    path.write_bytes(content)
    check_text_table(path, "item_id", "description")
    items = read_text_items(path, "item_id", "description")
    assert [(i.item_id, i.raw, i.origin) for i in items] == [
        (item_id, text, f"{name}:{line}") for item_id, text, line in WANTED
    ]


def test_a_broken_or_unread_compressed_table_says_what_it_is(tmp_path: Path) -> None:
    from ducho_fast.data.text.tsv import check_text_table

    rows = "".join(f"A{i}\t{i * 7919 % 104729} {i**3}\n" for i in range(5000))
    whole = gzip.compress(("item_id\tdescription\n" + rows).encode())
    cut = write(tmp_path, "", "cut.tsv.gz")
    cut.write_bytes(whole[: len(whole) // 2])
    check_text_table(cut, None, None)  # its start reads well: the check stops there
    with pytest.raises(
        DataError,
        match=r"cut\.tsv\.gz: the gzip-compressed file cannot be read "
        r"\(Compressed file ended before the end-of-stream marker was reached\): "
        r"it is corrupt or cut short",
    ):
        read_text_items(cut, None, None)
    flipped = tmp_path / "flip.tsv.xz"
    data = bytearray(lzma.compress(("item_id\tdescription\n" + rows).encode()))
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"flip\.tsv\.xz: the xz-compressed file cannot be read"):
        read_text_items(flipped, None, None)
    two = tmp_path / "two.zip"
    two.write_bytes(_zipped(("a.tsv", BODY), ("b.tsv", BODY)))
    with pytest.raises(
        DataError,
        match=r"holds one file, as pandas reads it; this one holds 2 "
        r"files \(a\.tsv, b\.tsv\)",
    ):
        check_text_table(two, None, None)
    zstd = tmp_path / "d.tsv.zst"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(16))
    with pytest.raises(DataError, match=r"Zstandard-compressed, which is not read here"):
        check_text_table(zstd, None, None)


def test_a_utf16_table_with_bytes_it_cannot_decode_keeps_its_other_rows(tmp_path: Path) -> None:
    """Half a surrogate pair, an odd last byte: such rows are bad items (as rows of bytes that
    are not UTF-8 are), not an error of the whole table."""
    half = "A3\t".encode("utf-16-le") + b"\x00\xd8" + "x\n".encode("utf-16-le")
    path = tmp_path / "d.tsv"
    path.write_bytes("item_id\tdescription\nA1\thello\n".encode("utf-16") + half + b"\x41")
    items = read_text_items(path, None, None)
    assert [i.item_id for i in items] == ["A1", "A3", "\udcff"]
    assert items[0].raw == "hello" and items[2].raw is None
    assert items[1].raw == BadText("the text is not valid UTF-16; re-encode the file as UTF-8")
    header = tmp_path / "header.tsv"
    header.write_bytes(
        "item_id\tdesc".encode("utf-16") + b"\x00\xd8" + "\nA1\tx\n".encode("utf-16-le")
    )
    with pytest.raises(DataError, match=r"header row is not UTF-16 text"):
        read_text_items(header, None, None)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_long_read_tells_how_far_it_got_in_the_files_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressed: bool
) -> None:
    """Every READING_ROWS rows, the bytes of the file read so far (the compressed file's,
    where it is), and the whole file at the end."""
    rng = random.Random(0)
    rows = "".join(f"{k}\t{rng.randbytes(rng.randrange(50, 500)).hex()}\n" for k in range(2000))
    body = ("id\ttext\n" + rows).encode()
    path = tmp_path / "d.tsv"
    path.write_bytes(gzip.compress(body) if compressed else body)
    size = path.stat().st_size
    monkeypatch.setattr(tsv, "READING_ROWS", 100)
    told: list[tuple[int, int]] = []
    items = list(tsv.iter_text_items(path, None, None, lambda done, of: told.append((done, of))))
    assert len(items) == 2000
    assert len(told) == 2000 // 100 + 1 and told[-1] == (size, size)
    done = [d for d, _ in told]
    assert {of for _, of in told} == {size}
    assert done == sorted(done) and 0 < done[0] < size / 4 and done[-2] > size / 2
    assert list(tsv.iter_text_items(path, None, None)) == items  # no one told: the same rows
