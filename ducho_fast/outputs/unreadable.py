"""Input files that did not decode (damaged, or over a limit), recorded beside the features.

A run writes ``ducho-fast.unreadable.json`` in each feature folder of a model (a shard:
``ducho-fast.unreadable.shard-i-of-N.json``): for each such file, its path, its stamp before
reading (size, times, inode) and why it failed. A resumed run fails a recorded file unread
while its stamp is the same, so a window with a broken download among good files is not read
and run again on every resume; a file replaced or rewritten since is read again. Records are
taken only from runs that decoded alike (``decoding``, which holds the limits), and only
failures that last while the file does are recorded: its content, or a limit it is over (not a
failed read of the disk, not a permission).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ducho_fast.data.items import FileStamp, ItemError
from ducho_fast.outputs.records import forget_records, record_files, save_record

if TYPE_CHECKING:
    from ducho_fast.runtime.shard import Shard

KIND = "unreadable"
SCHEMA_VERSION = 1

Unreadable = dict[tuple[str, FileStamp], str]  # (origin, stamp) -> why it failed


def load_unreadable(folders: Iterable[Path], decoding: str) -> Unreadable:
    """The files recorded in every one of ``folders`` (a model's layer folders, which its
    runs write alike), by plain runs and shards, under the same ``decoding``."""
    known: Unreadable | None = None
    for folder in folders:
        mine = _load_folder(folder, decoding)
        known = mine if known is None else {k: v for k, v in known.items() if k in mine}
    return known or {}


def save_unreadable(
    folders: Iterable[Path], shard: Shard | None, decoding: str, errors: Sequence[ItemError]
) -> None:
    """Record the unreadable files among ``errors`` (those with a stamp) in each folder. A
    plain run saw every window, so its record replaces the shards' records."""
    files = [
        {"id": e.item_id, "path": e.origin, "stamp": asdict(e.stamp), "reason": e.reason}
        for e in errors
        if e.stamp is not None
    ]
    record = {"schema_version": SCHEMA_VERSION, "decoding": decoding, "files": files}
    save_record(folders, KIND, shard, json.dumps(record, indent=1) + "\n" if files else None)


def forget_unreadable(folder: Path) -> None:
    """Remove ``folder``'s records (a fresh run reads every file again)."""
    forget_records(folder, KIND)


def _load_folder(folder: Path, decoding: str) -> Unreadable:
    known: Unreadable = {}
    for path in record_files(folder, KIND):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable record (a killed write leaves none): its files are read again
        if not isinstance(record, Mapping) or record.get("decoding") != decoding:
            continue
        for entry in record.get("files") or []:
            parsed = _entry(entry)
            if parsed is not None:
                known[parsed[0]] = parsed[1]
    return known


def _entry(entry: Any) -> tuple[tuple[str, FileStamp], str] | None:
    try:
        stamp = FileStamp(**{k: int(v) for k, v in entry["stamp"].items()})
        return (str(entry["path"]), stamp), str(entry["reason"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
