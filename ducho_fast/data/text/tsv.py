"""Text items from a TSV: an id column and a text column, ids kept as strings.

Ducho reads the file with pandas, so numeric ids lose leading zeros (``007`` -> ``7.npy``);
here every id is the exact string in the file. The text column defaults to the last column
(Ducho v1), the id column to the first.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ducho_fast.config.paths import absent
from ducho_fast.data.items import Item, file_kind
from ducho_fast.data.text.compressed import BROKEN, broken, open_text
from ducho_fast.errors import DataError

log = logging.getLogger("ducho_fast")
csv.field_size_limit(1 << 30)
TAB, ESCAPED_TAB = "\t", "\\t"  # the csv module's messages print the delimiter as is


def resolve_tsv(path: Path) -> Path:
    """Ducho accepts the TSV itself or a folder holding exactly one file."""
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(files) == 1:
            return files[0]
        raise DataError(
            f"{path} is a folder with {len(files)} files; point 'input_path' at the TSV itself."
        )
    if path.exists():  # a named pipe (a shell's <(...)), a device: a table is read twice
        raise DataError(
            f"text input {path} is not a regular file but {file_kind(path.stat().st_mode)}: a "
            "table is read more than once (checked before any work, then read), so write it "
            "to a file and point 'input_path' at that."
        )
    raise DataError(f"text input {path} {absent(path)} (check 'input_path').")


@dataclass(frozen=True)
class BadText:
    """A row whose text cannot be used; the item fails with ``reason`` in input order."""

    reason: str


# What pandas (and so Ducho) reads as a missing value: such a cell has no text to embed.
MISSING_TEXT = frozenset(
    {
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)


def read_text_items(path: Path, item_column: str | None, text_column: str | None) -> list[Item]:
    """Items ``(id, text)`` in file order; blank lines are skipped.

    A row that cannot give a text (missing cell, a pandas missing-value marker such as ``NaN``,
    bytes that are not UTF-8, more cells than the header) keeps its place as an item whose raw
    value is a ``BadText``, so it is reported in order and the rows around it go on.
    """
    return list(iter_text_items(path, item_column, text_column))


def iter_text_items(
    path: Path, item_column: str | None, text_column: str | None, reading: Reading | None = None
) -> Iterator[Item]:
    """:func:`read_text_items` one item at a time, as the rows are read: a caller that keeps
    only some texts (a shard) never holds the table. ``reading``: see :data:`Reading`."""
    with _table(path, reading) as (tsv, header, rows, encoding):
        id_at, text_at = _text_columns(tsv, header, item_column, text_column)
        name = tsv.name
        for line_no, row in rows:
            id_value = row[id_at] if id_at < len(row) else ""
            text = _text(row, text_at, len(header), encoding)
            yield Item(id_value, f"{name}:{line_no}", text)


def read_interaction_items(
    path: Path, columns: tuple[str, str] | None, text_column: str | None
) -> list[Item]:
    """Interactions ``(<user>__<item>, review)`` in file order, Ducho's output naming.

    The user and item columns default to the first two, the text to the last. A row with an
    empty user or item cell is a bad item; the rows around it go on.
    """
    return list(iter_interaction_items(path, columns, text_column))


def iter_interaction_items(
    path: Path,
    columns: tuple[str, str] | None,
    text_column: str | None,
    reading: Reading | None = None,
) -> Iterator[Item]:
    """:func:`read_interaction_items` one item at a time, as the rows are read."""
    with _table(path, reading) as (tsv, header, rows, encoding):
        user_at, item_at, text_at = _interaction_columns(tsv, header, columns, text_column)
        name = tsv.name
        for line_no, row in rows:
            user = row[user_at] if user_at < len(row) else ""
            item = row[item_at] if item_at < len(row) else ""
            text = _text(row, text_at, len(header), encoding)
            if not user.strip() or not item.strip():
                which = "user" if not user.strip() else "item"
                text = BadText(f"the {which} cell is empty; an interaction needs both ids")
            yield Item(f"{user}__{item}", f"{name}:{line_no}", text)


def check_text_table(
    path: Path,
    item_column: str | None,
    text_column: str | None,
    interaction_columns: tuple[str, str] | None = None,
    *,
    interactions: bool = False,
) -> None:
    """Raise the DataError that reading the table would raise for its file, header or
    columns, or one saying it has no data rows: what a run checks of every job before any
    work. Reading stops at the first data row."""
    tsv = resolve_tsv(path)
    with _rows(tsv) as (encoding, rows, _):
        header = _header(tsv, rows, encoding)
        if interactions:
            _interaction_columns(tsv, header, interaction_columns, text_column)
            named: dict[str, list[str | None]] = {
                "interaction_columns": list(interaction_columns or ())
            }
        else:
            _text_columns(tsv, header, item_column, text_column)
            named = {"item_column": [item_column]}
        _warn_repeated(tsv, header, {**named, "text_column": [text_column]})
        if not any(_is_data(row) for _, row in rows):
            raise DataError(
                f"{tsv}: the file has a header row but no data rows, so there is nothing to "
                "extract. Check 'input_path'."
            )


Rows = Iterator[tuple[int, list[str]]]
# Told, every READING_ROWS rows of a table and at its end, how many of its file's bytes were
# read and the file's size: how far a long read got (a table of 100M rows takes minutes).
Reading = Callable[[int, int], None]
READING_ROWS = 8192


@contextmanager
def _table(
    path: Path, reading: Reading | None = None
) -> Iterator[tuple[Path, list[str], Rows, str]]:
    """The TSV, its checked header, its non-blank data rows with their first lines, read
    as they are taken (the file stays open in the block): a table of millions of rows is never
    held as rows beside the items made of them, which took 40% more memory at the peak; and
    the name of its encoding."""
    tsv = resolve_tsv(path)
    with _rows(tsv) as (encoding, rows, read):
        header = _header(tsv, rows, encoding)
        data: Rows = ((n, row) for n, row in rows if _is_data(row))
        if reading is not None:
            data = _told(data, read, _size(tsv), reading)
        yield tsv, header, data, encoding


def _size(tsv: Path) -> int:
    """The file's size in bytes; 0 where it cannot be told (removed since it was opened)."""
    try:
        return tsv.stat().st_size
    except OSError:
        return 0


def _told(rows: Rows, read: Callable[[], int], size: int, reading: Reading) -> Rows:
    """``rows``, telling ``reading`` how far the file was read as they are taken."""
    for k, row in enumerate(rows, 1):
        if k % READING_ROWS == 0:
            reading(read(), size)
        yield row
    reading(size, size)


def _header(tsv: Path, rows: Rows, encoding: str) -> list[str]:
    """The first row that is not blank (pandas, and so Ducho, skips blank lines)."""
    first = next((row for row in rows if _is_data(row[1])), None)
    if first is None:
        raise DataError(f"{tsv}: the file is empty or blank; it needs a header row.")
    line, header = first
    if any(_undecodable(h) for h in header):
        raise DataError(
            f"{tsv}: the header row is not {encoding} text. Re-encode the file as UTF-8."
        )
    if not any(h.strip() for h in header):  # tabs and spaces only: read as a header, every
        raise DataError(  # column unnamed, and the real header would be embedded as an item
            f"{tsv}:{line}: the header row (the first that is not blank) has only empty "
            f"cells ({len(header)}); it must name the columns. Remove that line."
        )
    return header


def _is_data(row: list[str]) -> bool:
    """Whether a row is not blank: pandas (Ducho) skips empty lines and lines of spaces."""
    return bool(row) and not (len(row) == 1 and not row[0].strip(" \t"))


@contextmanager
def _rows(tsv: Path) -> Iterator[tuple[str, Rows, Callable[[], int]]]:
    """The name of the table's encoding ("UTF-8" or "UTF-16"), ``(first line, cells)`` per
    row, decompressed and decoded as :func:`open_text` says (bytes the encoding cannot
    decode survive as surrogates), and how many bytes of the file were read. The file stays
    open in the block."""
    with ExitStack() as stack:
        try:
            f, kind, read = open_text(tsv, stack)
        except OSError as e:
            raise DataError(
                f"{tsv}: cannot be read ({e.strerror or e}); check its permissions."
            ) from e
        encoding = "UTF-16" if f.encoding == "utf-16" else "UTF-8"
        rows = _read_rows(tsv, f, kind)
        with closing(rows):
            yield encoding, rows, read


def _read_rows(
    tsv: Path, f: IO[str], kind: str | None
) -> Generator[tuple[int, list[str]], None, None]:
    reader = csv.reader(f, delimiter="\t", strict=True)
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except BROKEN as e:
        if kind is None:  # the disk's error, not the file's content
            raise
        raise broken(tsv, kind, e) from e
    except csv.Error as e:
        raise DataError(
            f"{tsv}:{start}: the row starting on this line is badly quoted "
            f"({str(e).replace(TAB, ESCAPED_TAB)}). A cell "
            'that starts with " must end with " and write quotes inside it as "". Fix the '
            "row, or remove the opening quote to keep quotes as plain text."
        ) from e


def _text_columns(
    tsv: Path, header: list[str], item_column: str | None, text_column: str | None
) -> tuple[int, int]:
    """Positions of the id and the text columns."""
    id_at = _column(header, item_column, 0, "item_column", tsv)
    text_at = _column(header, text_column, len(header) - 1, "text_column", tsv)
    if text_at == id_at:
        alone = " (the header has no other)" if len(header) == 1 else ""
        fix = _separator_hint(header) or " Set item_column and text_column."
        raise DataError(
            f"{tsv}: the text column '{header[text_at]}' is also the id column{alone}; each "
            f"item needs an id column and a text column.{fix}"
        )
    return id_at, text_at


def _interaction_columns(
    tsv: Path, header: list[str], columns: tuple[str, str] | None, text_column: str | None
) -> tuple[int, int, int]:
    """Positions of the user, the item and the text columns."""
    if columns is None and len(header) < 3:
        raise DataError(
            f"{tsv}: interactions need a user, an item and a text column; the header has "
            f"{len(header)} ({_names(header)}). Name them with interaction_columns: "
            "[USER, ITEM] and text_column." + _separator_hint(header)
        )
    user_name, item_name = columns if columns else (None, None)
    user_at = _column(header, user_name, 0, "interaction_columns", tsv)
    item_at = _column(header, item_name, 1, "interaction_columns", tsv)
    text_at = _column(header, text_column, len(header) - 1, "text_column", tsv)
    if text_at in (user_at, item_at):
        raise DataError(
            f"{tsv}: the text column '{header[text_at]}' is also an id column; set text_column."
        )
    return user_at, item_at, text_at


def _text(row: list[str], at: int, columns: int, encoding: str) -> str | BadText | None:
    if len(row) > columns:
        return BadText(
            f"the row has {len(row)} cells, the header {columns}: a tab inside the text? "
            'Put the text in quotes ("...") or replace its tabs.'
        )
    if at >= len(row):
        return None
    text = row[at]
    if _undecodable(text):
        return BadText(f"the text is not valid {encoding}; re-encode the file as UTF-8")
    if text.strip() in MISSING_TEXT and text.strip():
        return BadText(f"the text is a missing-value marker ({text.strip()!r}), as pandas reads it")
    return text


def _undecodable(text: str) -> bool:
    if text.isascii():  # most cells: no character that could be an undecodable byte
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _column(header: list[str], name: str | None, default: int, key: str, tsv: Path) -> int:
    if name is None:
        if not header or default < 0:
            raise DataError(f"{tsv}: the header row has no columns.")
        return default
    if name not in header:
        raise DataError(
            f"{tsv}: no column '{name}' (from '{key}'); the header has: {_names(header)}."
            + _separator_hint(header)
        )
    return header.index(name)


def _warn_repeated(tsv: Path, header: list[str], named: dict[str, list[str | None]]) -> None:
    """Warn where the header names a configured column more than once: the first is read, as
    pandas (so Ducho) reads it, and the others are ignored."""
    for key, names in named.items():
        for name in dict.fromkeys(n for n in names if n is not None):
            places = [str(at + 1) for at, cell in enumerate(header) if cell == name]
            if len(places) > 1:
                log.warning(
                    f"{tsv}: the header names the column '{name}' (from '{key}') "
                    f"{len(places)} times, as columns {', '.join(places)}; the first is read, "
                    "as Ducho (pandas) reads it. Rename the others if one of them is meant."
                )


def _separator_hint(header: list[str]) -> str:
    """What to say of a header of one cell holding commas or semicolons: a CSV file."""
    if len(header) != 1:
        return ""
    for separator, name in ((",", "comma"), (";", "semicolon")):
        if separator in header[0]:
            return (
                f" The header has no tab but has {name}s: the file looks {name}-separated. "
                "Tables are read tab-separated, as Ducho reads them (pandas, sep='\\t'): save "
                "it as tab-separated values (TSV)."
            )
    return ""


def _names(header: list[str]) -> str:
    """The header's cells as a message lists them; an empty or padded one quoted."""
    return ", ".join(h if h and h == h.strip() else repr(h) for h in header)
