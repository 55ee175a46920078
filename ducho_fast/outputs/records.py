"""Run records beside the features: ``ducho-fast.<kind>.json``, or a shard's
``ducho-fast.<kind>.shard-i-of-N.json``. Each run writes its own at the end; readers merge
them; a plain run saw every window, so its record replaces the shards' records."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ducho_fast.errors import OutputError
from ducho_fast.outputs.atomic import write_text

if TYPE_CHECKING:
    from ducho_fast.runtime.shard import Shard

T = TypeVar("T")


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


def vouched(
    folders: Iterable[Path],
    kind: str,
    written: Mapping[str, int],
    parse: Callable[[Any], T | None],
) -> dict[str, T]:
    """``{id: entry}`` for the features of ``written`` (id: st_mtime_ns of the feature, the
    oldest over a model's layer folders) that a record of ``kind`` in every one of
    ``folders`` vouches for alike: saved after the feature was written. A record holds
    ``{"<kind>": {id: entry}}``; ``parse`` gives an entry from its JSON, None if malformed."""
    known: dict[str, T] | None = None
    for folder in folders:
        mine = _vouched(folder, kind, written, parse)
        known = mine if known is None else {k: v for k, v in known.items() if mine.get(k) == v}
    return known or {}


def _vouched(
    folder: Path, kind: str, written: Mapping[str, int], parse: Callable[[Any], T | None]
) -> dict[str, T]:
    known: dict[str, T] = {}
    for path in record_files(folder, kind):
        try:
            saved = path.stat().st_mtime_ns
            record: Any = json.loads(path.read_text(encoding="utf-8"))
            entries = record[kind]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no readable record: its features are unknown, as before records
        if not isinstance(entries, dict):
            continue
        for item_id, raw in entries.items():
            at = written.get(item_id)
            if at is not None and at <= saved:
                entry = parse(raw)
                if entry is not None:
                    known[item_id] = entry
    return known
