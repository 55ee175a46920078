"""A job's items: ids checked, and a shard's part of a text table kept as it is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from ducho_fast.config import load_config
from ducho_fast.config.model import Job
from ducho_fast.data import sources
from ducho_fast.data.ids import Folding
from ducho_fast.data.items import Item
from ducho_fast.data.sources import check_ids, job_items
from ducho_fast.data.text.tsv import BadText


def _job(tmp_path: Path, origin: str, table: str) -> Job:
    (tmp_path / "t.tsv").write_text(table)
    block = {"input_path": "t.tsv", "output_path": "out", "model": [{"model_name": "m"}]}
    config = {"dataset_path": str(tmp_path), "textual": {origin: block}}
    return load_config(config).jobs[0]


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
    # Positions are those of the good items (the duplicate and the unsafe id are not items),
    # asked once each, in order; the kept ones are as a whole read gives them.
    assert [i.item_id for i in part.good] == [i.item_id for i in whole.good] == ids
    assert asked == list(range(len(ids)))
    for k, (mine, full) in enumerate(zip(part.good, whole.good, strict=True)):
        assert mine == (full if k % 2 else Item(full.item_id, "", None))
    assert part.bad == whole.bad  # reported alike (by shard 0, see api._own_inputs)
    assert any(isinstance(i.raw, BadText) for i in part.good + whole.good)


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


def _items(*ids: str) -> list[Item]:
    return [Item(i, f"t.tsv:{n + 2}", f"text {n}") for n, i in enumerate(ids)]


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
