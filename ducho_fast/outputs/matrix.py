"""The matrix layout: one ``(N, D)`` array per model/layer, rows in a known id order.

Drop-in for MMRec (``image_feat.npy`` / ``text_feat.npy``, row ``i`` = item ``i`` of the
dataset's item order, given as an ``id_order`` file) and Cornac (``FeatureModality(features,
ids)``). The matrix is assembled only from complete per-item files (each written atomically),
so a killed run never leaves a matrix with half-written rows; it is written to a temporary file
through a memory map and renamed, so N x D never has to fit in memory twice. A matrix made from
the same rows, none of whose features was written since, is kept (``ducho-fast.matrix.json``
says what it was made from): a rerun does not read a million per-item files again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.data.items import FileStamp, ItemError
from ducho_fast.errors import DataError, OutputError
from ducho_fast.outputs.atomic import open_temp, write_text
from ducho_fast.outputs.ducho import load_feature
from ducho_fast.outputs.manifest import digest, feature_path, features
from ducho_fast.progress import ProgressFactory, Ticks, shown

MATRIX_DIR = "matrix"
IDS_FILE = "ids.txt"
MISSING_FILE = "missing.tsv"
RECORD_FILE = "ducho-fast.matrix.json"
FILE_NAMES = {"visual": "image_feat", "image": "image_feat", "textual": "text_feat"}
FILE_NAMES |= {"text": "text_feat", "audio": "audio_feat", "fused": "fused_feat"}
TICK_ROWS = 256  # the progress moves every this many rows (files read: 0.05-0.15 ms each here)


@dataclass
class MatrixResult:
    """One assembled matrix: where, how many rows, and which ids were filled or left out."""

    path: Path
    rows: int = 0
    filled: list[ItemError] = field(default_factory=list)
    dropped: list[ItemError] = field(default_factory=list)
    reused: bool = False  # kept from an earlier run: same rows, no feature written since


def read_id_order(path: Path) -> list[str]:
    """One id per line, as written (blank lines skipped; :func:`ordered_rows` matches a line
    with surrounding spaces to an id without them); duplicates are an error naming the line.
    A byte order mark (Notepad's, Excel's "UTF-8" text) is not part of the first id."""
    try:
        lines = path.read_text("utf-8-sig").splitlines()
    except FileNotFoundError as e:
        raise DataError(f"id order file {path} does not exist (check 'output.id_order').") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"id order file {path} cannot be read as UTF-8 text ({e}).") from e
    ids: list[str] = []
    seen: dict[str, int] = {}
    for number, item_id in enumerate(lines, start=1):
        key = item_id.strip()  # lines that differ only in surrounding spaces are one id
        if not key:
            continue
        if key in seen:
            first = lines[seen[key] - 1]
            raise DataError(
                f"{path}:{number}: id {item_id!r} is listed twice (first at line {seen[key]}"
                + ("" if item_id == first else f" as {first!r}")
                + "); matrix rows need one line per item."
            )
        seen[key] = number
        ids.append(item_id)
    if not ids:
        raise DataError(f"id order file {path} lists no ids.")
    return ids


def ordered_rows(id_order: Sequence[str], found: Container[str]) -> list[str]:
    """The id of each line of an id order file: the line as written where an item has that
    id (ids keep their spaces: a TSV's cell, a file's name, a matrix's ``ids.txt``), else
    without its surrounding spaces (a hand-written file's trailing spaces). No two lines give
    one id: :func:`read_id_order` refuses lines that differ only in those spaces."""
    return [i if i in found else i.strip() for i in id_order]


def write_matrix(
    parts: Path,
    target: Path,
    name: str,
    ids: Sequence[str],
    *,
    id_order: Sequence[str] | None = None,
    dtype: str = "float32",
    progress: ProgressFactory | None = None,
    label: str = "matrix",
) -> MatrixResult:
    """Stack the per-item files of ``parts`` into ``target/<name>.npy`` with ``ids.txt``.

    Args:
        ids: the run's items in input order; rows follow it unless ``id_order`` is given.
        id_order: every row's id. Ids with no feature get the mean of the others and are
            listed in ``missing.tsv``; features of ids it does not list are left out and listed.
        progress: shows the files read, under ``label`` (none when the matrix is kept).
    """
    found = features(parts)  # id: when written
    present = [i for i in ids if i in found]
    result = MatrixResult(target / f"{name}.npy")
    if id_order is None:
        rows: Sequence[str] = present
    else:
        rows = ordered_rows(id_order, found)
        listed = set(rows)
        reason = "not in the id_order file; left out of the matrix"
        result.dropped = [
            ItemError(i, str(feature_path(parts, i)), reason) for i in present if i not in listed
        ]
    if not present:
        raise DataError(f"{parts}: no features to assemble a matrix from.")
    missing = [i for i in rows if i not in found]
    result.filled = [
        ItemError(i, str(parts), "no feature (failed or not in the input); filled with the mean")
        for i in missing
    ]
    result.rows = len(rows)
    made_from = {
        "parts": str(parts),
        "dtype": dtype,
        "rows_sha256": digest(list(rows)),
        "missing_sha256": digest(missing),
        "left_out_sha256": digest([e.item_id for e in result.dropped]),
        # Rewriting a feature gives it a later time: then the matrix is made again.
        "newest_feature_ns": max(found[i] for i in rows if i in found),
    }
    if _unchanged(target, result.path, made_from):
        result.reused = True
        return result
    shape = _item_shape(load_feature(feature_path(parts, present[0])))
    averaged = [i for i in rows if i in found] if missing else []  # read twice: for the mean
    try:
        with shown(progress, label, len(averaged) + len(rows)) as tick:
            ticks = Ticks(tick, TICK_ROWS)
            mean = _mean(parts, averaged, shape, ticks) if missing else None
            _save(result.path, parts, found, rows, shape, mean, dtype, ticks)
            ticks.flush()
        write_text(target / IDS_FILE, "".join(f"{i}\n" for i in rows))
        _save_missing(target / MISSING_FILE, result.filled + result.dropped)
        record = {**made_from, "matrix": _stamp(result.path), "ids": _stamp(target / IDS_FILE)}
        write_text(target / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise OutputError(f"cannot write the matrix in {target}: {e.strerror or e}.") from e
    return result


def _unchanged(target: Path, matrix: Path, made_from: dict[str, Any]) -> bool:
    """Whether ``matrix`` (and its ids file) are the ones an earlier run made as
    ``made_from`` says, untouched since."""
    try:
        record = json.loads((target / RECORD_FILE).read_text(encoding="utf-8"))
        return (
            isinstance(record, dict)
            and {k: record.get(k) for k in made_from} == made_from
            and record.get("matrix") == _stamp(matrix)
            and record.get("ids") == _stamp(target / IDS_FILE)
        )
    except (OSError, ValueError):
        return False


def _stamp(path: Path) -> list[int]:
    stamp = FileStamp.of(path)
    return [stamp.size, stamp.mtime_ns, stamp.inode]


def _item_shape(array: np.ndarray) -> tuple[int, ...]:
    # (1, D) per-item files (Ducho's shape) and squeezed (D,) ones give the same rows.
    return tuple(array.shape[1:]) if array.ndim > 1 and array.shape[0] == 1 else array.shape


def _load(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    array = load_feature(path)
    if _item_shape(array) != shape:
        raise DataError(
            f"{path} has shape {array.shape}, other items {shape}: per-item shapes differ "
            "(token-level features?), so they cannot form one matrix. Use a pooled layer."
        )
    return array.reshape(shape)


def _mean(parts: Path, ids: Sequence[str], shape: tuple[int, ...], ticks: Ticks) -> np.ndarray:
    total = np.zeros(shape, dtype=np.float64)
    for item_id in ids:
        total += _load(feature_path(parts, item_id), shape)
        ticks.add()
    return (total / max(len(ids), 1)).astype(np.float32)


def _save(
    path: Path,
    parts: Path,
    found: Collection[str],
    rows: Sequence[str],
    shape: tuple[int, ...],
    mean: np.ndarray | None,
    dtype: str,
    ticks: Ticks,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp(path.parent, ".npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(rows), *shape))
        for row, item_id in enumerate(rows):
            out[row] = _load(feature_path(parts, item_id), shape) if item_id in found else mean
            ticks.add()
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_missing(path: Path, rows: list[ItemError]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    write_text(path, "item_id\treason\n" + "".join(f"{e.item_id}\t{e.reason}\n" for e in rows))
