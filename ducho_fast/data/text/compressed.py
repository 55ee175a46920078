"""A table file's text: plain or compressed, UTF-8 or UTF-16, told by its first bytes.

pandas (so Ducho) reads a ``.gz``, ``.bz2``, ``.xz`` or ``.zip`` table decompressed, telling
the compression by the file's suffix; here the file's own first bytes tell it, whatever it is
named (no text table starts with them). A UTF-16 table (Excel's "Unicode Text" export, tab
separated) is read as its byte order mark says, where pandas fails on it.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import lzma
import zipfile
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ducho_fast.errors import DataError

# What a compressed stream raises when its file is corrupt or cut short.
BROKEN = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")
_BZIP2_BLOCK = b"\x31\x41\x59\x26\x53\x59"


def compression(head: bytes) -> str | None:
    """The compression whose signature ``head`` (a file's first 10 bytes) starts with."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[4:10] == _BZIP2_BLOCK:
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "Zstandard"
    return None


def open_text(
    tsv: Path, stack: ExitStack
) -> tuple[io.TextIOWrapper, str | None, Callable[[], int]]:
    """``tsv``'s text, decompressed, its compression (None: plain) and how many of the file's
    bytes were read so far (a little ahead of the text taken), closed with ``stack``. Bytes
    that are not UTF-8 (UTF-16) survive as surrogates; a UTF-8 byte order mark (Excel's "CSV
    UTF-8") is dropped, as pandas drops it. An OSError is the file's (unreadable); a
    compressed file that is not what its signature says is a DataError."""
    raw = stack.enter_context(tsv.open("rb"))
    kind = compression(raw.peek(10)[:10])
    if kind == "Zstandard":
        raise DataError(
            f"{tsv}: the file is Zstandard-compressed, which is not read here: decompress it "
            "(zstd -d) and point 'input_path' at the result."
        )
    try:
        stream = _decompressed(tsv, raw, kind, stack)
        mark = stream.peek(2)[:2]
    except BROKEN as e:
        if kind is None:  # the disk's error: the caller says the file cannot be read
            raise
        raise broken(tsv, kind, e) from e
    if mark in _UTF16_MARKS:
        text = io.TextIOWrapper(stream, encoding="utf-16", errors=_UNDECODABLE, newline="")
    else:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    return stack.enter_context(text), kind, raw.tell


def _undecodable(error: UnicodeError) -> tuple[str, int]:
    """A lone surrogate for each byte UTF-16 cannot decode (an odd last byte, half a pair),
    which ``surrogateescape`` refuses below 0x80: the row is then a bad item, as one of bytes
    that are not UTF-8 is."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\udcff" * (error.end - error.start), error.end


_UNDECODABLE = "ducho-fast-undecodable"
codecs.register_error(_UNDECODABLE, _undecodable)


def broken(tsv: Path, kind: str | None, error: BaseException) -> DataError:
    """The error for a compressed table that cannot be read to its end."""
    reason = str(error) or type(error).__name__
    return DataError(
        f"{tsv}: the {kind}-compressed file cannot be read ({reason}): it is corrupt or cut "
        "short. Copy or compress it again."
    )


def _decompressed(tsv: Path, raw: io.BufferedReader, kind: str | None, stack: ExitStack) -> Any:
    """A binary stream of the file's content, with ``peek`` (as each of these has)."""
    if kind is None:
        return raw
    if kind == "gzip":
        return stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    if kind == "bzip2":
        return stack.enter_context(bz2.BZ2File(raw, "rb"))
    if kind == "xz":
        return stack.enter_context(lzma.LZMAFile(raw, "rb"))
    archive = stack.enter_context(zipfile.ZipFile(raw))
    return stack.enter_context(archive.open(_member(tsv, archive)))


def _member(tsv: Path, archive: zipfile.ZipFile) -> str:
    """The one file of a zip archive, as pandas takes it (macOS's ``__MACOSX`` records and
    hidden files aside)."""
    names = [
        name
        for name in archive.namelist()
        if not name.endswith("/")
        and not name.startswith("__MACOSX/")
        and not name.rsplit("/", 1)[-1].startswith(".")
    ]
    if len(names) != 1:
        found = f"{len(names)} files ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        raise DataError(
            f"{tsv}: a zip archive is read when it holds one file, as pandas reads it; this "
            f"one holds {found if names else 'none'}. Point 'input_path' at one table."
        )
    return names[0]
