"""``ducho-fast bench``: extract and the session alone, timed on a sample of a config's data."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import ducho_fast
from ducho_fast import bench as bench_module
from ducho_fast import bench_source
from ducho_fast.bench import bench
from ducho_fast.cli import app
from ducho_fast.console import _bf16_hint, _cpu_shared
from ducho_fast.errors import ArtifactError, ConfigError, DuchoError, OutputError
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.stages import Timing
from tests.conftest import audio_config, two_job_config, write_tone


@pytest.fixture
def exported(tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path) -> Any:
    config = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(config)
    return config


def test_bench_pads_the_session_alones_smaller_batch_where_extract_pads_it(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA extract runs a smaller batch of fixed-size images padded to the batch size
    (one shape, one cuDNN search): the session alone runs the same batches."""
    from ducho_fast.runtime import embedder as embedder_module

    rows: list[list[int]] = []  # each model's batches for the session alone: their rows
    batches = bench_module._batches

    def spy_batches(*args: Any) -> Any:
        made = batches(*args)
        rows.append([len(next(iter(feeds.values()))) for b in made for _, feeds in b.parts])
        return made

    monkeypatch.setattr(bench_module, "_batches", spy_batches)
    monkeypatch.setattr(embedder_module, "pads_last_batch", lambda *_: True)  # as on CUDA
    work = tmp_path / "work"
    work.mkdir()
    bench(exported, items=8, repeats=1, work=work)
    assert rows[0] == [3, 3, 3]  # 8 images in batches of 3: the last 2 padded
    assert sum(rows[1]) == 8  # texts: never padded (their shapes vary anyway)


def test_bench_times_extract_and_the_session_on_the_jobs_first_items(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[list[str]] = []  # each extract round: the feature files it wrote
    folders: set[Path] = set()
    extract = bench_module.api.extract

    def spy(config: Any) -> Any:
        report = extract(config)
        folders.add(config.jobs[0].output_path)
        written.append(sorted(p.name for p in config.jobs[0].output_path.rglob("*.npy")))
        return report

    batched: list[list[int]] = []  # each model's batches for the session alone: their sizes
    batches = bench_module._batches

    def spy_batches(*args: Any) -> Any:
        made = batches(*args)
        batched.append([sum(len(idx) for idx, _ in b.parts) for b in made])
        return made

    monkeypatch.setattr(bench_module.api, "extract", spy)
    monkeypatch.setattr(bench_module, "_batches", spy_batches)
    work = tmp_path / "work"
    work.mkdir()
    seen: list[str] = []
    report = bench(
        exported, items=8, repeats=2, work=work, on_run=lambda r: seen.append(r.key_path)
    )

    visual, text = report.runs
    assert seen == ["visual.items.model.0", "textual.items.model.0"] and not report.skipped
    # img05 does not decode: passed over, the sample is the next 8 (t009, blank, comes later)
    assert (visual.items, visual.job_items, visual.unreadable) == (8, 22, 1)
    assert (text.items, text.job_items, text.unreadable) == (8, 70, 0)
    # the job's own names, every round, and the config's matrix layout
    images = ["image_feat.npy", *(f"img{i:02d}.npy" for i in (0, 1, 2, 3, 4, 6, 7, 8))]
    texts = ["t000.npy", *(f"t{i:03d}.npy" for i in range(1, 8)), "text_feat.npy"]
    assert written == [images, images, texts, texts]
    assert len(folders) == 4  # each round into a new folder (deleting files slows some disks)
    assert batched[0] == [3, 3, 2]  # batch_size 3, as extract batches them
    assert sum(batched[1]) == 8 and max(batched[1]) <= 2
    for run in report.runs:
        assert run.provider == "CPUExecutionProvider" and run.rounds == 2
        assert run.extract_rate > 0 and run.session_rate > 0
        low, high = run.efficiency_range
        assert low <= run.efficiency <= high
        assert sorted(run.cpu_ms) == ["extract", "session"] and min(run.cpu_ms.values()) > 0
        # extract's own timing: its start-up counts once in the whole job, the rest per item
        assert 0 < run.first_batch < run.extract_seconds
        assert run.warm_up is not None  # 3 batches or more on 2 lanes: one lane ran two
        assert 0 <= run.warm_up < run.extract_seconds - run.first_batch
        assert run.start_up == run.first_batch + run.warm_up
        assert 0 <= run.waiting_for_inputs < run.extract_seconds
        assert 0 <= run.last_writes < run.extract_seconds - run.first_batch
        seconds = run.as_dict()["extract_seconds"]
        assert seconds["last_writes"] == round(run.last_writes, 3)
        assert seconds["warm_up"] == round(run.warm_up, 3)
        assert run.once == run.start_up + run.last_writes
        per_item = (run.extract_seconds - run.once) / run.items
        assert run.job_seconds == pytest.approx(run.once + per_item * run.job_items)
    # the config's own outputs are untouched and the work folder is removed
    assert not (tmp_path / "out").exists() and not (tmp_path / "text_out").exists()
    assert list(work.iterdir()) == []


def test_bench_samples_textual_interactions_under_their_ids(
    tmp_path: Path, store: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "reviews.tsv").write_text(
        "user\titem\treview\n"
        'u1\tB001\t"Great mug,\rkeeps coffee hot"\n'  # quoted: a lone carriage return
        "u2\tB001\tThe handle broke.\n"
        "007\t010\tLeading zeros stay.\n"
    )
    model = {"model_name": str(tiny_bert_dir), "output_layers": ["pooler_output"]}
    block = {"input_path": "reviews.tsv", "output_path": "out", "model": [model]}
    config: dict[str, Any] = {"dataset_path": str(tmp_path), "store": str(store)}
    config["textual"] = {"interactions": block}
    ducho_fast.export(config)
    features: list[dict[str, np.ndarray]] = []
    extract = bench_module.api.extract

    def spy(sub: Any) -> Any:
        report = extract(sub)
        files = sub.jobs[0].output_path.rglob("*.npy")
        features.append({p.stem: np.load(p) for p in files})
        return report

    monkeypatch.setattr(bench_module.api, "extract", spy)
    (run,) = bench(config, items=5, repeats=1).runs
    assert (run.items, run.job_items) == (3, 3)
    extract(config)  # not the spy
    own = {p.stem: np.load(p) for p in (tmp_path / "out").rglob("*.npy")}
    assert sorted(features[0]) == sorted(own) == ["007__010", "u1__B001", "u2__B001"]
    for name, value in own.items():  # the same texts: the quoted review survived the copy
        np.testing.assert_array_equal(features[0][name], value)


def test_bench_refuses_bad_sizes_and_models_not_exported(
    tmp_path: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    config = two_job_config(tmp_path, tmp_path / "empty-store", resnet18_state_dict, tiny_bert_dir)
    with pytest.raises(ConfigError, match="whole numbers of 1 or more for items and repeats"):
        bench(config, items=0)
    with pytest.raises(ArtifactError, match="export"):
        bench(config, items=4, repeats=1)


def test_bench_names_a_work_folder_it_cannot_use(exported: dict[str, Any], tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(
        OutputError,
        match=r"bench cannot make its work folder in .*a-file/such: Not a directory.*--work",
    ):
        bench(exported, items=2, repeats=1, work=tmp_path / "a-file" / "such")
    with pytest.raises(OutputError, match=r"in .*/new/x+: File name too long"):
        bench(exported, items=2, repeats=1, work=tmp_path / "new" / ("x" * 300))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # "new" made, then removed


def test_bench_makes_a_work_folder_that_does_not_exist_and_removes_it(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--work DIR`` that does not exist yet is made, its parents too, and removed at the
    end; a parent that something else was put in meanwhile stays, with that."""
    before = sorted(p.name for p in tmp_path.iterdir())
    exported = {k: v for k, v in exported.items() if k != "textual"}
    (run,) = bench(exported, items=2, repeats=1, work=tmp_path / "no" / "such").runs
    assert run.items == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    extract = bench_module.api.extract

    def beside(config: Any) -> Any:  # another program's file appears in a parent bench made
        (tmp_path / "no" / "theirs.txt").write_text("keep")
        return extract(config)

    monkeypatch.setattr(bench_module.api, "extract", beside)
    bench(exported, items=2, repeats=1, work=tmp_path / "no" / "such")
    assert [p.name for p in (tmp_path / "no").iterdir()] == ["theirs.txt"]


def test_bench_command_prints_each_model_and_a_json_line(exported: dict[str, Any], tmp_path):
    import yaml

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(exported))
    work = tmp_path / "work"
    work.mkdir()
    runner = CliRunner()
    result = runner.invoke(
        app, ["bench", str(path), "--items", "4", "--repeats", "1", "--work", str(work), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "visual.items.model.0 (" in result.output and "efficiency" in result.output
    assert "whole job      22 items in about" in result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert [r["model"] for r in line["runs"]] == ["visual.items.model.0", "textual.items.model.0"]
    assert line["runs"][1]["items"] == 4 and line["skipped"] == []
    for run in line["runs"]:
        cpu = run["cpu_ms_per_item"]
        assert run["cpus"] == cpu_quota()
        assert run["cpu_bound"] == round(min(1.0, cpu["session"] / cpu["extract"]), 3)
    bad = runner.invoke(app, ["bench", str(path), "--items", "0"])
    assert bad.exit_code != 0


def test_bench_says_which_writers_extract_ended_with(exported: dict[str, Any], tmp_path) -> None:
    """The writers of the round whose count is the median: a bench of ``--vs
    runtime.writers=8`` says how many threads the default grew to beside eight."""
    import yaml

    path = tmp_path / "config.yml"
    exported["runtime"] = {"writers": 3}
    path.write_text(yaml.safe_dump(exported))
    work = tmp_path / "work"
    work.mkdir()
    args = ["bench", str(path), "--items", "3", "--repeats", "1", "--work", str(work), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = re.findall(
        r" for its 3 writer threads; the last writes ended [\d.]+ after its last", result.output
    )
    assert len(said) == 2, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert [r["writers"] for r in line["runs"]] == [{"threads": 3, "added": 0}] * 2


def test_bench_knows_a_sample_of_jpegs_decoded_in_full(exported: dict[str, Any], tmp_path):
    """Only an image job whose sample holds JPEGs, with ``input.jpeg_decode: full``."""
    work = tmp_path / "work"
    work.mkdir()
    report = bench(exported, items=2, repeats=1, work=work)
    assert [r.jpegs_in_full for r in report.runs] == [True, False]  # images, texts
    reduced = bench(exported, ["input.jpeg_decode=reduced"], items=2, repeats=1, work=work)
    assert [r.jpegs_in_full for r in reduced.runs] == [False, False]
    for image in (tmp_path / "images").glob("*.jpg"):
        image.rename(image.with_suffix(".png"))  # named so: read by its content all the same
    pngs = bench(exported, items=2, repeats=1, work=work)
    assert [r.jpegs_in_full for r in pngs.runs] == [False, False]
    cfg = ducho_fast.api.as_config(exported)
    text = SimpleNamespace(rows=[(SimpleNamespace(raw="a text that ends in photo.jpg"),)])
    assert not bench_module._jpegs_in_full(cfg, cfg.jobs[1], text)  # type: ignore[arg-type]
    assert bench_module._jpegs_in_full(cfg, cfg.jobs[0], text)  # type: ignore[arg-type]


def _run(**given: Any) -> bench_module.BenchRun:
    fields: dict[str, Any] = dict(
        key_path="visual.items.model.0",
        model="m",
        provider="CPUExecutionProvider",
        items=64,
        job_items=64,
        extract_rate=60.0,
        session_rate=100.0,
        efficiency=0.6,
        efficiency_range=(0.6, 0.6),
        rounds=1,
        cpu_ms={"extract": 16.0, "session": 10.0},
        cpus=2,
        jpegs_in_full=True,
    )
    return bench_module.BenchRun(**{**fields, **given})


def test_a_first_batch_that_ran_longer_counts_once_in_the_whole_job(capsys) -> None:
    """On a GPU, a session's first run can take seconds (cuDNN's algorithm search): spread
    over the sample's items it would be charged to every item of the job."""
    from ducho_fast.console import print_bench

    run = _run(
        items=100, job_items=1000, extract_rate=10.0, first_batch=1.0, warm_up=3.5, last_writes=0.5
    )
    assert run.start_up == 4.5 and run.once == 5.0  # the last writes: the writers' queue drains
    assert run.job_seconds == pytest.approx(5.0 + 5.0 / 100 * 1000)  # not 1 + 9 / 100 x 1000
    print_bench(run)
    said = capsys.readouterr().out
    assert (
        "1.00 until its first batch ran (the session made, the first window read), which " in said
    )
    assert "ran 3.50 longer than the later ones; then its model waited" in said
    assert "whole job      1,000 items in about 0:00:55 at this pace" in said
    assert "the start-up is much of this sample's time" in said  # 4.5 s of 10
    print_bench(replace(run, warm_up=0.5))
    assert "the start-up is much" not in capsys.readouterr().out  # 1.5 s of 10
    print_bench(replace(run, warm_up=0.0))  # not longer than the later ones
    said = capsys.readouterr().out
    assert "(the session made, the first window read); then its model waited" in said
    unknown = replace(run, warm_up=None)  # no lane ran a second batch to compare it with
    assert unknown.start_up == 1.0 and unknown.as_dict()["extract_seconds"]["warm_up"] is None
    print_bench(unknown)
    said = capsys.readouterr().out
    assert (
        "(the session made, the first window read), and no lane ran a second batch to tell how "
        "much longer the first ran than the later ones (a larger --items tells); then its model"
    ) in said
    # the sample is the whole job: no larger --items to advise, and its estimate is its time
    print_bench(replace(unknown, job_items=100, first_batch=4.5))
    said = capsys.readouterr().out
    assert "than the later ones; then its model" in said and "--items" not in said


def test_bench_takes_the_warm_up_from_the_rounds_that_tell_it() -> None:
    """A round whose lanes each ran one batch tells nothing of the first batch's warm-up: the
    median is over the others, and unknown (None) where none told, not 0."""
    told = [_timed_runs(0.1, 0.1, warm_up=w) for w in (0.3, 0.5)]  # two graphs' runs a round
    untold = _timed_runs(0.1, 0.1, warm_up=None)
    partly = [*_timed_runs(0.1), *untold[1:]]
    timed = bench_module._timings([told[0], untold, told[1], partly])
    assert bench_module._warm_up(timed) == pytest.approx(0.8)  # the median of 0.6 and 1.0
    assert bench_module._warm_up(bench_module._timings([untold, partly])) is None
    assert bench_module._once([untold]) == [pytest.approx(0.2)]  # counted as none


def test_bench_offers_bf16_where_an_fp32_model_bounds_extract_on_a_cpu_with_it() -> None:
    """``BenchRun.bf16``: "runs" (the plugin computes in bfloat16 here), "install" (the CPU
    lists the math, the plugin is not installed), "" (neither, or not an fp32 CPU run)."""
    said = _bf16_hint(_run(bf16="runs"))
    key = "visual.items.model.0.precision=bf16"
    assert said.startswith(
        "  bf16           the model took 10.00 ms of extract's 16.00 ms of CPU an item, and "
        f"this CPU has bfloat16 math: `ducho-fast export CONFIG --set {key}` exports it"
    )
    assert f"and --vs {key} times it here." in said and "pip install" not in said
    assert "pip install 'ducho-fast[openvino]', then `ducho-fast export" in _bf16_hint(
        _run(bf16="install")
    )
    half = _run(bf16="runs", cpu_ms={"extract": 20.0, "session": 10.0})
    assert _bf16_hint(half).startswith("  bf16 ")  # the model half of the CPU: still worth it
    tried = SimpleNamespace(setting=key)
    nothing = [
        _run(),  # no bfloat16 math here (or not an fp32 model on ONNX Runtime's CPU provider)
        _run(bf16="runs", variants=(tried,)),  # timed already
        _run(bf16="runs", cpu_ms={"extract": 21.0, "session": 10.0}),  # decoding bounds it
        _run(bf16="runs", cpu_ms={}),  # not measured
    ]
    assert [_bf16_hint(run) for run in nothing] == [""] * len(nothing)


def test_bench_asks_whether_bf16_runs_for_fp32_models_on_the_cpu_provider(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_module, "bf16_offer", lambda: "install")
    work = tmp_path / "work"
    work.mkdir()
    report = bench(exported, items=2, repeats=1, work=work)
    assert [(r.precision, r.bf16) for r in report.runs] == [("fp32", "install")] * 2
    assert report.runs[0].as_dict()["bf16"] == "install"
    assert replace(report.runs[0], bf16="").as_dict()["bf16"] is None


def test_bench_says_when_the_cpu_time_beside_the_model_bounds_extract() -> None:
    said = _cpu_shared(_run())
    assert said.startswith(
        "  why            the work beside the model (reading, decoding or tokenizing, writing) "
        "took 6.00 ms of CPU an item against the model's 10.00, on the same 2 CPUs: that alone "
        "holds extract to about 0.62 of the session alone. --vs input.jpeg_decode=reduced times"
    )
    assert _run().cpu_bound == 10.0 / 16.0
    assert "input.jpeg_decode" not in _cpu_shared(_run(jpegs_in_full=False))
    tried = SimpleNamespace(setting="input.jpeg_decode=reduced")
    assert "--vs" not in _cpu_shared(_run(variants=(tried,)))
    other = SimpleNamespace(setting="runtime.workers=4")
    assert "--vs input.jpeg_decode=reduced" in _cpu_shared(_run(variants=(other,)))
    assert "on the same CPUs:" in _cpu_shared(_run(cpus=0))
    nothing = [
        _run(provider="CUDAExecutionProvider"),  # the model's CPU is not its work
        _run(efficiency=0.9),  # efficient enough
        _run(cpu_ms={"extract": 11.0, "session": 10.0}),  # the CPU time does not explain it
        _run(cpu_ms={"extract": 16.0}),  # not measured
        _run(cpu_ms={}),
    ]
    assert [_cpu_shared(run) for run in nothing] == [""] * len(nothing)
    assert _run(cpu_ms={"extract": 9.0, "session": 10.0}).cpu_bound == 1.0
    assert _run(provider="CUDAExecutionProvider").cpu_bound is None


def test_bench_writers_are_the_median_rounds() -> None:
    def timing(writers: int, added: int) -> Any:  # and last writes of a tenth of the writers
        return replace(Timing(), writers=writers, writers_added=added, last_writes=writers / 10)

    def round_of(*graphs: tuple[int, int]) -> list[Any]:
        return [SimpleNamespace(result=SimpleNamespace(timing=timing(*g))) for g in graphs]

    # a two-tower model's round: its graphs' most; three rounds: the middle count
    rounds = [round_of((5, 4)), round_of((1, 0), (3, 2)), round_of((2, 1))]
    waits = bench_module._waits(rounds)
    assert (waits["writers"], waits["writers_added"]) == (3, 2)
    assert waits["last_writes"] == pytest.approx(0.4)  # a round's graphs' (run one by one)
    two = bench_module._waits([round_of((8, 7)), round_of((1, 0))])  # the lower of two
    assert (two["writers"], two["writers_added"]) == (1, 0)


def _images_written(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Each extract round's image features, by id: filled in as bench runs extract."""
    extract = bench_module.api.extract
    written: list[list[str]] = []

    def spy(config: Any) -> Any:
        report = extract(config)
        written.append(sorted(p.stem for p in config.jobs[0].output_path.rglob("img*.npy")))
        return report

    monkeypatch.setattr(bench_module.api, "extract", spy)
    return written


def test_bench_samples_links_under_their_own_names(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's image that is a link to another of its images is an item of its own, with its
    own id. The sample was linked under the name its target resolves to, so the second of two
    such items collided with the first and bench stopped ("File exists")."""
    images = tmp_path / "images"
    (images / "img00a.jpg").symlink_to("img00.jpg")
    (images / "img00b.jpg").symlink_to(images / "img00.jpg")
    exported = {k: v for k, v in exported.items() if k != "textual"}
    written = _images_written(monkeypatch)
    (run,) = bench(exported, items=4, repeats=1, work=tmp_path / "work").runs
    assert (run.items, run.sample_copied) == (4, False)
    assert written == [["img00", "img00a", "img00b", "img01"]]


def test_bench_copies_its_sample_where_the_work_folder_makes_no_links(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAT and exFAT (and some FUSE and network file systems) refuse symbolic links: the
    sample's files are copied, the report says so, and the features are the same."""
    import yaml

    def refused(self: Path, target: Any, *_: Any) -> None:
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "symlink_to", refused)
    exported = {k: v for k, v in exported.items() if k != "textual"}
    written = _images_written(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    (run,) = bench(exported, items=3, repeats=1, work=work).runs
    assert run.sample_copied and run.items == 3
    assert written == [["img00", "img01", "img02"]]  # every file of the sample copied
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(exported))
    args = ["bench", str(path), "--items", "3", "--repeats", "1", "--work", str(work)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "the sample's files were copied there" in result.output

    def full(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench_module.shutil, "copyfile", full)
    with pytest.raises(OutputError, match=r"a link to .* was refused \(Operation not permitted\)"):
        bench(exported, items=3, repeats=1, work=work)
    assert list(work.iterdir()) == []  # the work folder removed all the same


def test_bench_source_runs_the_torch_models_on_the_same_batches(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager: list[int] = []  # rows of each batch the source model ran, every round
    make = bench_source.eager_source

    def spy(specs: Any, batches: Any) -> Any:
        made = make(specs, batches)

        def counted(step: Any) -> Any:
            def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                eager.append(len(next(iter(feeds.values()))))
                return step(feeds)

            return run

        return replace(made, steps=[counted(step) for step in made.steps])

    monkeypatch.setattr(bench_source, "eager_source", spy)
    visual, text = bench(exported, items=6, repeats=1, work=tmp_path, source=True).runs
    for run in (visual, text):
        assert run.source is not None and run.source.framework == "PyTorch eager"
        assert run.source.min_cosine > 0.9999  # fp32: the session's outputs, item by item
        assert sorted(run.cpu_ms) == ["extract", "session", "source"]
        assert run.source.rate > 0 and run.source.speedup_range == (run.source.speedup,) * 2
        # one round: each ratio is the two rates' (the same items), extract's or the session's
        assert run.source.speedup == pytest.approx(run.extract_rate / run.source.rate)
        assert run.source.session_speedup == pytest.approx(run.session_rate / run.source.rate)
    # ResNet18 at batch size 3: 2 batches; the text model at 2: 3 batches
    assert eager == [3, 3, 2, 2, 2]


def test_least_cosine_is_over_rows() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert bench_source.least_cosine(a, np.array([[3.0, 0.0], [0.0, 1.0]])) == 1.0
    assert bench_source.least_cosine(a, np.array([[3.0, 0.0], [1.0, 0.0]])) == 0.0
    assert bench_source.least_cosine(a[:, :, None], -a[:, :, None]) == -1.0  # rows flattened


def test_bench_source_is_for_cpu_sessions(exported: dict[str, Any], tmp_path, monkeypatch):
    monkeypatch.setattr(bench_module, "CPU_PROVIDER", "SomeOtherExecutionProvider")
    report = bench(exported, items=2, repeats=1, work=tmp_path, source=True)
    assert all(run.source is None for run in report.runs)
    assert report.skipped[0].startswith(
        "visual.items.model.0: --source times the source framework on the CPU only"
    )


def test_bench_stops_a_sample_at_its_decoded_bytes(exported, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench_module, "SAMPLE_BYTES", 1)  # one decoded image is over it
    visual, text = bench(exported, items=3, repeats=1, work=tmp_path).runs
    assert (visual.items, visual.capped) == (1, True)
    assert (text.items, text.capped) == (3, False)  # texts are not counted


def test_bench_times_each_variant_in_the_same_rounds_and_compares_its_features(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int | None, int]] = []  # each extract: its workers and batch size
    extract = bench_module.api.extract

    def spy(config: Any) -> Any:
        calls.append((config.runtime.workers, config.jobs[0].models[0].batch_size))
        return extract(config)

    monkeypatch.setattr(bench_module.api, "extract", spy)
    settings = ["runtime.workers=1", "visual.items.model.0.batch_size=1"]
    timed: list[bench_module.BenchRound] = []
    report = bench(
        exported,
        items=4,
        repeats=2,
        work=tmp_path,
        variants=[*settings, settings[0]],
        on_round=timed.append,
    )
    # per model, each round: the config's extract, then each variant (the order rotated)
    assert sorted(calls[:6]) == [(1, 3), (1, 3), (2, 1), (2, 1), (2, 3), (2, 3)]
    assert sorted(calls[6:]) == [(1, 2), (1, 2), (2, 2), (2, 2), (2, 2), (2, 2)]
    for run in report.runs:
        assert [v.setting for v in run.variants] == settings
        for variant in run.variants:  # neither setting changes what is computed
            assert variant.identical and variant.min_cosine == 1.0
            assert variant.compared == 5  # the 4 items' features and the matrix
            assert variant.rate > 0
            assert variant.speedup_range[0] <= variant.speedup <= variant.speedup_range[1]
            assert f"extract {variant.setting}" in run.cpu_ms
            assert variant.once is not None and variant.once > 0
            low, high = variant.job_speedup_range or (1.0, 0.0)
            assert variant.job_speedup is not None and low <= variant.job_speedup <= high
        assert [v["setting"] for v in run.as_dict()["variants"]] == settings
    # each round said as it ended, with the rates the report's medians are taken from
    ways = ["extract", "session", *(f"extract {s}" for s in settings)]
    assert [(t.key_path, t.number, t.rounds, list(t.rates)) for t in timed] == [
        (run.key_path, n, 2, ways) for run in report.runs for n in (1, 2)
    ]
    for run, said in zip(report.runs, (timed[:2], timed[2:]), strict=True):
        for way, rate in (("extract", run.extract_rate), ("session", run.session_rate)):
            seconds = [run.items / t.rates[way] for t in said]
            assert rate == pytest.approx(run.items / np.median(seconds))
        for variant in run.variants:
            seconds = [run.items / t.rates[f"extract {variant.setting}"] for t in said]
            assert variant.rate == pytest.approx(run.items / np.median(seconds))


def _timed_runs(*first_batches: float, warm_up: float | None = 0.0, last: float = 0.0) -> list[Any]:
    """A round's model runs as extract returns them, each with its time to its first batch,
    how much longer that batch ran than the later ones, and its last writes."""
    return [
        SimpleNamespace(
            result=SimpleNamespace(
                timing=SimpleNamespace(first_batch=f, warm_up=warm_up, last_writes=last)
            )
        )
        for f in first_batches
    ]


def test_a_variant_is_also_timed_over_the_whole_job_its_start_up_once(tmp_path: Path) -> None:
    """Decoder processes start with each run: over a sample of 2048 items a second more of
    start-up is a quarter of the run, over a million items nothing. Each round's ratio takes
    what each way spends once (until its first batch ran; that batch's warm-up, how much
    longer it ran than the later ones; the last writes after the model's last batch) and the
    rest of the job at that way's pace in the sample."""
    seconds = {"extract": [4.0, 4.2, 5.0], "extract runtime.readers=processes": [4.5, 4.6, 4.4]}
    runs_of = {
        "extract": [_timed_runs(0.2), _timed_runs(0.25), _timed_runs(0.1, 0.1)],
        "extract runtime.readers=processes": [
            _timed_runs(x, warm_up=0.3, last=0.2) for x in (0.7, 0.8, 0.9)
        ],
    }
    last = {"extract": tmp_path / "a", "extract runtime.readers=processes": tmp_path / "b"}
    v = bench_module._variant("runtime.readers=processes", seconds, last, runs_of, (2048, 10**6))
    job = [
        (fb + (s - fb) / 2048 * 10**6) / (fv + (sv - fv) / 2048 * 10**6)
        for s, fb, sv, fv in zip(
            seconds["extract"],
            (0.2, 0.25, 0.2),
            seconds[f"extract {v.setting}"],
            (1.2, 1.3, 1.4),
            strict=True,
        )
    ]
    assert v.speedup == pytest.approx(4.2 / 4.6) and v.speedup < 1
    assert v.job_speedup is not None and v.job_speedup > 1.1
    assert v.job_speedup == pytest.approx(sorted(job)[1])
    assert v.job_speedup_range == pytest.approx((min(job), max(job)))
    assert v.once == pytest.approx(1.3)
    # the sample is the whole job: the same ratio as the sample's
    same = bench_module._variant("runtime.readers=processes", seconds, last, runs_of, (64, 64))
    assert same.job_speedup == pytest.approx(same.speedup)
    assert v.as_dict()["vs_extract_whole_job"] == round(v.job_speedup, 3)
    runs_of["extract"][1] = []  # an engine that times no first batch: nothing said
    untimed = bench_module._variant("runtime.readers=processes", seconds, last, runs_of, (8, 99))
    assert untimed.job_speedup is None and untimed.once is None
    assert untimed.as_dict()["vs_extract_whole_job"] is None


def test_bench_says_a_variant_over_the_whole_job_where_it_differs_from_the_sample() -> None:
    from ducho_fast.bench_variants import Variant
    from ducho_fast.console import _variant_line

    v = Variant(
        setting="runtime.readers=processes",
        rate=450.0,
        speedup=0.91,
        speedup_range=(0.88, 0.95),
        identical=True,
        min_cosine=1.0,
        compared=2048,
        once=1.31,
        job_speedup=1.18,
        job_speedup_range=(1.12, 1.25),
    )
    run = _run(items=2048, job_items=10**6, first_batch=0.24)
    assert _variant_line(v, run) == (
        "  with runtime.readers=processes: 450.0 items/s, 0.91x extract as configured (rounds "
        "0.88-0.95); over the job's 1,000,000 items 1.18x (rounds 1.12-1.25), its start-up and "
        "last writes, 1.31 s, once against 0.24 s; its 2048 feature files identical to "
        "extract's"
    )
    short = "0.91x extract as configured (rounds 0.88-0.95); its 2048"
    assert short in _variant_line(v, _run(items=2048, job_items=2048))  # the sample is the job
    assert short in _variant_line(replace(v, job_speedup=0.95), run)  # within 0.05
    assert "over the job" in _variant_line(replace(v, job_speedup=0.86), run)
    assert short in _variant_line(replace(v, job_speedup=None, job_speedup_range=None), run)


def test_variant_features_compared_file_by_file(tmp_path: Path) -> None:
    from ducho_fast.bench_variants import compare_features

    ours, theirs = tmp_path / "a" / "layer", tmp_path / "b" / "layer"
    for folder in (ours, theirs):
        folder.mkdir(parents=True)
        np.save(folder / "x.npy", np.array([1.0, 2.0, 3.0], np.float32))
        np.save(folder / "y.npy", np.array([[0.0, 1.0]], np.float32))
    assert compare_features(ours.parent, theirs.parent) == (True, 1.0, 2)
    np.save(theirs / "y.npy", np.array([[1.0, 1.0]], np.float32))
    identical, least, compared = compare_features(ours.parent, theirs.parent)
    assert not identical and least == pytest.approx(2**-0.5) and compared == 2
    (theirs / "y.npy").unlink()  # written by one way only: not the same outputs
    assert compare_features(ours.parent, theirs.parent) == (False, 1.0, 1)
    assert compare_features(ours.parent, tmp_path / "empty") == (False, None, 0)


def test_bench_refuses_variants_that_are_not_one_setting_of_the_same_models(
    exported: dict[str, Any], tmp_path: Path, tiny_bert_dir: Path
) -> None:
    with pytest.raises(ConfigError, match=r"--vs 'runtime.workers': a variant is one KEY=VALUE"):
        bench(exported, items=2, repeats=1, work=tmp_path, variants=["runtime.workers"])
    with pytest.raises(ConfigError, match=r"--vs runtime.workers=abc: .*'runtime.workers'"):
        bench(exported, items=2, repeats=1, work=tmp_path, variants=["runtime.workers=abc"])
    two = f"[{{model_name: {tiny_bert_dir}}}, {{model_name: {tiny_bert_dir}}}]"
    with pytest.raises(ConfigError, match=r"it changes the config's jobs or models"):
        bench(exported, items=2, repeats=1, variants=[f"textual.items.model={two}"])
    int8 = "textual.items.model.0.precision=int8"
    with pytest.raises(ArtifactError) as e:  # an int8 graph not exported yet: how to export it
        bench(exported, items=2, repeats=1, variants=[int8], overrides=["runtime.workers=1"])
    said = str(e.value)
    assert said.startswith(f"--vs {int8}: 'textual.items.model.0' (") and "not exported yet" in said
    assert f"run `ducho-fast export CONFIG --set runtime.workers=1 --set {int8}` first" in said
    resolved = ducho_fast.api.as_config(exported)
    with pytest.raises(ConfigError, match=r"not to a Config already resolved"):
        bench(resolved, items=2, repeats=1, variants=["runtime.workers=1"])


def test_bench_command_prints_each_variant(exported: dict[str, Any], tmp_path: Path) -> None:
    """The config comes from standard input (``-``), which is read once: each variant was
    the file read again, and a pipe's second read found nothing to extract."""
    import yaml

    work = tmp_path / "work"
    work.mkdir()
    args = ["bench", "-", "--items", "3", "--repeats", "1", "--work", str(work)]
    text = yaml.safe_dump(exported)
    result = CliRunner().invoke(app, [*args, "--vs", "runtime.workers=1", "--json"], input=text)
    assert result.exit_code == 0, result.output
    assert result.output.count("  with runtime.workers=1: ") == 2
    assert "x extract as configured" in result.output
    for key in ("visual.items.model.0", "textual.items.model.0"):  # said as each round ends
        said = re.search(rf"  {key}: round 1/1: (.*)", result.output)
        assert said, result.output
        assert re.fullmatch(
            r"extract [\d.]+/s, session alone [\d.]+/s, runtime.workers=1 [\d.]+/s", said[1]
        )
    assert "its 4 feature files identical to extract's" in result.output  # 3 items, the matrix
    line = json.loads(result.output.strip().splitlines()[-1])
    assert [r["variants"][0]["identical"] for r in line["runs"]] == [True, True]


def test_a_stopped_session_alone_ends_its_lanes_with_their_batch_under_way(ctrl_c: None) -> None:
    """Ctrl-C while bench times a session of two lanes: each lane ends with the batch it is
    running, before bench says it stopped. Before, they went on through every batch left,
    and a Ctrl-C then could abort the process in ONNX Runtime ("terminate called")."""
    import signal
    import threading

    from ducho_fast.bench_timing import session_alone

    ran: list[int] = []
    first_lane: list[int] = []  # its batches, the timed ones
    running = [0]
    lock = threading.Lock()

    class Lanes:
        lanes = 2

        def launch(self, batch: int, lane: int = 0) -> None:
            with lock:
                ran.append(batch)
                running[0] += 1
            timed = threading.current_thread() is not threading.main_thread()  # not warm-up
            if timed and lane == 0:
                first_lane.append(batch)
            if timed and lane == 0 and len(first_lane) == 3:  # Ctrl-C to the main thread,
                # which by now waits for the lanes
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                time.sleep(0.3)  # a long batch, under way when bench stops
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    before = threading.active_count()
    run = session_alone(Lanes(), list(range(200)))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        run()
    assert running == [0]  # no batch still running
    assert threading.active_count() == before
    assert len(ran) < 12  # the warm-up, a few batches, and one each lane was running


@pytest.mark.parametrize(
    ("error", "raised", "match"),
    [
        (
            RuntimeError("Available memory of 0 is smaller than requested bytes of 411041792"),
            DuchoError,
            r"^tiny: the session alone ran out of memory within runtime\.memory_limit \(1\.0 "
            r"GiB\) with 2 batches at once \(Available memory of 0 is smaller than requested "
            r"bytes of 411041792\), on batches that fitted .* runtime\.concurrent_batches=1\.$",
        ),
        (ValueError("a bad graph"), ValueError, "^a bad graph$"),
    ],
)
def test_a_lane_of_the_session_alone_that_fails_stops_the_others_and_its_error_is_raised(
    error: Exception, raised: type[Exception], match: str
) -> None:
    """A lane's error ended its thread and no more: the other lane ran its batches, the
    failed lane's were never timed, and bench printed a session rate too high."""
    from types import SimpleNamespace

    from ducho_fast.bench_timing import session_alone

    ran: list[int] = []

    class Lanes:
        lanes = 2
        name = "tiny"
        info = SimpleNamespace(memory_limit=2**30)

        def launch(self, batch: int, lane: int = 0) -> None:
            if batch == 6:
                raise error
            time.sleep(0.01)
            ran.append(batch)

    run = session_alone(Lanes(), list(range(100)))  # type: ignore[arg-type]
    with pytest.raises(raised, match=match):
        run()
    assert len(ran) < 20  # the other lane stopped after its batch under way


def test_a_batch_of_the_session_alone_that_runs_out_of_memory_runs_in_parts() -> None:
    """Batches that fit one at a time under runtime.memory_limit may not fit two at once:
    the session alone then runs that batch in parts, as extract does, instead of failing."""
    from types import SimpleNamespace

    from ducho_fast.bench_timing import session_alone

    noted: list[int] = []
    parts: list[list[int]] = []

    class Lanes:
        lanes = 2
        name = "tiny"
        info = SimpleNamespace(memory_limit=2**30)

        def launch(self, batch: Any, lane: int = 0) -> None:
            if batch.payloads == [6, 7]:
                raise RuntimeError("Available memory of 0 is smaller than requested bytes of 8")

        def ran_out_of_memory(self, size: int, error: BaseException) -> None:
            noted.append(size)

        def run_prepared(self, payloads: list[int]) -> None:
            parts.append(payloads)

    batches = [SimpleNamespace(payloads=[k, k + 1]) for k in range(0, 20, 2)]
    session_alone(Lanes(), batches)()  # type: ignore[arg-type]
    assert noted == [2] and parts == [[6, 7]]


def test_bench_cuts_clips_of_other_lengths_into_the_batches_extract_runs(
    tmp_path: Path, store: Path, tiny_wav2vec2_dir: Path
) -> None:
    """The session alone runs extract's batches: runs of batch_size clips, each cut into its
    clips of one length (one session run each), which the lanes then share out."""
    from ducho_fast.runtime.embedder import Embedder

    (tmp_path / "audio").mkdir()
    write_tone(tmp_path / "audio" / "a.wav")  # export checks its config's input folder
    model = {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers", "batch_size": 4}
    config = audio_config(tmp_path, model, store)
    artifact = ducho_fast.export(config)[0].artifact
    cfg = ducho_fast.api.as_config(config)
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, n).astype(np.float32) for n in (8000, 11200, 8000, 14400, 11200)]
    made = bench_module._batches(Embedder(artifact), cfg, cfg.jobs[0].models[0], waves)
    assert [[idx for idx, _ in b.parts] for b in made] == [[[0, 1]], [[0]], [[0]], [[0]]]
    assert [[len(w) for w in b.payloads] for b in made] == [[8000, 8000], [11200], [14400], [11200]]
