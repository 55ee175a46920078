"""What every modality's reader yields: items with ids, and the record of bad ones."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

from ducho_fast.config.paths import absent
from ducho_fast.errors import DataError, UnreadableFile


@dataclass(frozen=True, slots=True)
class Item:
    """One thing to embed: its id (the output file stem), where it came from, its raw input.
    Slotted: a run holds one per input (a large text job's whole table)."""

    item_id: str
    origin: str
    raw: Any


# What a ``--shard`` task holds at the places of the items other tasks read: windows are cut
# by position, so each keeps its place, but nothing of it is read. One object for all: an
# item of its own with its id took 136 bytes a row, 13 GB per task of a 100M-row table.
ELSEWHERE = Item("", "", None)


class FilePath:
    """The path of a listed input file (an image or a clip): what ``Item.raw`` holds for
    them. A path string that open, ``os.stat`` and PIL take (``__fspath__``), 48 bytes where
    a ``pathlib.Path`` costs about 260 with its list of parts: a job holds one per input, and
    10M images listed as Paths took 2 GB more. ``str`` gives the path."""

    __slots__ = ("_path",)

    def __init__(self, path: str) -> None:
        self._path = path

    def __fspath__(self) -> str:
        return self._path

    def __str__(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"FilePath({self._path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FilePath) and self._path == other._path

    def __hash__(self) -> int:
        return hash(self._path)

    def __reduce__(self) -> tuple[type[FilePath], tuple[str]]:
        return FilePath, (self._path,)


def source_name(source: Any, limit: int = 200) -> str:
    """How an error names one input: a path as written (shortened past ``limit``
    characters), an array by its shape and type, bytes by their count, an open file by its
    name; never a repr of its whole content."""
    if hasattr(source, "shape") and hasattr(source, "dtype"):
        return f"an array of shape {tuple(source.shape)} ({source.dtype})"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"{memoryview(source).nbytes} bytes in memory"
    if isinstance(source, str | os.PathLike):
        text = os.fsdecode(source)
    elif hasattr(source, "read"):
        name = getattr(source, "name", None)
        text = os.fsdecode(name) if isinstance(name, str | bytes) else "an open file"
    else:
        return type(source).__name__
    if not text:
        return "an empty path"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def error_reason(error: BaseException) -> str:
    """An error's words without the file name an OSError repeats (the message names it)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return error.strerror
    return str(error)


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

    @classmethod
    def of_input(cls, name: str, path: str | os.PathLike[str]) -> FileStamp:
        """An input file's stamp, taken before it is read (a file changed meanwhile differs);
        a DataError naming it where it is no regular file (what a link points at counts), an
        :class:`UnreadableFile` where it is empty. A named pipe would stop its reader for
        good: opening one waits for a writer."""
        try:
            info = os.stat(path)
        except OSError as e:  # a file just missing is the readers' "file not found"
            if e.errno == errno.ELOOP or os.path.islink(path):
                raise DataError(f"{name}: {absent(path)}.") from e
            raise
        if not stat.S_ISREG(info.st_mode):
            raise DataError(
                f"{name}: not a regular file but {file_kind(info.st_mode)}, which is not read. "
                "Replace it with the file, or move it out of the input folder."
            )
        stamp = cls(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
        if not info.st_size:  # the decoders would say only that they know no such format
            raise UnreadableFile(
                f"{name}: the file is empty (0 bytes), as a copy or download that did not "
                "finish leaves one. Copy it again, or remove it.",
                stamp,
            )
        return stamp


def file_kind(mode: int) -> str:
    """What an entry that is no regular file is, in words (``st_mode``: as ``os.stat``'s)."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "no file"


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
