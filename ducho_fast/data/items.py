"""What every modality's reader yields: items with ids, and the record of bad ones."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Item:
    """One thing to embed: its id (the output file stem), where it came from, its raw input."""

    item_id: str
    origin: str
    raw: Any


@dataclass(frozen=True)
class FileStamp:
    """What tells that a file changed: its size, modification and change times, inode. A file
    replaced by a rename, rewritten, or given other permissions gets another stamp."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileStamp:
        info = os.stat(path)
        return cls(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


@dataclass(frozen=True)
class ItemError:
    """A bad item: recorded, counted and reported; the items around it go on.

    ``stamp`` is set for an input file that cannot be decoded while it stays the same
    (``UnreadableFile``): the file as it was before reading, so a resumed run can fail it
    unread while it is the same.
    """

    item_id: str
    origin: str
    reason: str
    stamp: FileStamp | None = None
