"""Text items from a TSV: an id column and a text column, ids kept as strings.

Ducho reads the file with pandas, so numeric ids lose leading zeros (``007`` -> ``7.npy``);
here every id is the exact string in the file. The text column defaults to the last column
(Ducho v1), the id column to the first.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ducho_fast.data.items import Item
from ducho_fast.errors import DataError

csv.field_size_limit(1 << 30)


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
    raise DataError(f"text input {path} does not exist (check 'input_path').")


def read_text_items(path: Path, item_column: str | None, text_column: str | None) -> list[Item]:
    """Items ``(id, text)`` in file order; blank lines are skipped."""
    tsv = resolve_tsv(path)
    try:
        with tsv.open("r", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except UnicodeDecodeError as e:
        raise DataError(f"{tsv}: not UTF-8 text ({e}). Re-encode the file as UTF-8.") from e
    if not rows:
        raise DataError(f"{tsv}: the file is empty; it needs a header row.")
    header = rows[0]
    id_at = _column(header, item_column, 0, "item_column", tsv)
    text_at = _column(header, text_column, len(header) - 1, "text_column", tsv)
    items = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or row == [""]:
            continue
        id_value = row[id_at] if id_at < len(row) else ""
        text = row[text_at] if text_at < len(row) else None
        items.append(Item(id_value, f"{tsv.name}:{line_no}", text))
    return items


def _column(header: list[str], name: str | None, default: int, key: str, tsv: Path) -> int:
    if name is None:
        if not header or default < 0:
            raise DataError(f"{tsv}: the header row has no columns.")
        return default
    if name not in header:
        raise DataError(
            f"{tsv}: no column '{name}' (from '{key}'); the header has: {', '.join(header)}."
        )
    return header.index(name)
