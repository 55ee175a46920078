"""Which input file each feature was made from, so a resumed run finds files changed in flight.

A run writes ``ducho-fast.files.json`` in each feature folder of an image or audio model (a
shard: ``ducho-fast.files.shard-i-of-N.json``): for each id with a feature, the size and
modification time (ns) its input file had when the run listed it, before reading it. A file
changed after it was read but before its feature was written has a time older than the
feature's, so comparing times alone (as ``make`` does) reuses its stale feature; comparing
with the time recorded at listing does not. No inode: a copy made with ``cp -a`` keeps the
rest. A record vouches only for features written before it was saved (see
:func:`ducho_fast.outputs.records.vouched`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ducho_fast.outputs.records import save_record, vouched

if TYPE_CHECKING:
    from ducho_fast.data.sources import Listed
    from ducho_fast.runtime.shard import Shard

KIND = "files"
SCHEMA_VERSION = 1


def recorded_files(folders: Iterable[Path], written: Mapping[str, int]) -> dict[str, Listed]:
    """``{id: (size, mtime_ns)}`` for the features of ``written`` (id: st_mtime_ns of the
    feature) that a record of every one of ``folders`` vouches for."""
    return vouched(folders, KIND, written, _listed)


def save_files(
    folders: Iterable[Path], shard: Shard | None, listed: Iterable[tuple[str, Listed]]
) -> None:
    """Record ``listed`` (the ids this run has features for, and their files as listed) in
    each folder; a plain run covers every window, so its record replaces the shards'. The
    JSON is written entry by entry: no second map of a million ids."""
    dumps = json.dumps
    entries = ",".join(f"{dumps(item_id)}:[{size},{mtime}]" for item_id, (size, mtime) in listed)
    text = f'{{"schema_version":{SCHEMA_VERSION},"{KIND}":{{{entries}}}}}\n'
    save_record(folders, KIND, shard, text if entries else None)


def _listed(entry: Any) -> Listed | None:
    if isinstance(entry, list) and len(entry) == 2 and all(type(v) is int for v in entry):
        size, mtime_ns = entry  # a time before 1970 is negative
        return (size, mtime_ns) if size >= 0 else None
    return None
