"""``--shard i/N``: disjoint, complete, resumable, and byte-identical to one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ducho_fast
from ducho_fast.cli import app
from ducho_fast.errors import ConfigError, OutputError
from ducho_fast.outputs.lock import LOCK_FILE, FolderLocks
from ducho_fast.runtime.pipeline import Pipeline
from ducho_fast.runtime.shard import Shard
from tests.conftest import npy_bytes, two_job_config


def test_parse() -> None:
    assert Shard.parse("0/4") == Shard(0, 4)
    assert Shard.parse(" 3 / 4 ") == Shard(3, 4)
    assert Shard.parse("2/4").tag == "shard-2-of-4"
    with pytest.raises(ConfigError, match=r"0-based.*\$SLURM_ARRAY_TASK_ID/4"):
        Shard.parse("1of4")
    with pytest.raises(ConfigError, match="must be 0 to 3 for 4"):
        Shard.parse("4/4")
    with pytest.raises(ConfigError, match="must be 0 to 0 for 1 shard"):
        Shard.parse("1/1")
    with pytest.raises(ConfigError, match=r"'0/0': COUNT, the number of tasks .* must be 1 or"):
        Shard.parse("0/0")  # not "the index must be 0 to 0 for 0 shard(s)"


@pytest.mark.parametrize("total", [0, 1, 7, 64, 65, 1000])
@pytest.mark.parametrize("window", [1, 3, 64])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_windows_split_disjoint_and_complete(total: int, window: int, count: int) -> None:
    owned: list[int] = []
    for index in range(count):
        shard = Shard(index, count)
        mine = [
            p
            for w, start in enumerate(range(0, total, window))
            if shard.owns(w)
            for p in range(start, min(start + window, total))
        ]
        assert len(mine) == shard.size(total, window)
        owned += mine
    assert sorted(owned) == list(range(total))  # each position exactly once


def _extract(config: dict, **kwargs) -> ducho_fast.api.ExtractReport:
    return ducho_fast.extract(config, **kwargs)


def _text_run(report: ducho_fast.api.ExtractReport) -> ducho_fast.api.ModelRun:
    return next(r for r in report.runs if r.job.startswith("textual"))


@pytest.mark.slow
def test_shards_make_the_files_of_one_run(
    tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    one = two_job_config(tmp_path / "one", store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(one)
    assert _extract(one).failed == 2  # the bad image and the empty text
    split = two_job_config(tmp_path / "split", store, resnet18_state_dict, tiny_bert_dir)

    written = {"visual": 0, "textual": 0}
    for index in range(3):
        report = _extract(split, shard=f"{index}/3")
        assert report.shard == Shard(index, 3)
        for run in report.runs:
            written[run.job.split(".")[0]] += run.result.written
        # Only the task whose windows hold them reports the bad items.
        assert {e.item_id for r in report.runs for e in r.result.errors} <= {"img05", "t009"}
    assert written == {"visual": 21, "textual": 69}  # disjoint: nothing written twice
    per_item = {k: v for k, v in npy_bytes(tmp_path / "one").items() if "matrix" not in k}
    assert npy_bytes(tmp_path / "split") == per_item  # complete, and byte for byte the same

    # Matrices and manifests wait for the plain run after the shards.
    assert not list((tmp_path / "split").rglob("matrix"))
    folder = tmp_path / "split/out/torch/resnet18/avgpool"
    assert json.loads((folder / "ducho-fast.manifest.json").read_text())["status"] == "running"
    record = json.loads((folder / "ducho-fast.shard-1-of-3.json").read_text())
    assert record["shard"] == "1/3" and record["written"] + record["failed"] == record["items"]
    assert list((tmp_path / "split/out").glob("ducho-fast.errors.shard-*.tsv"))

    # Each task recorded the texts of its own windows; together, every listed text.
    records = sorted((tmp_path / "split").rglob("ducho-fast.texts.shard-*.json"))
    assert [r.name for r in records] == [f"ducho-fast.texts.shard-{i}-of-3.json" for i in range(3)]
    texts = [set(json.loads(r.read_text())["texts"]) for r in records]
    assert sum(map(len, texts)) == len(set.union(*texts)) == 70  # disjoint
    # The task whose window holds the bad image recorded it as unreadable.
    assert [p.name for p in folder.glob("ducho-fast.unreadable*")] == [
        "ducho-fast.unreadable.shard-1-of-3.json"
    ]
    # A task started again runs nothing: its bad image is the file it recorded.
    again = _extract(split, shard="1/3")
    assert sum(r.result.written for r in again.runs) == 0
    assert [e.item_id for r in again.runs for e in r.result.errors] == ["img05"]

    # The plain run after the shards reuses every window: the bad image fails from the
    # shard's record and the blank text from the listing, unread, and both are reported.
    final = _extract(split)
    assert sum(r.result.written for r in final.runs) == 0
    assert sum(r.result.reused for r in final.runs) == 92 - 2
    assert [e.item_id for r in final.runs for e in r.result.errors] == ["img05", "t009"]
    assert [p.name for p in folder.glob("ducho-fast.unreadable*")] == ["ducho-fast.unreadable.json"]
    (record,) = (tmp_path / "split").rglob("ducho-fast.texts*.json")
    assert record.name == "ducho-fast.texts.json"
    assert set(json.loads(record.read_text())["texts"]) == set.union(*texts)
    assert json.loads((folder / "ducho-fast.manifest.json").read_text())["status"] == "complete"
    assert not list((tmp_path / "split/out").glob("ducho-fast.errors.shard-*.tsv"))
    assert "img05" in (tmp_path / "split/out/ducho-fast.errors.tsv").read_text()
    assert npy_bytes(tmp_path / "split") == npy_bytes(tmp_path / "one")  # matrices too


@pytest.mark.slow
def test_a_shard_runs_beside_other_shards_and_never_beside_a_plain_run(
    tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    config = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(config)
    folder = tmp_path / "out/torch/resnet18/avgpool"
    with FolderLocks("another task", shared=True) as other_task:
        other_task.take(folder)
        report = _extract(config, shard="0/2")
        assert sum(r.result.written for r in report.runs) > 0
        with pytest.raises(
            OutputError,
            match=rf"{folder} is being written by another ducho-fast run now \(the tasks of a "
            r"job array, --shard i/2\)\.",
        ):
            _extract(config)
    with FolderLocks("ducho-fast extract") as plain:
        plain.take(folder)
        with pytest.raises(OutputError, match=r"a task of a job array cannot share the folder"):
            _extract(config, shard="1/2")
    assert not list(tmp_path.rglob(LOCK_FILE))
    final = _extract(config)
    assert final.failed == 2 and all(r.result.reused or r.result.written for r in final.runs)


@pytest.mark.slow
def test_shard_refuses_fresh_and_bad_values(
    tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    config = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    with pytest.raises(ConfigError, match=r"--fresh.*delete the features the other tasks write"):
        ducho_fast.extract(config, ["output.resume=false"], shard="0/2")
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["extract", str(path), "--shard", "2/2"])
    assert result.exit_code == 1 and "must be 0 to 1 for 2" in result.output


@pytest.mark.slow
def test_one_shard_of_one_is_a_plain_run(
    tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    config = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(config)
    report = ducho_fast.extract(config, shard="0/1")
    assert report.shard is None and list(tmp_path.rglob("matrix"))


@pytest.mark.slow
def test_a_shard_embeds_again_only_the_changed_items_of_its_own_windows(
    tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    # A task that removed the stale features of other tasks' windows could remove a feature
    # that task had just written again; each task only looks at its own windows.
    config = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(config)
    _extract(config)
    tsv = tmp_path / "descriptions.tsv"
    rows = tsv.read_text().splitlines()
    for row in (2, 51):  # t001 in window 0 (shard 0 of 3), t050 in window 1 (shard 1)
        rows[row] = rows[row].split("\t")[0] + "\tzip and sleeves, changed"
    tsv.write_text("\n".join(rows) + "\n")
    (t050,) = (tmp_path / "text_out").rglob("t050.npy")
    before = t050.stat().st_mtime_ns, t050.read_bytes()

    first = _text_run(_extract(config, shard="0/3"))
    # t001 changed; its window is embedded again as a whole (less the blank t009).
    assert (first.changed, first.result.written) == (1, 31)
    assert (t050.stat().st_mtime_ns, t050.read_bytes()) == before  # left to its own task
    second = _text_run(_extract(config, shard="1/3"))
    assert (second.changed, second.result.written) == (1, 32)  # t050, and its window
    assert t050.read_bytes() != before[1]
    third = _text_run(_extract(config, shard="2/3"))
    assert (third.changed, third.result.written) == (0, 0)  # nothing changed in its window


@pytest.mark.slow
def test_a_shard_holds_only_the_inputs_of_its_windows(
    tmp_path: Path,
    store: Path,
    resnet18_state_dict: Path,
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two text models whose windows (5 and 7 texts) share no window (35 > 4 x 7): two
    # pipelines over the same list, each running its own windows of the shard. A text in
    # either's windows is kept; the others' texts are dropped (a text job's memory is its
    # table), and the files are still those of one run.
    config = two_job_config(tmp_path / "one", store, resnet18_state_dict, tiny_bert_dir)
    del config["visual"]
    model = config["textual"]["items"]["model"][0]
    config["textual"]["items"]["model"] = [
        {**model, "batch_size": 5},
        {**model, "output_layers": ["last_hidden_state"], "batch_size": 7},
    ]
    config["runtime"]["sort_window"] = 1
    config["output"] = {"layouts": ["ducho"]}  # a token-level layer forms no matrix
    # Rows that are no items (a duplicate id, an unsafe one) early in the table: windows
    # are cut over the items, whose positions are no longer the rows'.
    table = tmp_path / "one/descriptions.tsv"
    header, *rows = table.read_text().splitlines(keepends=True)
    table.write_text(
        header + rows[0] + "t000\tagain\n" + rows[1] + "../up\tsoft\n" + "".join(rows[2:])
    )
    ducho_fast.export(config)
    _extract(config)
    split = {**config, "dataset_path": str(tmp_path / "split")}
    (tmp_path / "split").mkdir()
    (tmp_path / "split/descriptions.tsv").write_bytes(
        (tmp_path / "one/descriptions.tsv").read_bytes()
    )

    seen: list[tuple[int, list[bool]]] = []  # (window, whether each item's text is held)
    run = Pipeline.run

    def spy(self, items, progress=None, table=None):
        seen.append((self.window, [isinstance(i.raw, str) for i in items]))
        assert table is None  # a shard holds its own texts
        return run(self, items, progress, table)

    read: list[list[bool]] = []  # whether each item's text is held as the table is read
    job_items = ducho_fast.api.job_items

    def reading(job, keep=None, status=None, **kwargs):
        items = job_items(job, keep, status, **kwargs)
        read.append([isinstance(i.raw, str) for i in items.good])
        return items

    monkeypatch.setattr(Pipeline, "run", spy)
    monkeypatch.setattr(ducho_fast.api, "job_items", reading)
    for index in range(3):
        seen.clear()
        read.clear()
        report = _extract(split, shard=f"{index}/3")
        assert sorted(w for w, _ in seen) == [5, 7]
        shard = Shard(index, 3)
        mine = {
            p
            for window in (5, 7)
            for w, begin in enumerate(range(0, 70, window))
            if shard.owns(w)
            for p in range(begin, min(begin + window, 70))
        }
        for held in [h for _, h in seen] + read:
            assert [k for k in range(70) if held[k]] == sorted(mine)
        assert sum(r.result.written for r in report.runs) > 0
        errors = [e.item_id for r in report.runs for e in r.result.errors]
        assert errors == (["t009", "t009"] if index == 1 else [])  # the blank text, read
    assert npy_bytes(tmp_path / "split") == npy_bytes(tmp_path / "one")
