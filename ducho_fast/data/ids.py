"""Item ids come from user data and are untrusted: they become file names only when safe."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from ducho_fast.errors import DataError

_MAX_NAME_BYTES = 255
# ducho-fast's temporary files (a write in progress, a killed run's leftovers) start so; they
# are never read as features and are removed when a run starts, so no id may start so.
TMP_PREFIX = ".tmp-"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_id(item_id: str, suffix: str = ".npy") -> str:
    """Return ``item_id`` if ``item_id + suffix`` is a safe single file name, else raise.

    Rejects separators, ``.``/``..``, NUL and control characters, names over 255 bytes (so no
    id can write outside its output folder) and the temporary files' prefix ``.tmp-``.
    """
    reason = unsafe_reason(item_id, suffix)
    if reason:
        raise DataError(f"item id {item_id!r} cannot be a file name: {reason}.")
    return item_id


def unsafe_reason(item_id: str, suffix: str = ".npy") -> str | None:
    if item_id in ("", ".", ".."):
        return "it is empty, '.' or '..'"
    if "/" in item_id or "\\" in item_id:
        return "it contains a path separator"
    if item_id.startswith(TMP_PREFIX):
        return f"it starts with {TMP_PREFIX!r}, which names ducho-fast's temporary files"
    if _CONTROL.search(item_id):
        return "it contains NUL or control characters"
    try:
        item_id.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if len((item_id + suffix).encode("utf-8")) > _MAX_NAME_BYTES:
        return f"the file name would exceed {_MAX_NAME_BYTES} bytes"
    return None


class Folding(NamedTuple):
    """How a file system takes file names: whether it ignores case (macOS and Windows by
    default) and whether it takes Unicode-equivalent names as one (macOS: an ``é`` typed as one
    code point or as ``e`` plus an accent), so that ids differing only so name one feature
    file; and which characters of :data:`ODD_CHARACTERS` it refuses in names (exFAT, FAT and
    NTFS: all of them)."""

    case: bool = False
    normalization: bool = False
    refused: str = ""

    def key(self) -> Callable[[str], str] | None:
        """The name under which such a file system stores an id; None where ids compare as
        they are. ``casefold`` folds at least what the file systems fold (a few more pairs,
        ``ß`` and ``ss``, are also taken as one: refused, never overwritten)."""
        if self.case and self.normalization:
            return lambda item_id: unicodedata.normalize("NFC", item_id).casefold()
        if self.case:
            return str.casefold
        if self.normalization:
            return lambda item_id: unicodedata.normalize("NFC", item_id)
        return None

    def refusal(self, item_id: str) -> str | None:
        """Why this file system cannot hold ``item_id``'s feature file, if it cannot."""
        if not self.refused:
            return None
        found = "".join(c for c in self.refused if c in item_id)
        if not found:
            return None
        return (
            f"the output folder's file system refuses {' '.join(found)} in file names; "
            "rename the item, or write to another file system"
        )

    def describe(self) -> str:
        ways = ["ignores case in file names"] if self.case else []
        ways += ["takes Unicode-equivalent file names as one"] if self.normalization else []
        return " and ".join(ways)


EXACT = Folding()
# Characters that Linux file systems take in names and others refuse (exFAT, FAT, NTFS).
ODD_CHARACTERS = ':*?"<>|'


def name_folding(folders: Iterable[Path]) -> Folding:
    """How the file systems that will hold ``folders`` take names (see :class:`Folding`),
    probed with files of ducho-fast's temporary prefix in each folder or its nearest existing
    parent (where the folder will be made), removed at once. A place that cannot be written to
    is taken as exact: the writer says what is wrong when it gets there."""
    case = normalization = False
    refused = ""
    for folder in folders:
        found = _probe(_existing(folder), characters=True)
        case, normalization = case or found.case, normalization or found.normalization
        refused += "".join(c for c in found.refused if c not in refused)
    return Folding(case, normalization, refused)


class FolderNames:
    """Folders as the file systems holding them name them: ``out/ResNet50`` and
    ``out/resnet50`` are one folder where case is ignored. Each existing folder is probed once."""

    def __init__(self) -> None:
        self._found: dict[Path, Folding] = {}

    def key(self, folder: Path) -> str:
        """The folder's absolute path, folded as its file system folds names."""
        folder = folder.resolve()
        base = _existing(folder)
        if base not in self._found:
            self._found[base] = _probe(base)
        fold = self._found[base].key()
        return str(folder) if fold is None else fold(str(folder))

    def folds(self, folder: Path) -> Folding:
        """How the file system of ``folder`` (probed by :meth:`key`) compares names."""
        return self._found.get(_existing(folder.resolve()), EXACT)


def _existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.is_dir() and folder.parent != folder:
        folder = folder.parent
    return folder


def _probe(folder: Path, *, characters: bool = False) -> Folding:
    """``characters``: also which of :data:`ODD_CHARACTERS` it refuses (where it can be
    written to at all)."""
    name = f"{TMP_PREFIX}names-{secrets.token_hex(4)}-"
    case = _same_file(folder, name + "A", name + "a")
    composed = name + "\u00e9"  # é as one code point, then as e and a combining accent
    normalization = _same_file(folder, composed, unicodedata.normalize("NFD", composed))
    refused = ""
    if characters and _same_file(folder, name + "x", name + "x"):
        refused = "".join(c for c in ODD_CHARACTERS if not _same_file(folder, name + c, name + c))
    return Folding(case, normalization, refused)


def _same_file(folder: Path, name: str, other: str) -> bool:
    """Whether ``other`` finds the file made as ``name`` in ``folder``; False where it cannot
    be made (a folder not writable, a name its file system refuses)."""
    path = folder / name
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return False
    try:
        return os.path.lexists(folder / other)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
