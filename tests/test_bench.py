"""``ducho-fast bench``: extract and the session alone, timed on a sample of a config's data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import ducho_fast
from ducho_fast import bench as bench_module
from ducho_fast.bench import bench
from ducho_fast.cli import app
from ducho_fast.errors import ArtifactError, ConfigError, OutputError
from tests.conftest import two_job_config


@pytest.fixture
def exported(tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path) -> Any:
    config = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(config)
    return config


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
        assert 0 <= run.waiting_for_inputs < run.extract_seconds
        per_item = (run.extract_seconds - run.first_batch) / run.items
        assert run.job_seconds == pytest.approx(run.first_batch + per_item * run.job_items)
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
    missing = tmp_path / "no" / "such"
    with pytest.raises(
        OutputError, match=r"bench cannot make its work folder in .*no/such.*--work"
    ):
        bench(exported, items=2, repeats=1, work=missing)


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
    bad = runner.invoke(app, ["bench", str(path), "--items", "0"])
    assert bad.exit_code != 0


def test_bench_source_runs_the_torch_models_on_the_same_batches(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager: list[int] = []  # rows of each batch the source model ran, every round
    make = bench_module._eager

    def spy(specs: Any, batches: Any) -> Any:
        made = make(specs, batches)

        def counted(step: Any) -> Any:
            def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                eager.append(len(next(iter(feeds.values()))))
                return step(feeds)

            return run

        return replace(made, steps=[counted(step) for step in made.steps])

    monkeypatch.setattr(bench_module, "_eager", spy)
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
    assert bench_module._least_cosine(a, np.array([[3.0, 0.0], [0.0, 1.0]])) == 1.0
    assert bench_module._least_cosine(a, np.array([[3.0, 0.0], [1.0, 0.0]])) == 0.0
    assert bench_module._least_cosine(a[:, :, None], -a[:, :, None]) == -1.0  # rows flattened


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
