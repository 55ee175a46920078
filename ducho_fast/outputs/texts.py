"""Which text each feature was made from, so a resumed run finds texts edited in the TSV.

A run writes ``ducho-fast.texts.json`` in each feature folder of a text model (a shard:
``ducho-fast.texts.shard-i-of-N.json``): for each id with a feature, a short digest of the
text as listed (before cleaning, whose setting is in the feature key). A resumed run embeds
again the ids whose text digest changed. A record vouches only for features written before it
was saved: a feature written after it (by a run that was killed before saving its own record)
is unknown, as are features of versions that kept no record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ducho_fast.outputs.records import save_record, vouched

if TYPE_CHECKING:
    from ducho_fast.runtime.shard import Shard

KIND = "texts"
SCHEMA_VERSION = 1


def recorded_texts(folders: Iterable[Path], written: Mapping[str, int]) -> dict[str, str]:
    """``{id: digest}`` for the features of ``written`` (id: st_mtime_ns of the feature, the
    oldest over a model's layer folders) that a record of every one of ``folders`` vouches for:
    saved after the feature was written."""
    return vouched(folders, KIND, written, _digest)


def save_texts(folders: Iterable[Path], shard: Shard | None, digests: Mapping[str, str]) -> None:
    """Record ``digests`` (the ids this run has features for, and their texts) in each folder;
    a plain run covers every window, so its record replaces the shards' records."""
    texts = digests if isinstance(digests, dict) else dict(digests)  # json takes dicts only
    text = json.dumps({"schema_version": SCHEMA_VERSION, "texts": texts}) + "\n"
    save_record(folders, KIND, shard, text if digests else None)


def _digest(entry: Any) -> str | None:
    return entry if isinstance(entry, str) else None
