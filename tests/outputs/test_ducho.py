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
