"""Ducho's layout cannot be steered outside the output folder by model names or ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ducho_fast.config.model import Job, ModelSpec
from ducho_fast.errors import DataError
from ducho_fast.outputs.ducho import DuchoWriter, layer_dir


def spec(model_name: str, modality: str = "textual") -> ModelSpec:
    return ModelSpec(
        modality=modality,
        origin="items",
        key_path=f"{modality}.items.model.0",
        model_name=model_name,
        backend="transformers",
        backend_dir="transformers",
        output_layers=("pooler_output",),
        batch_size=2,
    )


def job(tmp_path: Path, model: ModelSpec) -> Job:
    return Job("textual", "items", tmp_path / "in.tsv", tmp_path / "out", (model,))


@pytest.mark.parametrize(
    "name", ["../../evil/model", "/abs/models/bert", "..", "a/./../../b", "C:\\models\\..\\x"]
)
def test_model_names_stay_inside_the_output_folder(tmp_path: Path, name: str) -> None:
    model = spec(name)
    folder = layer_dir(job(tmp_path, model), model, "pooler_output").resolve()
    assert folder.is_relative_to((tmp_path / "out" / "transformers").resolve())


def test_unsafe_ids_are_never_written(tmp_path: Path) -> None:
    model = spec("bert")
    writer = DuchoWriter(job(tmp_path, model), model, squeeze=False)
    for item_id in ("../../x", "a/b", "\x00", "x" * 300, ".."):
        with pytest.raises(DataError, match=r"cannot be a file name"):
            writer.write(item_id, {"pooler_output": np.zeros(3, np.float32)})
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_float16_features_beyond_its_range_fail_instead_of_becoming_infinity(
    tmp_path: Path,
) -> None:
    model = ModelSpec(**{**spec("bert").__dict__, "output_layers": ("pooler_output", "1")})
    writer = DuchoWriter(job(tmp_path, model), model, squeeze=True, dtype="float16")
    big = {"pooler_output": np.ones(3, np.float32), "1": np.array([1.0, -7e4, 0], np.float32)}
    with pytest.raises(DataError, match=r"the '1' features exceed float16's range \(\+-65504\)"):
        writer.write("a", big)
    assert not [p for p in tmp_path.rglob("*.npy")]  # neither layer: no half-written item
    writer.write("b", {"pooler_output": np.ones(3, np.float32), "1": np.full(3, 6e4, np.float32)})
    assert np.isfinite(np.load(writer.path("1", "b"))).all()
    wide = DuchoWriter(job(tmp_path, model), model, squeeze=True)  # float32 holds it
    wide.write("a", big)
    assert np.load(wide.path("1", "a"))[1] == -7e4
