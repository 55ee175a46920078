"""Item ids come from user data and are untrusted: they become file names only when safe."""

from __future__ import annotations

import re

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
