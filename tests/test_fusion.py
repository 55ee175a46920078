"""Fusion: each mode against Ducho's numpy, joins by id, and the fusion section end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.config.model import OutputOptions
from ducho_fast.errors import ConfigError, DataError
from ducho_fast.fusion import check_dims, fuse, fuse_folders
from tests.conftest import resnet18_entry, write_image


def rows(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, dim)).astype(np.float32)


def test_modes_match_duchos_numpy() -> None:
    a, b = rows(0), rows(1)
    # Ducho 2.0's VisualTextualDataset on its (1, D) arrays:
    np.testing.assert_array_equal(fuse([a, b], "concat"), np.concatenate((a, b), axis=1))
    np.testing.assert_array_equal(fuse([a, b], "sum"), np.add(a, b))
    np.testing.assert_array_equal(fuse([a, b], "mul"), np.multiply(a, b))
    np.testing.assert_array_equal(fuse([a, b], "mean"), np.mean((a, b), axis=0))
    assert fuse([a[0], b[0]], "concat").shape == (1, 16)  # (D,) inputs (squeezed) work too


def test_three_inputs_and_normalization() -> None:
    a, b, c = rows(0), rows(1), rows(2)
    np.testing.assert_allclose(fuse([a, b, c], "sum"), a + b + c, rtol=1e-6)
    fused = fuse([a * 10, b], "concat", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(fused[:, :8]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fused[:, 8:]), 1.0, rtol=1e-6)


def test_elementwise_needs_one_dimension() -> None:
    with pytest.raises(ConfigError, match=r"'f': fusion 'sum' is element-wise.*a \(8\), b \(4\)"):
        check_dims([8, 4], ["a", "b"], "sum", "f")
    check_dims([8, 4], ["a", "b"], "concat", "f")  # concat takes any sizes


def test_token_level_features_are_refused() -> None:
    with pytest.raises(
        DataError, match=r"one vector per item, found an array of shape \(1, 3, 8\)"
    ):
        fuse([np.zeros((1, 3, 8), np.float32), rows(0)], "concat")


def test_features_of_no_real_numbers_are_refused() -> None:
    """A complex feature was cast to float32 with a ComplexWarning, its imaginary part lost."""
    with pytest.raises(DataError, match=r"real numbers, found an array of complex64"):
        fuse([np.ones(8, np.complex64), rows(0)], "concat")
    ints = fuse([np.arange(8), np.ones(8, bool)], "sum")  # integers and flags are numbers
    np.testing.assert_array_equal(ints, np.arange(1, 9, dtype=np.float32).reshape(1, 8))


def write_features(folder: Path, ids: list[str], dim: int, seed: int) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    out = {}
    for k, item_id in enumerate(ids):
        out[item_id] = rows(seed * 100 + k, dim)
        np.save(folder / f"{item_id}.npy", out[item_id])
    return out


def test_folders_join_by_id_and_report_the_rest(tmp_path: Path) -> None:
    a = write_features(tmp_path / "a", ["x1", "x2", "x3"], 8, 1)
    b = write_features(tmp_path / "b", ["x3", "x1", "x9"], 4, 2)
    np.save(tmp_path / "a" / "bad.npy", np.zeros((1, 5, 8), np.float32))
    np.save(tmp_path / "b" / "bad.npy", rows(7, 4))
    (tmp_path / "a" / ".tmp-123.npy").write_bytes(b"partial")  # an interrupted write: ignored
    squeeze = OutputOptions(squeeze=True)
    result = fuse_folders(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "out", "concat", options=squeeze
    )
    assert result.written == 2
    for item_id in ("x1", "x3"):
        fused = np.load(tmp_path / "out" / f"{item_id}.npy")
        np.testing.assert_array_equal(fused, np.concatenate([a[item_id], b[item_id]], axis=1)[0])
    assert sorted(e.item_id for e in result.missing) == ["x2", "x9"]
    assert [e.item_id for e in result.errors] == ["bad"]


def test_fused_ids_come_in_duchos_natural_order(tmp_path: Path) -> None:
    """The order a fused matrix's rows take without output.id_order: an image folder's
    (img2 before img10), which was the files' sorted order (img10 before img2) and so
    differed from the image model's own matrix."""
    ids = ["img10", "img2", "img1", "a"]
    write_features(tmp_path / "a", ids, 4, 1)
    write_features(tmp_path / "b", ids, 4, 2)
    result = fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "sum")
    assert result.ids == ["a", "img1", "img2", "img10"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_feature_holding_nan_or_inf_fails_its_item_naming_the_file(
    tmp_path: Path, bad: float
) -> None:
    """A folder not made by extract (which refuses such outputs): not fused into every mode's
    output, where one NaN spoils the whole vector."""
    write_features(tmp_path / "a", ["x1", "x2"], 4, 1)
    write_features(tmp_path / "b", ["x1", "x2"], 4, 2)
    spoiled = rows(9, 4)
    spoiled[0, 2] = bad
    np.save(tmp_path / "b" / "x2.npy", spoiled)
    np.save(tmp_path / "a" / "x3.npy", np.ones((1, 4), np.int64))  # integers fuse as floats
    np.save(tmp_path / "b" / "x3.npy", rows(8, 4))
    for mode in ("concat", "mean"):
        result = fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / mode, mode)
        assert result.written == 2 and [e.item_id for e in result.errors] == ["x2"]
        says = f"{tmp_path / 'b' / 'x2.npy'} holds NaN or infinite values"
        assert says in result.errors[0].reason
        assert not (tmp_path / mode / "x2.npy").exists()


def test_a_fused_vector_beyond_float16s_range_fails_its_item(tmp_path: Path) -> None:
    for folder, value in (("a", 300.0), ("b", 300.0)):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "big.npy", np.full((1, 4), value, np.float32))
        np.save(tmp_path / folder / "ok.npy", np.full((1, 4), 2.0, np.float32))
    half = OutputOptions(dtype="float16")
    result = fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "m", "mul", options=half)
    assert result.written == 1 and [e.item_id for e in result.errors] == ["big"]
    assert "the fused features exceed float16's range" in result.errors[0].reason
    np.testing.assert_array_equal(np.load(tmp_path / "m" / "ok.npy"), np.full((1, 4), 4.0))


def test_a_fused_file_name_the_file_system_refuses_fails_its_item(
    tmp_path: Path, monkeypatch
) -> None:
    import errno

    from ducho_fast.outputs.atomic import NpyFiles
    from tests.outputs.test_ducho import refusing

    write_features(tmp_path / "a", ["x1", "x:2", "x3"], 4, 1)
    write_features(tmp_path / "b", ["x1", "x:2", "x3"], 4, 2)
    monkeypatch.setattr(NpyFiles, "save", refusing({"x:2.npy": errno.ENOENT}))
    result = fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "f", "concat")
    assert result.written == 2 and [e.item_id for e in result.errors] == ["x:2"]
    assert "refuses the file name 'x:2.npy'" in result.errors[0].reason
    assert sorted(p.name for p in (tmp_path / "f").glob("*.npy")) == ["x1.npy", "x3.npy"]


def test_ids_the_output_file_system_takes_as_one_fuse_once(tmp_path: Path, monkeypatch) -> None:
    """Inputs on a file system telling ``B00X`` and ``b00x`` apart, the fused folder on one
    ignoring case (or refusing ``:``): the first id is fused, the others fail naming it,
    instead of one fused file overwriting the other."""
    from ducho_fast import fusion
    from ducho_fast.data.ids import Folding

    a = write_features(tmp_path / "a", ["B00X", "b00x", "c:1", "d"], 4, 1)
    b = write_features(tmp_path / "b", ["B00X", "b00x", "c:1", "d"], 4, 2)
    probed: list[list[Path]] = []

    def caseless(folders: list[Path]) -> Folding:
        probed.append(list(folders))
        return Folding(case=True, refused=":")

    monkeypatch.setattr(fusion, "name_folding", caseless)
    result = fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "f", "sum")
    assert probed == [[tmp_path / "f"]]
    assert result.written == 2 and result.ids == ["B00X", "d"]
    assert [e.item_id for e in result.errors] == ["b00x", "c:1"]
    assert "would be that of 'B00X'" in result.errors[0].reason
    assert "ignores case" in result.errors[0].reason
    assert result.errors[0].origin == str(tmp_path / "a" / "b00x.npy")
    assert "refuses :" in result.errors[1].reason
    np.testing.assert_array_equal(np.load(tmp_path / "f" / "B00X.npy"), a["B00X"] + b["B00X"])
    assert sorted(p.name for p in (tmp_path / "f").glob("*.npy")) == ["B00X.npy", "d.npy"]


def test_missing_feature_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist. Extract that modality first"):
        fuse_folders([tmp_path / "none", tmp_path / "b"], tmp_path / "out", "sum")


# -- the fusion section: separately extracted modalities -------------------------------------


def cross_modal(data: Path, weights: Path, minilm: Path, **fusion: Any) -> dict[str, Any]:
    entry = {
        "inputs": ["visual.items.model.0", "textual.items.model.0"],
        "output_path": "fused",
        **fusion,
    }
    return {
        "dataset_path": str(data),
        "store": str(data / "store"),
        "visual": {
            "items": {
                "input_path": "images",
                "output_path": "v",
                "model": [resnet18_entry(weights)],
            }
        },
        "textual": {
            "items": {
                "input_path": "t.tsv",
                "output_path": "t",
                "model": [
                    {
                        "model_name": str(minilm),
                        "output_layers": [1],
                        "backend": "sentence_transformers",
                    }
                ],
            }
        },
        "fusion": [entry],
    }


@pytest.fixture()
def items(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    for i in range(1, 4):
        write_image(tmp_path / "images" / f"i{i}.png", seed=i)
    (tmp_path / "t.tsv").write_text("id\ttext\ni2\tsecond\ni1\tfirst\ni7\tno image\n")
    return tmp_path


def test_visual_and_text_features_fused_by_id(
    items: Path, resnet18_state_dict: Path, minilm_dir: Path
) -> None:
    cfg = cross_modal(items, resnet18_state_dict, minilm_dir, mode="concat", normalize=True)
    ducho_fast.export(cfg)
    report = ducho_fast.extract(cfg)
    (run,) = report.fusions
    (result,) = run.results
    assert result.written == 2 and sorted(e.item_id for e in result.missing) == ["i3", "i7"]
    for item_id in ("i1", "i2"):
        v = np.load(items / "v/torch/resnet18/avgpool" / f"{item_id}.npy")
        t = np.load(
            items / f"t/sentence_transformers/{str(minilm_dir).lstrip('/')}/1/{item_id}.npy"
        )
        expected = np.concatenate([v / np.linalg.norm(v), t / np.linalg.norm(t)], axis=1)
        np.testing.assert_allclose(np.load(items / "fused" / f"{item_id}.npy"), expected, rtol=1e-6)
    assert "no feature in" in (items / "fused" / "ducho-fast.errors.tsv").read_text()


def test_cross_modal_elementwise_size_mismatch_fails_before_work(
    items: Path, resnet18_state_dict: Path, minilm_dir: Path
) -> None:
    cfg = cross_modal(items, resnet18_state_dict, minilm_dir, mode="sum")
    ducho_fast.export(cfg)
    with pytest.raises(
        ConfigError, match=r"'fusion.0': fusion 'sum' is element-wise.*\(512\).*\(384\)"
    ):
        ducho_fast.extract(cfg)
    assert not (items / "v").exists() and not (items / "fused").exists()


def test_fusion_only_config_runs_without_models(tmp_path: Path) -> None:
    write_features(tmp_path / "old/visual", ["a", "b"], 4, 1)
    write_features(tmp_path / "old/audio", ["b", "a"], 4, 2)
    cfg = {
        "dataset_path": str(tmp_path),
        "fusion": {"inputs": ["old/visual", "old/audio"], "mode": "mean", "output_path": "f"},
    }
    (run,) = ducho_fast.fuse(cfg)
    assert run.results[0].written == 2 and sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "a.npy",
        "b.npy",
        "ducho-fast.manifest.json",
    ]


def test_unwritable_fusion_output_is_a_clear_error(tmp_path: Path) -> None:
    from ducho_fast.errors import OutputError

    write_features(tmp_path / "a", ["x1"], 4, 1)
    write_features(tmp_path / "b", ["x1"], 4, 2)
    (tmp_path / "out").write_text("a file where the output folder should be")
    with pytest.raises(
        OutputError, match=r"output folder (\S+)/out: \1/out is a file, not a folder. Give an"
    ):
        fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "sum")


def test_fuse_refuses_features_of_an_unfinished_run(tmp_path: Path) -> None:
    from ducho_fast.outputs.manifest import open_folder

    write_features(tmp_path / "a", ["x1"], 4, 1)
    write_features(tmp_path / "b", ["x1"], 4, 2)
    open_folder(tmp_path / "b", {"layer": "1"}, resume=False, what="test")  # killed mid-run
    with pytest.raises(DataError, match=r"b holds features of an unfinished run"):
        fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "sum")
    assert not (tmp_path / "out").exists()


def test_a_second_fusion_reuses_what_its_inputs_still_give(tmp_path: Path) -> None:
    """Fused files are remade only for inputs written since, or under other settings."""
    import os

    a = write_features(tmp_path / "a", ["x1", "x2", "x3"], 8, 1)
    write_features(tmp_path / "b", ["x1", "x2", "x3"], 8, 2)
    folders, out = [tmp_path / "a", tmp_path / "b"], tmp_path / "out"
    first = fuse_folders(folders, out, "sum", order=["x3", "x1", "x2"])
    assert (first.written, first.reused) == (3, 0)
    before = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    again = fuse_folders(folders, out, "sum", order=["x3", "x1", "x2"])
    assert (again.written, again.reused, again.ids) == (0, 3, ["x3", "x1", "x2"])
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == before
    a["x2"] = rows(99, 8)  # x2's image embedded again by a later extract
    np.save(tmp_path / "a" / "x2.npy", a["x2"])
    fused = (out / "x2.npy").stat().st_mtime_ns
    os.utime(tmp_path / "a" / "x2.npy", ns=(fused + 1000, fused + 1000))
    changed = fuse_folders(folders, out, "sum")
    assert (changed.written, changed.reused) == (1, 2)
    np.testing.assert_array_equal(np.load(out / "x2.npy"), a["x2"] + np.load(tmp_path / "b/x2.npy"))
    other = fuse_folders(folders, out, "mean")  # other settings: every file remade
    assert (other.written, other.reused) == (3, 0)


class Recorder:
    """A progress factory (as the CLI's) that keeps each label, total and tick."""

    def __init__(self) -> None:
        self.bars: list[tuple[str, int, list[int]]] = []

    @contextmanager
    def __call__(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        ticks: list[int] = []
        self.bars.append((label, total, ticks))
        yield ticks.append


def test_fusing_shows_progress_for_the_ids_it_fuses_now(tmp_path: Path) -> None:
    """A fusion of 300,000 items takes minutes: it moves a bar (a line in a log) in steps
    of ``TICK_ITEMS``, over the ids fused now; reused ids are named in the label."""
    import os

    from ducho_fast.fusion import TICK_ITEMS

    ids = [f"x{k}" for k in range(TICK_ITEMS * 2 + 5)]
    a = write_features(tmp_path / "a", ids, 4, 1)
    write_features(tmp_path / "b", ids, 4, 2)
    folders, out = [tmp_path / "a", tmp_path / "b"], tmp_path / "out"
    shown = Recorder()
    fuse_folders(folders, out, "sum", where="fusion.0", progress=shown)
    assert shown.bars == [("fusion.0 sum -> out", len(ids), [TICK_ITEMS, TICK_ITEMS, 5])]
    fuse_folders(folders, out, "sum", where="fusion.0", progress=shown)
    assert len(shown.bars) == 1  # nothing to fuse: no bar
    np.save(tmp_path / "a" / "x7.npy", a["x7"] * 2)  # embedded again since
    fused = (out / "x7.npy").stat().st_mtime_ns
    os.utime(tmp_path / "a" / "x7.npy", ns=(fused + 1000, fused + 1000))
    again = fuse_folders(folders, out, "sum", where="fusion.0", progress=shown)
    assert (again.written, again.reused) == (1, len(ids) - 1)
    label = f"fusion.0 sum -> out ({len(ids) - 1} of {len(ids)} done before)"
    assert shown.bars[1] == (label, 1, [1])


def test_fuse_and_extract_pass_their_progress_to_fusions(tmp_path: Path) -> None:
    write_features(tmp_path / "old/visual", ["a", "b", "c"], 4, 1)
    write_features(tmp_path / "old/audio", ["c", "b", "a"], 4, 2)
    cfg = {
        "dataset_path": str(tmp_path),
        "fusion": {"inputs": ["old/visual", "old/audio"], "mode": "concat", "output_path": "f"},
    }
    shown = Recorder()
    ducho_fast.fuse(cfg, ["output.layouts=[ducho, matrix]"], progress=shown)
    assert shown.bars == [("fusion.0 concat -> f", 3, [3]), ("fusion.0 concat matrix (f)", 3, [3])]
    shown = Recorder()
    report = ducho_fast.extract(cfg, ["fusion.output_path=g"], progress=shown)
    assert report.fusions[0].results[0].written == 3
    assert shown.bars == [("fusion.0 concat -> g", 3, [3])]
