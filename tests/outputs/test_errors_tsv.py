"""The errors file: each job replaces its own rows and keeps every other writer's."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

from ducho_fast.data.items import ItemError
from ducho_fast.outputs import errors_tsv
from ducho_fast.outputs.errors_tsv import COLUMNS, LOCK_FILE, update_errors


def read(path: Path) -> list[tuple[str, ...]]:
    with path.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert tuple(rows[0]) == COLUMNS
    return [(r[4], r[0], r[1]) for r in rows[1:]]  # job, stage, item


def bad(item: str) -> ItemError:
    return ItemError(item, f"images/{item}.jpg", "not a readable image")


def test_each_job_replaces_its_own_rows_where_they_stood(tmp_path: Path) -> None:
    path = tmp_path / "ducho-fast.errors.tsv"
    update_errors(path, "visual.items", ["input", "resnet18"], [("resnet18", bad("a"))])
    text = [("input", bad("t1")), ("minilm", bad("t2"))]
    update_errors(path, "textual.items", ["input", "minilm"], text)
    update_errors(path, "fusion.0", ["fusion"], [("fusion", bad("f"))])
    assert read(path) == [
        ("visual.items", "resnet18", "a"),
        ("textual.items", "input", "t1"),
        ("textual.items", "minilm", "t2"),
        ("fusion.0", "fusion", "f"),
    ]
    # The visual job again, with another model too: its rows stay first, the others stay.
    again = [("resnet18", bad("b")), ("effnet", bad("b"))]
    update_errors(path, "visual.items", ["input", "resnet18", "effnet"], again)
    assert read(path) == [
        ("visual.items", "resnet18", "b"),
        ("visual.items", "effnet", "b"),
        ("textual.items", "input", "t1"),
        ("textual.items", "minilm", "t2"),
        ("fusion.0", "fusion", "f"),
    ]
    # A run of one model replaces that model's rows only, even with none to write.
    update_errors(path, "textual.items", ["input", "minilm"], [])
    update_errors(path, "visual.items", ["input", "effnet"], [])
    assert read(path) == [("visual.items", "resnet18", "b"), ("fusion.0", "fusion", "f")]
    update_errors(path, "visual.items", ["input", "resnet18"], [])
    update_errors(path, "fusion.0", ["fusion"], [])
    assert not path.exists()  # no rows left: no file
    assert not (tmp_path / LOCK_FILE).exists()


def test_cells_are_escaped_and_rows_without_a_job_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "ducho-fast.errors.tsv"
    path.write_text("stage\titem_id\torigin\treason\ninput\told\tx.jpg\tbroken\n")  # an old file
    update_errors(path, "visual\titems", ["m\n1"], [("m\n1", bad("id\twith tab"))])
    update_errors(path, "visual\titems", ["other"], [])  # its own rows of m\n1 match and stay
    lines = path.read_text().splitlines()
    assert lines[1:] == [
        "m\\n1\tid\\twith tab\timages/id\\twith tab.jpg\tnot a readable image\tvisual\\titems"
    ]


def test_nothing_to_write_into_a_missing_folder_makes_nothing(tmp_path: Path) -> None:
    update_errors(tmp_path / "none" / "ducho-fast.errors.tsv", "visual.items", ["input"], [])
    assert not (tmp_path / "none").exists()


def test_writers_at_the_same_moment_keep_each_others_rows(tmp_path: Path, monkeypatch) -> None:
    """Two processes (here threads: flock excludes separate opens in one process too) read,
    merge and write one file at once: each waits for the other's write, so no row is lost."""
    path = tmp_path / "ducho-fast.errors.tsv"
    rows = errors_tsv._rows

    def slow_rows(p: Path) -> list[str]:
        found = rows(p)
        time.sleep(0.3)  # both would read the empty file without the lock
        return found

    monkeypatch.setattr(errors_tsv, "_rows", slow_rows)
    jobs = [
        threading.Thread(target=update_errors, args=(path, job, [stage], [(stage, bad(job))]))
        for job, stage in [("visual.items", "resnet18"), ("textual.items", "minilm")]
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert sorted(read(path)) == [
        ("textual.items", "minilm", "textual.items"),
        ("visual.items", "resnet18", "visual.items"),
    ]
