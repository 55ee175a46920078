"""A visual_textual block end to end: pairing by id, Ducho's folders, fusion, `fuse` alone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import ducho_fast
from ducho_fast.cli import app
from ducho_fast.config import load_config
from ducho_fast.data.pairs import paired_items
from ducho_fast.errors import ConfigError, DataError
from tests.conftest import within_fp32_bounds, write_image
from tests.data.test_sources import caseless_outputs
from tests.exporters.test_towers import hf_reference
from tests.test_fusion import Recorder

MODEL = "models/tiny-clip"  # a relative model name: Ducho's folders nest it verbatim
# Rows in another order than the images, one text without an image (T9), one image without text.
ROWS = [
    ("A3", "A book about rivers"),
    ("A1", "Running shoes, size 42"),
    ("T9", "only a text"),
    ("A4", "Garden hose, 20 m"),
    ("A2", "A red kettle"),
]


@pytest.fixture()
def dataset(tmp_path: Path, tiny_clip_dir: Path) -> Path:
    shutil.copytree(tiny_clip_dir, tmp_path / MODEL)
    (tmp_path / "images").mkdir()
    for i, size in enumerate([(40, 30), (64, 64), (30, 90), (50, 50), (33, 33)], start=1):
        write_image(tmp_path / "images" / f"A{i}.jpg", size, seed=i)
    lines = ["asin\tdescription"] + [f"{i}\t{t}" for i, t in ROWS]
    (tmp_path / "meta.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path


def config(data: Path, **model: Any) -> dict[str, Any]:
    entry = {"model_name": MODEL, "backend": "transformers", "output_layers": [1], **model}
    block: dict[str, Any] = {
        "input_path": {"visual": "images", "textual": "meta.tsv"},
        "output_path": {"visual": "visual_embeddings", "textual": "textual_embeddings"},
        "item_column": "asin",
        "text_column": "description",
        "model": [entry],
    }
    return {
        "dataset_path": str(data),
        "store": str(data / "store"),
        "visual_textual": {"items": block},
    }


def folder(data: Path, root: str) -> Path:
    return data / root / "transformers" / MODEL / "1"


def test_towers_are_paired_by_id_and_match_transformers(dataset: Path) -> None:
    cfg = config(dataset, fusion="concat")
    ducho_fast.export(cfg)
    shown = Recorder()
    report = ducho_fast.extract(cfg, ["output.layouts=[ducho, matrix]"], progress=shown)
    assert report.failed == 0
    job, key = "visual_textual.items", "visual_textual.items.model.0"
    assert [bar[:2] for bar in shown.bars] == [  # each tower and its matrix, then the fusion
        (f"{job} tiny-clip [image]", 4),
        (f"{job} tiny-clip [image] matrix (1)", 4),
        (f"{job} tiny-clip [text]", 4),
        (f"{job} tiny-clip [text] matrix (1)", 4),
        (f"{key}.fusion concat -> 1", 4),  # layer 1
        (f"{key} concat matrix (1)", 4),
    ]
    assert sorted(e.item_id for e in report.unpaired["visual_textual.items"]) == ["A5", "T9"]
    texts = dict(ROWS)
    for item_id in ["A1", "A2", "A3", "A4"]:
        image = np.load(folder(dataset, "visual_embeddings") / f"{item_id}.npy")
        text = np.load(folder(dataset, "textual_embeddings") / f"{item_id}.npy")
        image_ref = hf_reference(
            dataset / MODEL, Image.open(dataset / f"images/{item_id}.jpg"), None
        )
        text_ref = hf_reference(dataset / MODEL, None, texts[item_id])
        within_fp32_bounds(image, image_ref.image_embeds.numpy())  # (1, D) as Ducho saves
        within_fp32_bounds(text, text_ref.text_embeds.numpy())
        fused = np.load(
            folder(dataset, "visual_embeddings_textual_embeddings_concat") / f"{item_id}.npy"
        )
        np.testing.assert_array_equal(fused, np.concatenate([image, text], axis=1))
    for root in ("visual_embeddings", "textual_embeddings"):
        assert sorted(p.stem for p in folder(dataset, root).glob("*.npy")) == [
            "A1",
            "A2",
            "A3",
            "A4",
        ]
    errors = (dataset / "visual_embeddings" / "ducho-fast.errors.tsv").read_text()
    assert "A5\t" in errors and "T9\t" in errors and "unpaired" in errors


def test_unpaired_fail_stops_before_any_work(dataset: Path) -> None:
    cfg = config(dataset)
    cfg["visual_textual"]["items"]["unpaired"] = "fail"
    ducho_fast.export(cfg)
    with pytest.raises(DataError, match=r"2 id\(s\) are in only one modality \('A5', 'T9'\)"):
        ducho_fast.extract(cfg)
    assert not list((dataset / "visual_embeddings").rglob("*.npy"))


@pytest.mark.parametrize("mode", ["sum", "mul", "mean"])
def test_fuse_reuses_features_without_models(dataset: Path, mode: str) -> None:
    ducho_fast.export(config(dataset))
    ducho_fast.extract(config(dataset))
    shutil.rmtree(dataset / "store")  # no artifact, no model: fusion reads the features
    shown = Recorder()
    matrix = ["output.layouts=[ducho, matrix]"]
    (run,) = ducho_fast.fuse(config(dataset, fusion=mode), matrix, progress=shown)
    assert run.results[0].written == 4
    key = "visual_textual.items.model.0"
    assert shown.bars == [
        (f"{key}.fusion {mode} -> 1", 4, [4]),
        (f"{key} {mode} matrix (1)", 4, [4]),
    ]
    for item_id in ["A1", "A2", "A3", "A4"]:
        a = np.load(folder(dataset, "visual_embeddings") / f"{item_id}.npy")
        b = np.load(folder(dataset, "textual_embeddings") / f"{item_id}.npy")
        expected = {"sum": np.add(a, b), "mul": np.multiply(a, b), "mean": np.mean((a, b), axis=0)}
        fused = np.load(
            folder(dataset, f"visual_embeddings_textual_embeddings_{mode}") / f"{item_id}.npy"
        )
        np.testing.assert_array_equal(fused, expected[mode])


def test_elementwise_fusion_of_different_sizes_fails_before_work(dataset: Path) -> None:
    pair = {
        "visual": "vision_model_output.pooler_output",
        "textual": "text_model_output.pooler_output",
    }
    layers = [pair, 1]
    ducho_fast.export(config(dataset, output_layers=layers))
    cfg = config(dataset, output_layers=layers, fusion="sum")
    # CLIP's projected outputs are both 16-d here: no error; the [image] last_hidden_state is not.
    ducho_fast.extract(cfg)
    token_level = {
        "visual": "vision_model_output.last_hidden_state",
        "textual": "text_model_output.pooler_output",
    }
    ducho_fast.export(config(dataset, output_layers=[token_level]))
    shutil.rmtree(dataset / "visual_embeddings")
    with pytest.raises(ConfigError, match=r"token-, frame- or patch-level features \[17, 32\]"):
        ducho_fast.extract(config(dataset, output_layers=[token_level], fusion="mean"))
    assert not (dataset / "visual_embeddings").exists()


def test_cli_reports_pairs_towers_and_fusion(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    path = dataset / "config.yml"
    path.write_text(yaml.safe_dump(config(dataset, fusion="concat")))
    monkeypatch.chdir(dataset)
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(path)]).exit_code == 0
    result = runner.invoke(app, ["extract", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "tiny-clip [image]: 4 written" in result.output
    assert "tiny-clip [text]: 4 written" in result.output
    assert "2 id(s) in only one modality skipped (e.g. 'A5', 'T9')" in result.output
    assert "fusion concat: 4 fused, 0 failed" in result.output
    fused = runner.invoke(app, ["fuse", str(path)])
    # `fuse` again: the inputs are unchanged, so the fused files are reused.
    assert fused.exit_code == 0 and "fusion concat: 0 fused, 4 already done" in fused.output


def test_bench_times_both_towers_on_the_paired_ids(dataset: Path, monkeypatch) -> None:
    from ducho_fast import bench as bench_module

    written: list[dict[str, np.ndarray]] = []  # each round: both towers' features by name
    starts: list[float] = []
    extract = bench_module.api.extract

    def spy(sub: Any) -> Any:
        report = extract(sub)
        job = sub.jobs[0]
        for root in (job.output_path, job.text_output_path):
            written.append({p.name: np.load(p) for p in root.rglob("*.npy")})
        starts.append(sum(r.result.timing.first_batch for r in report.runs if r.result.timing))
        return report

    monkeypatch.setattr(bench_module.api, "extract", spy)
    cfg = config(dataset)
    ducho_fast.export(cfg)
    (run,) = bench_module.bench(cfg, items=3, repeats=1, work=dataset, source=True).runs
    # the folder's first 3 ids that have a row (A1, A2, A3), both towers, in one round
    assert (run.key_path, run.items, run.job_items) == ("visual_textual.items.model.0", 3, 4)
    assert [sorted(w) for w in written] == [["A1.npy", "A2.npy", "A3.npy"]] * 2
    assert run.source is not None and run.source.min_cosine > 0.9999  # both towers checked
    assert run.first_batch == pytest.approx(starts[0]) and len(starts) == 1
    assert not (dataset / "visual_embeddings").exists()
    extract(cfg)  # not the spy; the sample's features are the job's own: same images and texts
    for tower, root in zip(written, ("visual_embeddings", "textual_embeddings"), strict=True):
        for name, value in tower.items():
            np.testing.assert_array_equal(value, np.load(folder(dataset, root) / name))


def test_shards_of_a_two_tower_block_make_the_files_of_one_run(
    dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each tower runs its own windows of the paired ids (a batch each here), and drops the
    other inputs; the final plain run fuses. Byte for byte what one run writes."""
    from tests.conftest import npy_bytes

    split = tmp_path_factory.mktemp("split")
    for name in ["images", "meta.tsv", MODEL]:
        copy = shutil.copytree if (dataset / name).is_dir() else shutil.copy
        copy(dataset / name, split / name)
    one = config(dataset, fusion="mean", batch_size=1)
    ducho_fast.export(one)
    ducho_fast.extract(one)
    cfg = config(split, fusion="mean", batch_size=1)
    ducho_fast.export(cfg)
    written: dict[str, list[str]] = {"image": [], "text": []}
    for index in range(3):
        report = ducho_fast.extract(cfg, shard=f"{index}/3")
        assert not report.fusions and not report.failed
        for run in report.runs:
            assert run.tower is not None
            written[run.tower] += [run.job] * run.result.written
    assert {k: len(v) for k, v in written.items()} == {"image": 4, "text": 4}  # disjoint
    assert not list(split.rglob("*_mean"))  # the fusion waits for the plain run
    final = ducho_fast.extract(cfg)
    assert [r.result.written for r in final.runs] == [0, 0]
    assert [f.written for f in final.fusions[0].results] == [4]
    assert npy_bytes(split) == npy_bytes(dataset)


def test_pairs_check_ids_against_both_output_folders(dataset: Path, monkeypatch) -> None:
    shutil.copy(dataset / "images" / "A1.jpg", dataset / "images" / "a1.jpg")
    with (dataset / "meta.tsv").open("a") as f:
        f.write("a2\tA kettle, in lower case\n")
    job = load_config(config(dataset)).jobs[0]
    unpaired = {e.item_id for e in paired_items(job).unpaired}
    assert {"a1", "a2"} <= unpaired  # ids of their own on this file system
    probed = caseless_outputs(monkeypatch)
    pairs = paired_items(job)
    assert probed == [[dataset / "visual_embeddings", dataset / "textual_embeddings"]]
    assert [(e.item_id, "ignores case" in e.reason) for e in pairs.bad] == [
        ("a1", True),
        ("a2", True),
    ]
    assert [i.item_id for i in pairs.images] == [i.item_id for i in pairs.texts]
    assert not {"a1", "a2"} & {e.item_id for e in pairs.unpaired}
