"""Run records beside the features: ``ducho-fast.<kind>.json``, or a shard's
``ducho-fast.<kind>.shard-i-of-N.json``. Each run writes its own at the end; readers merge
them; a plain run saw every window, so its record replaces the shards' records."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ducho_fast.errors import OutputError
from ducho_fast.outputs.atomic import write_text

if TYPE_CHECKING:
    from ducho_fast.runtime.shard import Shard


def record_name(kind: str, shard: Shard | None) -> str:
    """``ducho-fast.<kind>.json``, or a shard's ``ducho-fast.<kind>.shard-0-of-4.json``."""
    return f"ducho-fast.{kind}.json" if shard is None else f"ducho-fast.{kind}.{shard.tag}.json"


def record_files(folder: Path, kind: str) -> list[Path]:
    """Every record of ``kind`` in ``folder``: a plain run's and the shards'. The folder's
    entries are filtered as they are listed: it holds a feature file per item, and a glob
    holds them all at once (180 bytes an entry, 1.8 GB at 10 million)."""
    prefix = f"ducho-fast.{kind}"
    try:
        with os.scandir(folder) as entries:
            names = [
                e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(".json")
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(folder / name for name in names)


def forget_records(folder: Path, kind: str) -> None:
    for path in record_files(folder, kind):
        path.unlink(missing_ok=True)


def save_record(folders: Iterable[Path], kind: str, shard: Shard | None, text: str | None) -> None:
    """Write ``text`` as this run's record of ``kind`` in each folder (None: nothing to
    record, so no file); a plain run's record replaces the shards' records."""
    for folder in folders:
        path = folder / record_name(kind, shard)
        try:
            if shard is None:
                forget_records(folder, kind)
            if text is not None:
                write_text(path, text)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            raise OutputError(
                f"cannot write {path}: {e.strerror or e}. The features are written; check that "
                "the folder is writable and that the disk has space, then run again."
            ) from e
