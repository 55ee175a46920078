"""A plain run's texts: digests held for the whole table, the texts read again as they run."""

from __future__ import annotations

import errno
import gc
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ducho_fast.config import load_config
from ducho_fast.config.model import Job
from ducho_fast.data.items import Item
from ducho_fast.data.sources import TextLoader, job_items
from ducho_fast.data.text.deferred import TableTexts, TextDigest, digest_of, text_digest
from ducho_fast.data.text.tsv import BadText

ITEMS = "id\ttext\na\tone\nb\t   \nc\ttwo\nd\tNaN\n\n../e\tbad id\nf\tthree\ng\tfour\n"
INTERACTIONS = "u\ti\ttext\nu\ta\tone\nu\tb\t \nu\tc\ttwo\n\td\tno user\nu\tf\tthree\n"


def _job(tmp_path: Path, origin: str, table: str) -> Job:
    (tmp_path / "t.tsv").write_text(table)
    block = {"input_path": "t.tsv", "output_path": "out", "model": [{"model_name": "m"}]}
    config = {"dataset_path": str(tmp_path), "textual": {origin: block}}
    return load_config(config).jobs[0]


@pytest.mark.parametrize(("origin", "table"), [("items", ITEMS), ("interactions", INTERACTIONS)])
def test_deferred_items_hold_digests_and_their_texts_come_back(
    tmp_path: Path, origin: str, table: str
) -> None:
    job = _job(tmp_path, origin, table)
    whole = job_items(job)
    deferred = job_items(job, defer_texts=True)
    assert whole.texts is None and deferred.texts is not None
    assert deferred.bad == whole.bad and len(deferred.good) == len(whole.good)
    for mine, full in zip(deferred.good, whole.good, strict=True):
        assert (mine.item_id, mine.origin) == (full.item_id, full.origin)
        text = full.raw
        if isinstance(text, str) and text.strip():  # a text to embed: its digest alone
            assert type(mine.raw) is TextDigest and mine.raw == text_digest(text)
            assert digest_of(mine.raw) is mine.raw and digest_of(text) == mine.raw
        else:  # a blank text, a bad row: as it is, to fail without reading
            assert mine == full
    # Filled in windows, in order, as a run's reader does: the items of a whole read.
    cursor = deferred.texts.cursor()
    filled = [*cursor.fill(deferred.good[:2]), *cursor.fill(deferred.good[2:])]
    cursor.close()
    assert filled == whole.good
    assert sum(isinstance(i.raw, BadText) for i in filled) >= 1


def test_a_shard_keeps_its_own_texts(tmp_path: Path) -> None:
    job = _job(tmp_path, "items", ITEMS)
    part = job_items(job, lambda k: k % 2 == 0, defer_texts=True)
    assert part.texts is None
    assert not any(isinstance(i.raw, TextDigest) for i in part.good)
    assert part.good[0] == Item("a", "t.tsv:2", "one")


def _deferred(tmp_path: Path) -> tuple[Path, list[Item], TableTexts]:
    job = _job(tmp_path, "items", ITEMS)
    items = job_items(job, defer_texts=True)
    assert items.texts is not None
    return tmp_path / "t.tsv", items.good, items.texts


def _reasons(items: Sequence[Item]) -> dict[str, str | None]:
    return {i.item_id: i.raw.reason if isinstance(i.raw, BadText) else None for i in items}


def test_a_row_edited_after_the_read_fails_saying_so_and_the_rest_go_on(tmp_path: Path) -> None:
    table, good, texts = _deferred(tmp_path)
    table.write_text(ITEMS.replace("two", "TWO").replace("g\tfour", "g\tfour\nh\tfive"))
    filled = texts.cursor().fill(good)
    reasons = _reasons(filled)
    assert "the text at line 4 is not the one read when the run started" in str(reasons["c"])
    assert "Run extract again" in str(reasons["c"])
    assert [i.raw for i in filled if i.item_id in "afg"] == ["one", "three", "four"]


def test_rows_gone_after_the_read_fail_saying_so(tmp_path: Path) -> None:
    table, good, texts = _deferred(tmp_path)
    table.write_text(ITEMS.split("f\t")[0])  # cut short before f
    reasons = _reasons(texts.cursor().fill(good))
    assert reasons["a"] is None and reasons["c"] is None
    assert "the table ends before line 8 now" in str(reasons["f"])
    assert "the table ends before line 9 now" in str(reasons["g"])
    # A row removed from the middle: the next row's line follows, the text is not there.
    table.write_text(ITEMS.replace("c\ttwo\n", ""))
    reasons = _reasons(texts.cursor().fill(good))
    assert "the text at line 4 is not the one" in str(reasons["c"])
    assert "the text at line 8 is not the one" in str(reasons["f"])  # the lines moved up
    assert "the table ends before line 9 now" in str(reasons["g"])


def test_a_table_that_cannot_be_read_again_fails_its_rows_not_the_run(tmp_path: Path) -> None:
    table, good, texts = _deferred(tmp_path)
    cursor = texts.cursor()
    assert [i.raw for i in cursor.fill(good[:1])] == ["one"]
    cursor.close()  # as a run ends: a new cursor opens the table again
    table.unlink()
    reasons = _reasons(texts.cursor().fill(good))
    assert "the table could not be read again for this row's text" in str(reasons["a"])
    assert "t.tsv" in str(reasons["a"]) and "Run extract again" in str(reasons["a"])
    assert all(reasons[i] for i in "acfg")


def test_a_read_that_fails_midway_fails_the_rows_after_it(tmp_path: Path) -> None:
    _, good, texts = _deferred(tmp_path)
    rows = iter(list(texts.cursor().fill(good)))

    def read() -> Iterator[Item]:  # a disk that fails after the first row
        yield next(rows)
        raise OSError(errno.EIO, "Input/output error")

    reasons = _reasons(TableTexts(read).cursor().fill(good))
    assert reasons["a"] is None
    assert "could not be read again for this row's text ([Errno 5]" in str(reasons["c"])
    assert reasons["b"] is None and "could not" not in str(reasons["d"])  # never deferred
    assert all("could not be read again" in str(reasons[i]) for i in "cfg")


def test_the_text_loader_never_embeds_a_digest(tmp_path: Path) -> None:
    _, good, _ = _deferred(tmp_path)
    loader = TextLoader(clean=False)
    loader.check_listed(good[0])  # a text to embed: not settled as failing
    with pytest.raises(RuntimeError, match="not read again"):
        loader.decode(good[0])


def test_a_deferred_table_holds_a_small_part_of_its_texts(tmp_path: Path) -> None:
    """What a plain run holds of a table of long texts: their digests, not the texts."""
    rows = "".join(f"item{k}\t{'word ' * 400}{k}\n" for k in range(2000))  # 2 KB texts
    job = _job(tmp_path, "items", "id\ttext\n" + rows)

    def held(defer: bool) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            items = job_items(job, defer_texts=defer)
            size = tracemalloc.get_traced_memory()[0]
            assert len(items.good) == 2000
            return size
        finally:
            tracemalloc.stop()

    eager, deferred = held(False), held(True)
    assert eager > 2000 * 1000
    assert deferred < eager / 4, (eager, deferred)
