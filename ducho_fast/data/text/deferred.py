"""Texts a plain run reads twice: a digest of each row's text is held for the whole table, and
the texts themselves are read again, in table order, as the windows that embed them come.

A run holds every row of its table until it ends (its ids and what the output folders record
of them). Its texts were most of that: 316 of 854 bytes a row over reviews of 290 bytes on
average, and a table of long descriptions holds several times more. A text's 16-character
digest (what the folders' text records hold, see :mod:`ducho_fast.outputs.texts`) is all a run
needs of it until its window is embedded, and a run that embeds nothing (a job array's final
run, a resumed run with all done) never reads the texts again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from ducho_fast.data.items import Item
from ducho_fast.data.text.tsv import BadText
from ducho_fast.errors import DataError


def text_digest(text: str) -> str:
    """A 64-bit digest of a text: enough to tell an edit, short for a million ids."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class TextDigest(str):
    """What an item holds in place of a text that is read again before it is embedded: the
    text's :func:`text_digest` (a ``str``, so the records and maps of digests hold this very
    object). Only rows with a text to embed are deferred: a blank text or a bad row keeps what
    it is, so :func:`ducho_fast.runtime.pipeline.settled` sees it fail without reading."""

    __slots__ = ()


def digest_of(text: str) -> str:
    """The digest of an item's text, held (:class:`TextDigest`) or to take."""
    return text if isinstance(text, TextDigest) else text_digest(text)


def defer(rows: Iterable[Item]) -> Iterator[Item]:
    """``rows`` with each text to embed replaced by its :class:`TextDigest`."""
    for item in rows:
        text = item.raw
        if type(text) is str and text and not text.isspace():
            yield Item(item.item_id, item.origin, TextDigest(text_digest(text)))
        else:
            yield item


def line_of(origin: str) -> int:
    """The line a table's row was read from: its origin is ``<file name>:<line>``."""
    return int(origin.rpartition(":")[2])


class TableTexts:
    """The texts of a table's deferred rows; ``read`` reads its rows from the start, as the
    first read did (the same origins). Each pipeline run takes a :meth:`cursor`."""

    def __init__(self, read: Callable[[], Iterable[Item]]) -> None:
        self._read = read

    def cursor(self) -> TextCursor:
        return TextCursor(self._read)


class TextCursor:
    """One forward read of a table, filling the texts of the windows a run embeds, which come
    in table order. A row whose text is not the one first read (the table was edited, cut
    short or removed while the run read it) becomes a bad item saying so; the rows around it
    go on, and a later run embeds it."""

    def __init__(self, read: Callable[[], Iterable[Item]]) -> None:
        self._read = read
        self._rows: Iterator[Item] | None = None
        self._row: Item | None = None  # the last row read
        self._broken: str | None = None

    def fill(self, chunk: Sequence[Item]) -> Sequence[Item]:
        """``chunk`` with the texts of its deferred items read; the chunk itself if none is."""
        if not any(isinstance(item.raw, TextDigest) for item in chunk):
            return chunk
        return [self._filled(item) if isinstance(item.raw, TextDigest) else item for item in chunk]

    def close(self) -> None:
        rows, self._rows = self._rows, None
        if rows is not None and hasattr(rows, "close"):
            rows.close()

    def _filled(self, item: Item) -> Item:
        line = line_of(item.origin)
        row = self._row_at(line)
        if row is not None and isinstance(row.raw, str) and text_digest(row.raw) == item.raw:
            return Item(item.item_id, item.origin, row.raw)
        if self._broken is not None:
            reason = self._broken
        elif self._row is None:
            reason = (
                f"the table ends before line {line} now: it was cut short while the run read "
                "it. Run extract again to embed this row"
            )
        else:
            reason = (
                f"the text at line {line} is not the one read when the run started: the table "
                "was edited while the run read it. Run extract again to embed this row"
            )
        return Item(item.item_id, item.origin, BadText(reason))

    def _row_at(self, line: int) -> Item | None:
        """The row at ``line``, None if there is none (or the table cannot be read again)."""
        if self._broken is not None:
            return None
        try:
            if self._rows is None:
                self._rows = iter(self._read())
            while self._row is None or line_of(self._row.origin) < line:
                self._row = next(self._rows, None)
                if self._row is None:
                    return None
        except (OSError, DataError) as e:
            self.close()
            self._broken = (
                f"the table could not be read again for this row's text ({e}); it was moved "
                "or changed while the run read it. Run extract again to embed this row"
            )
            return None
        return self._row if line_of(self._row.origin) == line else None
