"""A job's items: ids checked, and a shard's part of a text table kept as it is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from ducho_fast.config import load_config
from ducho_fast.config.model import Job
from ducho_fast.data.items import Item
from ducho_fast.data.sources import job_items
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
