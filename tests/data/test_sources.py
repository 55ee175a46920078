"""A job's items: ids checked, and a shard's part of a text table kept as it is read."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ducho_fast.config import load_config
from ducho_fast.config.model import Job
from ducho_fast.data import sources
from ducho_fast.data.ids import Folding
from ducho_fast.data.items import ELSEWHERE, Item
from ducho_fast.data.sources import check_ids, job_items
from ducho_fast.data.text import tsv
from ducho_fast.data.text.tsv import BadText


def _job(tmp_path: Path, origin: str, table: str) -> Job:
    (tmp_path / "t.tsv").write_text(table)
    block = {"input_path": "t.tsv", "output_path": "out", "model": [{"model_name": "m"}]}
    config = {"dataset_path": str(tmp_path), "textual": {origin: block}}
    return load_config(config).jobs[0]


def _items(*ids: str) -> list[Item]:
    return [Item(i, f"t.tsv:{n + 2}", f"text {n}") for n, i in enumerate(ids)]


@pytest.mark.parametrize(
    ("origin", "table", "ids"),
    [
        (
            "items",
            "id\ttext\na\tone\na\tagain\n../b\ttwo\nc\tthree\nd\tNaN\ne\tfour\n",
            ["a", "c", "d", "e"],
        ),
        (
            "interactions",
            "u\ti\ttext\nu\ta\tone\nu\ta\tagain\n../v\tb\ttwo\nu\tc\tthree\nu\td\tNaN\n\te\tfour\n",
            ["u__a", "u__c", "u__d", "__e"],  # no user: an item that fails
        ),
    ],
)
def test_keep_drops_the_texts_of_other_positions_as_the_table_is_read(
    tmp_path: Path, origin: str, table: str, ids: list[str]
) -> None:
    job = _job(tmp_path, origin, table)
    whole = job_items(job)
    asked: list[int] = []

    def odd(k: int) -> bool:
        asked.append(k)
        return k % 2 == 1

    part = job_items(job, odd)
    # An id repeats, so the table is read twice (see table_ids): the first read, by hash
    # alone, takes the repeat for an item; the second's positions are those of the good
    # items (the duplicate and the unsafe id are not items), asked once each, in order.
    # The kept ones are as a whole read gives them, the others one placeholder.
    assert [i.item_id for i in whole.good] == ids
    assert asked == list(range(len(ids) + 1)) + list(range(len(ids)))
    for k, (mine, full) in enumerate(zip(part.good, whole.good, strict=True)):
        assert mine == full if k % 2 else mine is ELSEWHERE
    assert part.bad == whole.bad  # reported alike (by shard 0, see api._own_inputs)
    assert any(isinstance(i.raw, BadText) for i in part.good + whole.good)


def _table_rows() -> list[Item]:
    """Rows with every kind of bad id: repeated, unsafe, refused by the file system, taken as
    one by it, and two pairs joined into one id."""
    return _items("a__b", "x", "X", "q?", "../up", "y", "x", "b", "a__b", "z", "Y", "w")


def _read_counted(rows: list[Item]) -> tuple[list[str], Callable[[str], Iterator[Item]]]:
    """Reads of ``rows``, and why each was read again ("" the first time)."""
    reads: list[str] = []

    def read(again: str) -> Iterator[Item]:
        reads.append(again)
        return iter(rows)

    return reads, read


@pytest.mark.parametrize(
    ("hashes", "rows", "reads"),
    [
        ("python", _items("a", "b", "c", "d", "e"), 1),  # no id repeats: one read
        ("python", _items("a", "../b", "c", "../b", "e"), 1),  # nor does a good one
        ("python", _table_rows(), 2),
        ("one", _items("a", "b", "c", "d", "e"), 2),  # every name collides, none repeats
        ("one", _table_rows(), 2),
        ("two", _table_rows(), 2),
    ],
)
@pytest.mark.parametrize("folding", [Folding(), Folding(case=True, refused="?")])
def test_a_shard_holds_no_id_of_other_positions_and_finds_the_same_items(
    monkeypatch: pytest.MonkeyPatch,
    hashes: str,
    rows: list[Item],
    reads: int,
    folding: Folding,
) -> None:
    """A shard follows duplicates by hash and reads the table again only where two hashes
    are equal; whatever the hashes, its items and errors are a plain check's."""
    whole = check_ids(rows, [], folding=folding, joined=True)
    if hashes != "python":
        monkeypatch.setattr(sources, "name_hash", lambda name: 7 if hashes == "one" else len(name))
    read_count, read = _read_counted(rows)
    part = sources.table_ids(read, lambda k: k % 3 == 1, folding, True)
    assert len(read_count) == reads and read_count[0] == ""
    assert all(
        re.fullmatch(r" again, for the \d+ id\(s\) that may repeat", r) for r in read_count[1:]
    )
    assert len(part.good) == len(whole.good)
    for k, (mine, full) in enumerate(zip(part.good, whole.good, strict=True)):
        assert mine is full if k % 3 == 1 else mine is ELSEWHERE
    assert part.bad == whole.bad
    assert len(whole.bad) >= (3 if rows == _table_rows() else 0)
    read_count, read = _read_counted(rows)
    assert sources.table_ids(read, None, folding, True) == whole  # no shard: one plain read
    assert len(read_count) == 1


def test_two_interactions_joined_into_one_id_say_how(tmp_path: Path) -> None:
    """``a__b`` with ``c`` and ``a`` with ``b__c`` are both ``a__b__c``: a duplicate that the
    rows do not show, so its error says why; a pair given twice and an item table's id keep
    the plain message."""
    (tmp_path / "r").mkdir()
    (tmp_path / "i").mkdir()
    table = "u\ti\ttext\na__b\tc\tone\na\tb__c\ttwo\nu\tx\tthree\nu\tx\tfour\n"
    reasons = [e.reason for e in job_items(_job(tmp_path / "r", "interactions", table)).bad]
    assert reasons == [
        "bad id: duplicate id; first seen at t.tsv:2, which is kept (an interaction's id is "
        "<user>__<item>, so where a user or item id holds '__' two different pairs can make "
        "one id: rename one)",
        "bad id: duplicate id; first seen at t.tsv:4, which is kept",
    ]
    items = job_items(_job(tmp_path / "i", "items", "id\ttext\na__b__c\tone\na__b__c\ttwo\n"))
    assert [e.reason for e in items.bad] == [
        "bad id: duplicate id; first seen at t.tsv:2, which is kept"
    ]


def test_ids_a_file_system_takes_as_one_are_duplicates() -> None:
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    listed = _items("Photo", "photo", "PHOTO", "x", nfc, nfd, "photo")
    exact = check_ids(listed, [])
    assert [i.item_id for i in exact.good] == ["Photo", "photo", "PHOTO", "x", nfc, nfd]
    assert [(e.item_id, e.reason) for e in exact.bad] == [
        ("photo", "bad id: duplicate id; first seen at t.tsv:3, which is kept")
    ]
    caseless = check_ids(listed, [], folding=Folding(case=True, normalization=True))
    assert [i.item_id for i in caseless.good] == ["Photo", "x", nfc]
    assert [e.item_id for e in caseless.bad] == ["photo", "PHOTO", nfd, "photo"]
    assert caseless.bad[0].reason == (
        "bad id: its feature file would be that of 'Photo' (first seen at t.tsv:2, which is "
        "kept): the output folder's file system ignores case in file names and takes "
        "Unicode-equivalent file names as one; rename one of them"
    )
    assert f"that of {nfc!r} (first seen at t.tsv:6" in caseless.bad[2].reason
    windows = check_ids(listed, [], folding=Folding(case=True))
    assert [i.item_id for i in windows.good] == ["Photo", "x", nfc, nfd]
    fat = check_ids(_items("a:b", "a", "q?", "A"), [], folding=Folding(True, False, ":?"))
    assert [i.item_id for i in fat.good] == ["a"]
    assert [(e.item_id, e.reason.split(";")[0]) for e in fat.bad] == [
        ("a:b", "bad id: the output folder's file system refuses : in file names"),
        ("q?", "bad id: the output folder's file system refuses ? in file names"),
        (
            "A",
            "bad id: its feature file would be that of 'a' (first seen at t.tsv:3, which is "
            "kept): the output folder's file system ignores case in file names",
        ),
    ]


def caseless_outputs(monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """Output folders taken as on a file system that ignores case; returns the folders
    probed, one list per probe."""
    probed: list[list[Path]] = []

    def caseless(folders: list[Path]) -> Folding:
        probed.append(list(folders))
        return Folding(case=True)

    monkeypatch.setattr(sources, "name_folding", caseless)
    return probed


@pytest.mark.parametrize(
    ("origin", "table", "ids"),
    [
        ("items", "id\ttext\nPhoto\tone\nphoto\ttwo\n", ["Photo", "photo"]),
        ("interactions", "u\ti\ttext\nU\tx\tone\nu\tX\ttwo\n", ["U__x", "u__X"]),
    ],
)
def test_a_job_checks_its_ids_against_its_output_folders(
    tmp_path: Path, monkeypatch, origin: str, table: str, ids: list[str]
) -> None:
    job = _job(tmp_path, origin, table)
    assert [i.item_id for i in job_items(job).good] == ids  # this file system tells them apart
    probed = caseless_outputs(monkeypatch)
    items = job_items(job)
    assert probed == [[tmp_path / "out"]]
    assert [i.item_id for i in items.good] == ids[:1]
    assert "ignores case" in items.bad[0].reason


def test_a_shard_reading_a_table_holds_only_its_own_rows(tmp_path: Path) -> None:
    """What a task of ten holds at the peak while its part of a table is read: its rows and
    a hash a row, not every id (which took over 3x a plain read's ids and origins)."""
    rows = "".join(f"user{k:06d}\titem{k:06d}\tok\n" for k in range(20_000))
    job = _job(tmp_path, "interactions", "u\ti\ttext\n" + rows)
    peaks = []
    for keep in (None, lambda k: k // 100 % 10 == 3):
        tracemalloc.start()
        items = job_items(job, keep)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(items.good) == 20_000
    whole, part = peaks
    assert part < whole / 4


def test_reading_a_table_tells_the_status_how_far_it_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status hears how many of the table's MB were read, every few rows and at the end,
    also on a shard's second read (an id repeats), then None once the items are known."""
    monkeypatch.setattr(tsv, "READING_ROWS", 2)
    rows = "".join(f"u\ti{k}\ttext {k}\n" for k in range(5)) + "u\ti0\tagain\n"
    job = _job(tmp_path, "interactions", "u\ti\ttext\n" + rows)
    again = " again, for the 1 id(s) that may repeat"
    for keep, reads in ((None, [""]), (lambda k: k == 1, ["", again])):
        said: list[str | None] = []
        items = job_items(job, keep, said.append)
        assert len(items.good) == 5 and len(items.bad) == 1
        assert said[-1] is None and None not in said[:-1]
        lines = [line for line in said if line]
        whys = [
            re.fullmatch(r"reading t\.tsv(.*): 0\.0 of 0\.0 MB, (\d+)%", line) for line in lines
        ]
        assert all(whys), lines
        # 6 rows told every 2 and at the end: 4 lines a read, the last at 100%.
        assert [m[1] for m in whys if m] == [why for why in reads for _ in range(4)]
        assert [int(m[2]) for m in whys if m][3::4] == [100] * len(reads)
    assert (sources._megabytes(1_234_567), sources._megabytes(1_210_400_000)) == ("1.2", "1,210")
