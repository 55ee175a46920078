"""The matrix layout end to end: MMRec's files in its item order, Cornac's ids, fused too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.config import load_config
from ducho_fast.data import ids
from ducho_fast.data.ids import Folding
from ducho_fast.errors import ArtifactError, ConfigError
from ducho_fast.preflight import check_distinct_folders
from tests.conftest import resnet18_entry
from tests.test_fusion import Recorder

pytestmark = pytest.mark.slow


def demo_config(tmp_path, store, image_dir, texts_tsv, weights, minilm_dir, **output):
    (tmp_path / "images").symlink_to(image_dir)
    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    text = {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1}
    return {
        "dataset_path": str(tmp_path),
        "store": str(store),
        "output": {"layouts": ["ducho", "matrix"], **output},
        "visual": {
            "items": {
                "input_path": "images",
                "output_path": "v",
                "model": [resnet18_entry(weights)],
            }
        },
        "textual": {
            "items": {
                "input_path": "descriptions.tsv",
                "output_path": "t",
                "item_column": "item_id",
                "text_column": "description",
                "model": [text],
            }
        },
        "fusion": [
            {
                "inputs": ["visual.items.model.0:avgpool", "textual.items.model.0:1"],
                "mode": "concat",
                "output_path": "fused",
            }
        ],
    }


def test_mmrec_matrices_follow_id_order(
    tmp_path, store, image_dir, texts_tsv, resnet18_state_dict, minilm_dir
) -> None:
    order = ["B003", "007", "B001", "NEW1"] + [f"B{i:03d}" for i in (2, 4, 5, 6, 7, 8, 9, 10)]
    (tmp_path / "item_order.txt").write_text("\n".join(order) + "\n")
    config = demo_config(
        tmp_path,
        store,
        image_dir,
        texts_tsv,
        resnet18_state_dict,
        minilm_dir,
        id_order="item_order.txt",
    )
    ducho_fast.export(config)
    shown = Recorder()
    report = ducho_fast.extract(config, progress=shown)
    assert report.failed == 0
    matrices = {label: (total, ticks) for label, total, ticks in shown.bars if "matrix" in label}
    # The files read: every row's, and those averaged for the rows with no feature.
    assert matrices == {
        "visual.items resnet18 matrix (avgpool)": (10 + 12, [22]),  # "007", NEW1: no image
        "textual.items all-MiniLM-L6-v2 matrix (1)": (11 + 12, [23]),  # NEW1: no text
        "fusion.0 concat matrix (fused)": (10 + 12, [22]),
    }

    per_item = tmp_path / "v/torch/resnet18/avgpool"
    image = np.load(tmp_path / "v/matrix/torch/resnet18/avgpool/image_feat.npy")
    assert image.shape == (12, 512) and image.dtype == np.float32
    have = {i: np.load(per_item / f"{i}.npy")[0] for i in order if (per_item / f"{i}.npy").exists()}
    mean: np.ndarray = np.mean(list(have.values()), axis=0)
    for row, item_id in enumerate(order):
        expected = have.get(item_id, mean)  # "007" has no image, NEW1 nothing at all
        np.testing.assert_allclose(image[row], expected, rtol=1e-6, atol=1e-7)
    missing = (tmp_path / "v/matrix/torch/resnet18/avgpool/missing.tsv").read_text()
    assert "007\t" in missing and "NEW1\t" in missing
    (run,) = [r for r in report.runs if r.job == "visual.items"]
    assert [len(m.filled) for m in run.matrices] == [2]

    text_dir = next((tmp_path / "t" / "matrix").rglob("text_feat.npy")).parent
    text = np.load(text_dir / "text_feat.npy")
    ids = (text_dir / "ids.txt").read_text().split()
    assert ids == order and text.shape == (12, 384)
    text_items = next(p for p in (tmp_path / "t").rglob("007.npy") if "matrix" not in p.parts)
    np.testing.assert_array_equal(text[1], np.load(text_items)[0])

    fused = np.load(tmp_path / "fused/matrix/fused_feat.npy")
    assert fused.shape == (12, 512 + 384)
    np.testing.assert_array_equal(fused[0], np.load(tmp_path / "fused/B003.npy")[0])


def test_cornac_ids_without_id_order_and_token_layers_refused(
    tmp_path, store, image_dir, texts_tsv, resnet18_state_dict, minilm_dir
) -> None:
    config = demo_config(tmp_path, store, image_dir, texts_tsv, resnet18_state_dict, minilm_dir)
    ducho_fast.export(config)
    ducho_fast.extract(config)
    folder = tmp_path / "v/matrix/torch/resnet18/avgpool"
    ids = (folder / "ids.txt").read_text().split()
    assert ids == [f"B{i:03d}" for i in range(1, 11)]  # the input's order, as Cornac's ids
    features = np.load(folder / "image_feat.npy")
    for row, item_id in enumerate(ids):
        per_item = np.load(tmp_path / f"v/torch/resnet18/avgpool/{item_id}.npy")
        np.testing.assert_array_equal(features[row], per_item[0])

    tokens = {
        "model_name": str(minilm_dir),
        "backend": "transformers",
        "output_layers": ["last_hidden_state"],
    }
    config["textual"]["items"]["model"] = [tokens]
    del config["fusion"]
    ducho_fast.export(config)
    with pytest.raises(ConfigError, match=r"one vector per token.*Choose a pooled layer"):
        ducho_fast.extract(config)


def test_folders_one_only_to_their_file_system_are_one_writer(tmp_path, monkeypatch) -> None:
    """``out`` and ``OUT`` are two folders here, one where case is ignored (macOS, Windows)."""
    model = {"model_name": "resnet18", "output_layers": ["avgpool"]}
    block = {"input_path": "images", "output_path": "out", "model": [model]}
    other = {**block, "output_path": "OUT"}
    fusion = {"inputs": ["Features/A", "features/b"], "mode": "concat", "output_path": "features/a"}
    config = load_config(
        {"dataset_path": str(tmp_path), "visual": {"items": block, "interactions": other}}
    )
    fused = load_config({"dataset_path": str(tmp_path), "fusion": [fusion]})
    check_distinct_folders(config)
    check_distinct_folders(fused)
    assert list(tmp_path.iterdir()) == []  # probed: nothing left
    monkeypatch.setattr(ids, "_probe", lambda folder: Folding(case=True))
    first = tmp_path / "out" / "torch" / "resnet18" / "avgpool"
    with pytest.raises(
        ConfigError,
        match=rf"'visual.items.model.0' layer 'avgpool' and 'visual.interactions.model.0' layer "
        rf"'avgpool' would both write {tmp_path / 'OUT'}/torch/resnet18/avgpool \(also named "
        rf"{first}: the file system there ignores case in file names\), so one's files",
    ):
        check_distinct_folders(config)
    with pytest.raises(ConfigError, match=r"'fusion.0' would write .* which it reads as an input"):
        check_distinct_folders(fused)
    layers = {**block, "model": [{**model, "output_layers": ["avgpool", "AvgPool"]}]}
    one_model = load_config({"dataset_path": str(tmp_path), "visual": {"items": layers}})
    with pytest.raises(ConfigError) as refused:
        check_distinct_folders(one_model)
    assert "layer 'avgpool' and 'visual.items.model.0' layer 'AvgPool' would both" in str(
        refused.value
    )
    assert "Hint: their folders' names differ only where the file system" in str(refused.value)
    assert "list the model once" not in str(refused.value)


def test_a_folder_named_longer_than_its_file_system_allows_is_refused_first(tmp_path) -> None:
    """A layer named in 300 characters, or an output_path near 4096 bytes, names a folder no
    file system takes: its first check ended the run in an OSError (File name too long)."""
    model = {"model_name": "resnet18", "output_layers": ["l" * 300]}
    block = {"input_path": "images", "output_path": "out", "model": [model]}
    config = {"dataset_path": str(tmp_path), "visual": {"items": block}}
    with pytest.raises(
        ConfigError,
        match=rf"'visual.items.model.0' layer 'l+' would write {tmp_path}/out/torch/resnet18/"
        r"l+, longer than its file system allows .*\nHint: shorten the output_path, or",
    ):
        check_distinct_folders(load_config(config))
    model["output_layers"] = ["l" * 255]
    check_distinct_folders(load_config(config))
    model["output_layers"] = ["avgpool"]
    deep = "/".join(["o" * 200] * 21)  # the output_path fits; its feature folders do not
    block["output_path"] = deep[: 4096 - len(str(tmp_path)) - 2]
    with pytest.raises(ConfigError, match=r"layer 'avgpool' would write .*, longer than its"):
        check_distinct_folders(load_config(config))


def test_layouts_must_keep_the_per_item_parts(tmp_path: Path) -> None:
    from ducho_fast.config import load_config

    config: dict[str, Any] = {
        "dataset_path": str(tmp_path),
        "fusion": [],
        "output": {"layouts": ["matrix"]},
    }
    config["fusion"] = [{"inputs": ["a", "b"], "mode": "concat", "output_path": "f"}]
    with pytest.raises(ConfigError, match=r"must include 'ducho'"):
        load_config(config)


def test_two_models_or_blocks_writing_one_folder_are_refused_before_any_work(
    tmp_path, image_dir, resnet18_state_dict
) -> None:
    """Two writers of one feature folder would lose features (``--fresh``: the second removes
    what the first wrote in the same run): refused before any artifact or input is read."""
    (tmp_path / "images").symlink_to(image_dir)
    model = resnet18_entry(resnet18_state_dict)
    block = {"input_path": "images", "output_path": "out", "model": [model]}
    store = tmp_path / "store"  # empty: nothing exported, so the check must come first
    config: dict[str, Any] = {"dataset_path": str(tmp_path), "store": str(store)}
    config["visual"] = {"items": block, "interactions": {**block, "input_path": "photos"}}
    folder = tmp_path / "out" / "torch" / "resnet18" / "avgpool"
    with pytest.raises(
        ConfigError,
        match=rf"'visual.items.model.0' layer 'avgpool' and 'visual.interactions.model.0' layer "
        rf"'avgpool' would both write {folder}, .*\nHint: give visual.items and "
        r"visual.interactions different output_paths\.",
    ):
        ducho_fast.extract(config)
    config["visual"] = {"items": {**block, "model": [model, {**model, "reshape": [32, 32]}]}}
    with pytest.raises(ConfigError, match=r"(?s)'visual.items.model.1'.*Hint: list the model once"):
        ducho_fast.extract(config)
    config["visual"] = {"items": {**block, "model": [{**model, "output_layers": ["fc", "fc"]}]}}
    with pytest.raises(ConfigError, match=r"layer .fc. is listed twice in output_layers"):
        ducho_fast.extract(config)
    # Fusions: two into one folder, one into a folder of features or into its own input.
    config["visual"] = {"items": block}
    fusion = {"inputs": ["visual.items.model.0", "old"], "mode": "concat", "output_path": "f"}
    config["fusion"] = [fusion, {**fusion, "mode": "sum"}]
    with pytest.raises(
        ConfigError,
        match=rf"'fusion.0' and 'fusion.1' would both write {tmp_path / 'f'}, so one's files "
        r"would replace or remove the other's\.\nHint: give 'fusion.1' another output_path\.",
    ):
        ducho_fast.extract(config)
    config["fusion"] = [{**fusion, "output_path": "out/torch/resnet18/avgpool"}]
    with pytest.raises(ConfigError, match=r"'visual.items.model.0' layer 'avgpool' and 'fusion.0'"):
        ducho_fast.fuse(config)
    config["fusion"] = [{**fusion, "output_path": "old"}]
    with pytest.raises(ConfigError, match=r"'fusion.0' would write .* which it reads as an input"):
        ducho_fast.fuse(config)
    del config["fusion"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "f").exists()
    # In folders of their own they pass the check and go on (to the artifact, not exported).
    config["visual"] = {"items": block, "interactions": {**block, "output_path": "photos_out"}}
    with pytest.raises(ArtifactError, match=r"has not been exported"):
        ducho_fast.extract(config)
