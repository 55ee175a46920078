"""precision: fp16 and int8 variants, parity against the fp32 source recorded and enforced."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import ducho_fast
from ducho_fast.errors import ConfigError, ExportError, ParityError
from ducho_fast.exporters import precision as precision_module
from tests.conftest import (
    assert_artifact_files,
    audio_config,
    resnet18_entry,
    textual_config,
    visual_config,
)
from tests.exporters.test_towers import two_tower_config

pytestmark = pytest.mark.slow


def _minilm(minilm_dir: Path, precision: str) -> dict[str, object]:
    return {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "precision": precision,
    }


def test_int8_and_fp16_minilm_within_bounds_and_recorded(
    tmp_path: Path, store: Path, minilm_dir: Path
) -> None:
    texts = ["ok", "A waterproof jacket with taped seams.", "Great value. " * 30]
    vectors: dict[str, np.ndarray] = {}
    for precision in ("fp32", "fp16", "int8"):
        config = textual_config(tmp_path, _minilm(minilm_dir, precision), store)
        (result,) = ducho_fast.export(config)
        manifest = result.artifact.manifest
        assert manifest["precision"] == precision
        parity = manifest["parity"]
        assert parity["precision"] == precision and parity["passed"]
        bound = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}[precision]
        assert parity["bounds"]["min_cosine"] == bound
        assert parity["layers"]["1"]["min_cosine"] >= bound
        assert_artifact_files(result.artifact.path, "tokenizer.json")
        pooled = ducho_fast.load(result.artifact.path).embed(texts)
        assert isinstance(pooled, np.ndarray)
        vectors[precision] = pooled
    details = ducho_fast.export(textual_config(tmp_path, _minilm(minilm_dir, "int8"), store))
    info = details[0].artifact.manifest["precision_details"]
    assert info["quantized_nodes"] == 36  # every product with a weight
    # Per token, except the FFN expansions (wider out than in); the GELU-fed FFN outputs
    # asymmetric; SmoothQuant on all but those.
    assert info["schemes"] == {"per_tensor": 6, "per_token": 24, "per_token_asymmetric": 6}
    assert info["smoothquant"]["activations"] == 18
    graph = onnx.load(str(details[0].artifact.path / "model.onnx")).graph
    weights = {i.name for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulIntegerToFloat") == 30 and ops.count("MatMulInteger") == 6
    assert not [n for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights]
    for precision in ("fp16", "int8"):
        cos = (vectors[precision] * vectors["fp32"]).sum(1)  # unit vectors
        assert cos.min() >= {"fp16": 0.999, "int8": 0.99}[precision]
        assert not np.array_equal(vectors[precision], vectors["fp32"])  # really another graph
    # Three variants, three artifacts: the precision is part of the slug.
    slugs = {
        ducho_fast.export(textual_config(tmp_path, _minilm(minilm_dir, p), store))[0].artifact.path
        for p in ("fp32", "fp16", "int8")
    }
    assert len(slugs) == 3


def family_config(
    family: str, model_dir: Path, data: Path, store: Path, precision: str
) -> dict[str, Any]:
    """A config exporting a tiny model of ``family`` (``bert``: its last hidden state; ``clip``:
    both towers; ``hubert``: layer 1 of the audio encoder) in ``precision``."""
    model: dict[str, Any] = {"model_name": str(model_dir), "precision": precision}
    if family == "bert":
        return textual_config(data, {**model, "output_layers": ["last_hidden_state"]}, store)
    if family == "clip":
        return two_tower_config(model_dir, store, precision=precision)
    model["output_layers"] = [1]
    return audio_config(data, model, store)


@pytest.mark.parametrize("family", ["bert", "clip", "hubert"])
def test_int8_of_other_transformer_families(
    tmp_path: Path, store: Path, family: str, request: pytest.FixtureRequest
) -> None:
    """BERT through transformers, both towers of CLIP and a HuBERT audio encoder (tiny, random
    weights): every linear layer int8, the convolutions fp32, parity within the int8 bound."""
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")  # only the family's model built
    results = ducho_fast.export(family_config(family, model_dir, tmp_path, store, "int8"))
    assert len(results) == (2 if family == "clip" else 1)
    for result in results:
        manifest = result.artifact.manifest
        assert manifest["precision"] == "int8" and manifest["parity"]["passed"]
        for layer in manifest["parity"]["layers"].values():
            assert layer["min_cosine"] >= 0.99
        details = manifest["precision_details"]
        assert details["quantized_nodes"] == sum(details["schemes"].values()) > 0
        graph = onnx.load(str(result.artifact.path / "model.onnx")).graph
        weights = {i.name for i in graph.initializer}
        assert not [n for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights]
        assert "MatMulIntegerToFloat" in {n.op_type for n in graph.node}


def test_an_fp16_graph_run_on_the_cpu_is_told_what_suits_the_cpu(
    tmp_path: Path, store: Path, minilm_dir: Path, texts_tsv: Path
) -> None:
    shutil.copyfile(texts_tsv, tmp_path / "descriptions.tsv")
    advice = {}
    for precision in ("fp16", "fp32", "int8"):
        model = _minilm(minilm_dir, precision)
        config = textual_config(tmp_path, model, store, output_path=f"out_{precision}")
        ducho_fast.export(config)
        report = ducho_fast.extract(config)
        assert report.runs[0].provider == "CPUExecutionProvider" and report.failed == 0
        advice[precision] = [w for w in report.warnings if "fp16 graph ran on the CPU" in w]
    assert advice["fp32"] == advice["int8"] == []
    (fp16,) = advice["fp16"]
    assert fp16.startswith("textual.items.model.0: ") and "precision: fp32" in fp16


def test_precision_advice_is_about_fp16_on_cpus_and_int8_on_cuda_only() -> None:
    from ducho_fast.model_runs import precision_advice

    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert "precision: fp32" in (precision_advice("fp16", cpu) or "")
    assert "precision: fp16" in (precision_advice("int8", cuda) or "")
    assert precision_advice("fp16", cuda) is None and precision_advice("fp32", cuda) is None
    assert precision_advice("fp32", cpu) is None and precision_advice("int8", cpu) is None


def test_int8_below_its_bound_is_refused(
    tmp_path: Path, store: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without SmoothQuant and with one activation scale per batch for every weight product,
    # short texts fall to a cosine near 0.98: the bound must catch it.
    monkeypatch.setattr(precision_module, "smooth", lambda *a, **k: 0)
    real = precision_module.int8_schemes

    def per_tensor(graph):
        return dict.fromkeys(real(graph), precision_module.PER_TENSOR)

    monkeypatch.setattr(precision_module, "int8_schemes", per_tensor)
    config = textual_config(tmp_path, _minilm(minilm_dir, "int8"), store / "refused")
    with pytest.raises(ParityError, match=r"int8 ONNX graph disagrees.*cosine >= 0.99"):
        ducho_fast.export(config)
    assert not list((store / "refused").glob("sentence_transformers-*"))  # nothing kept


def test_int8_of_a_convolutional_model_says_what_to_do(
    tmp_path: Path, store: Path, image_dir: Path, resnet18_state_dict: Path
) -> None:
    entry = resnet18_entry(resnet18_state_dict, output_layers=["avgpool"], precision="int8")
    (tmp_path / "images").symlink_to(image_dir)
    with pytest.raises(
        ExportError,
        match=r"^'visual.items.model.0.precision' \(.*\): .*no matrix product with weights.*"
        r"precision: fp32",
    ):
        ducho_fast.export(visual_config(tmp_path, entry, store))


def test_fp16_image_model(
    tmp_path: Path, store: Path, image_dir: Path, resnet18_state_dict: Path
) -> None:
    entry = resnet18_entry(resnet18_state_dict, output_layers=["avgpool"], precision="fp16")
    (tmp_path / "images").symlink_to(image_dir)
    (result,) = ducho_fast.export(visual_config(tmp_path, entry, store))
    assert result.artifact.manifest["parity"]["layers"]["avgpool"]["min_cosine"] >= 0.999
    assert "BatchNormalization" not in result.artifact.manifest["precision_details"].get(
        "kept_fp32_ops", []
    )  # folded into the convolutions at export


def test_unknown_precision_is_a_config_error(tmp_path: Path, store: Path, minilm_dir) -> None:
    with pytest.raises(ConfigError, match=r"precision.*allowed: .fp32., .fp16., .int8., .bf16."):
        ducho_fast.export(textual_config(tmp_path, _minilm(minilm_dir, "fp8"), store))
