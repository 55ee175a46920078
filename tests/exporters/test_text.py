from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.errors import ExportError
from tests.conftest import textual_config

pytestmark = pytest.mark.slow


def export_one(data: Path, model: dict[str, Any], store: Path) -> Any:
    (result,) = ducho_fast.export(textual_config(data, model, store))
    return result


def test_transformers_ducho_layers(tmp_path, store, tiny_bert_dir) -> None:
    model = {
        "model_name": str(tiny_bert_dir),
        "backend": "transformers",
        "output_layers": ["pooler_output", "last_hidden_state", 0, 2],
    }
    manifest = export_one(tmp_path, model, store).artifact.manifest
    assert manifest["parity"]["passed"]
    outputs = {o["layer"]: o for o in manifest["outputs"]}
    assert not outputs["pooler_output"]["per_token"]
    assert outputs["last_hidden_state"]["per_token"] and outputs["2"]["per_token"]
    assert manifest["preprocessing"]["max_length"] == 128  # the model's position limit
    assert [i["name"] for i in manifest["inputs"]] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]


def test_transformers_unknown_layer(tmp_path, store, tiny_bert_dir) -> None:
    model = {"model_name": str(tiny_bert_dir), "output_layers": ["pooled_output"]}
    with pytest.raises(
        ExportError, match=r"no layer 'pooled_output'. Did you mean 'pooler_output'"
    ):
        export_one(tmp_path, model, store)
    with pytest.raises(ExportError, match=r"no layer '3'"):
        export_one(tmp_path, {**model, "output_layers": [3]}, store)


def test_real_minilm_through_transformers(tmp_path, store, minilm_dir) -> None:
    model = {"model_name": str(minilm_dir), "output_layers": ["pooler_output", "last_hidden_state"]}
    assert export_one(tmp_path, model, store).artifact.manifest["parity"]["passed"]


def test_sentence_transformers_pooling_and_norm_in_graph(tmp_path, store, minilm_dir) -> None:
    model = {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": [1],
    }
    artifact = export_one(tmp_path, model, store).artifact
    assert artifact.manifest["parity"]["passed"]
    assert artifact.manifest["preprocessing"]["modules"] == ["Transformer", "Pooling", "Normalize"]
    assert artifact.manifest["preprocessing"]["max_length"] == 256
    vectors = ducho_fast.load(artifact.path).embed(["a red running shoe", "espresso"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_missing_model_folder_is_a_clear_error(tmp_path, store) -> None:
    model = {
        "model_name": "no-such-org/no-such-model",
        "backend": "sentence_transformers",
        "output_layers": [1],
    }
    with pytest.raises(
        ExportError,
        match=r"cannot load the sentence-transformers model 'no-such-org/no-such-model'",
    ):
        export_one(tmp_path, model, store)


@pytest.mark.parametrize("backend", ["transformers", "sentence_transformers"])
@pytest.mark.parametrize("name", ["./models/missing", "models/org/missing", "/no/such/model"])
def test_a_model_path_that_does_not_exist_is_named_as_a_path(
    tmp_path, store, backend: str, name: str
) -> None:
    """Not the library's "Repo id must use alphanumeric chars": no hub name looks so."""
    model = {"model_name": name, "backend": backend, "output_layers": [1]}
    with pytest.raises(ExportError, match=r"'[^']+': no such folder \(a path, not a hub name\)"):
        export_one(tmp_path, model, store)


@pytest.mark.parametrize("backend", ["transformers", "sentence_transformers"])
@pytest.mark.parametrize("damage", ["truncated weights", "weights header", "tokenizer"])
def test_a_damaged_file_in_a_model_folder_is_named_as_such(
    tmp_path, store, tiny_bert_dir, backend: str, damage: str
) -> None:
    """safetensors and the tokenizer raise their own errors (SafetensorError, ...), which
    were tracebacks; the hint is about the folder's files, not the network."""
    import os
    import shutil

    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated weights":
        weights.write_bytes(bytes(data[:1000]))
    elif damage == "weights header":
        data[100:400] = os.urandom(300)
        weights.write_bytes(bytes(data))
    else:
        (folder / "tokenizer.json").write_text("{not json")
    layers = [1] if backend == "sentence_transformers" else ["pooler_output"]
    model = {"model_name": str(folder), "backend": backend, "output_layers": layers}
    with pytest.raises(
        ExportError,
        match=rf"cannot load the .*'{folder}' \(\w+: .*\)\. A file of that folder is missing, "
        "damaged or not what the library expects",
    ):
        export_one(tmp_path, model, store)
