"""Two-tower export: one parity-checked graph per tower, each usable alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

import ducho_fast
from ducho_fast.errors import ExportError
from tests.conftest import _tiny_two_tower, within_fp32_bounds

TEXTS = ["A red kettle with a wooden handle", "ok", "Running shoes, size 42, breathable mesh"]


def two_tower_config(model_dir: Path, store: Path, **model: Any) -> dict[str, Any]:
    entry = {"model_name": str(model_dir), "backend": "transformers", **model}
    return {
        "store": str(store),
        "visual_textual": {
            "items": {
                "input_path": {"visual": "images", "textual": "d.tsv"},
                "output_path": {"visual": "v", "textual": "t"},
                "model": [entry],
            }
        },
    }


def hf_reference(model_dir: Path, image: Image.Image | None, text: str | None) -> Any:
    """The full model's forward as Ducho runs it: PIL image processor, one unpadded item."""
    from ducho_fast.exporters.compat import import_transformers

    transformers = import_transformers()
    import torch

    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    padding = "max_length" if type(model).__name__ == "SiglipModel" else False
    limit = 16 if padding else 77
    enc = tokenizer(
        text or "a photo", padding=padding, truncation=True, max_length=limit, return_tensors="pt"
    )
    image = image if image is not None else Image.new("RGB", (40, 40), (127, 127, 127))
    pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels
        )


@pytest.fixture(scope="module", params=["clip", "siglip", "altclip", "align"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Any]]:
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    store = tmp_path_factory.mktemp("store")
    results = ducho_fast.export(two_tower_config(model_dir, store, output_layers=[1]))
    return model_dir, results


def test_one_artifact_per_tower_with_parity(exported: tuple[Path, list[Any]]) -> None:
    _, results = exported
    assert [r.spec.tower for r in results] == ["image", "text"]
    image, text = (r.artifact.manifest for r in results)
    assert (image["modality"], image["tower"]) == ("visual", "image")
    assert (text["modality"], text["tower"]) == ("textual", "text")
    for manifest in (image, text):
        parity = manifest["parity"]
        assert parity["passed"] and parity["reference"].startswith("Transformers eager full")
        assert parity["layers"]["1"]["min_cosine"] >= 0.9999
    assert image["preprocessing"]["in_graph"] == ["cast", "rescale", "normalize", "transpose"]
    assert (results[1].artifact.path / "tokenizer.json").is_file()


def test_image_tower_alone_matches_transformers(
    exported: tuple[Path, list[Any]], image_dir: Path
) -> None:
    model_dir, results = exported
    files = sorted(image_dir.iterdir())[:4]  # RGB, grayscale and RGBA, several sizes
    tower = ducho_fast.load(results[0].artifact.path)
    ours = tower.embed(files)
    for row, path in zip(ours, files, strict=True):
        ref = hf_reference(model_dir, Image.open(path), None).image_embeds[0].numpy()
        within_fp32_bounds(row, ref)
        assert abs(np.linalg.norm(row) - 1.0) < 1e-5  # normalized, as Transformers returns


@pytest.mark.parametrize("crop", [(8, 8), (11, 11), (9, 12)])
def test_host_resize_and_crop_match_the_pil_image_processor(tmp_path: Path, crop: tuple) -> None:
    """Shortest-edge resize then centre crop, pixel for pixel against Transformers' PIL
    processor; a crop larger than the resized image pads it with zeros, an odd pixel of
    padding before the image (torchvision's crop puts it after)."""
    from ducho_fast.data.visual.images import finish_image
    from ducho_fast.exporters.compat import import_transformers
    from ducho_fast.exporters.hf_towers import pixel_preprocessing

    width, height = crop
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 8},
        "crop_size": {"height": height, "width": width},
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": False,  # the host's uint8 pixels, compared as they are
        "do_normalize": False,
        "resample": 3,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = import_transformers().AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    pre = pixel_preprocessing(processor, cast(Any, SimpleNamespace(key_path="m")))
    rng = np.random.default_rng(0)
    for size in [(20, 30), (30, 20), (8, 8), (9, 13), (13, 9), (5, 3)]:
        image = Image.fromarray(rng.integers(1, 256, (size[1], size[0], 3), dtype=np.uint8))
        expected = processor(images=image, return_tensors="np")["pixel_values"][0]
        ours = finish_image(image, pre)
        assert ours.shape == (height, width, 3)
        np.testing.assert_array_equal(ours, expected.transpose(1, 2, 0), err_msg=str(size))


def test_text_tower_alone_matches_transformers(exported: tuple[Path, list[Any]]) -> None:
    model_dir, results = exported
    tower = ducho_fast.load(results[1].artifact.path)
    ours = tower.embed(TEXTS)
    for row, text in zip(ours, TEXTS, strict=True):
        within_fp32_bounds(row, hf_reference(model_dir, None, text).text_embeds[0].numpy())


def test_an_image_processor_that_divides_by_the_std_again(
    tmp_path: Path, minilm_dir: Path, image_dir: Path
) -> None:
    """EfficientNet's processors (ALIGN's family) with ``include_top`` divide the normalized
    image by the std once more; the image tower's graph must too (cosine 0.51 without)."""
    model_dir = _tiny_two_tower("align_include_top", tmp_path / "model", minilm_dir)
    image, _ = ducho_fast.export(two_tower_config(model_dir, tmp_path / "store"))
    pre = image.artifact.manifest["preprocessing"]
    assert pre["std"] == [0.5**2, 0.5**2, 0.5**2] and pre["mean"] == [0.5, 0.5, 0.5]
    files = sorted(image_dir.iterdir())[:2]
    for row, path in zip(ducho_fast.load(image.artifact.path).embed(files), files, strict=True):
        within_fp32_bounds(
            row, hf_reference(model_dir, Image.open(path), None).image_embeds[0].numpy()
        )


def test_siglip_text_tower_pads_to_its_fixed_length(tiny_siglip_dir: Path, tmp_path: Path) -> None:
    (_, text) = ducho_fast.export(two_tower_config(tiny_siglip_dir, tmp_path))
    assert text.artifact.manifest["preprocessing"]["padding"] == "max_length"


def test_tower_output_paths(tiny_clip_dir: Path, tmp_path: Path) -> None:
    pair = {
        "visual": "vision_model_output.last_hidden_state",
        "textual": "text_model_output.pooler_output",
    }
    image, text = ducho_fast.export(two_tower_config(tiny_clip_dir, tmp_path, output_layers=[pair]))
    (out,) = image.artifact.manifest["outputs"]
    assert out["layer"] == "vision_model_output.last_hidden_state"
    assert out["item_shape"] == [17, 32]  # 16 patches + class token, hidden 32
    assert text.artifact.manifest["outputs"][0]["dim"] == 16  # CLIP v5 projects this output


def test_a_path_of_the_wrong_tower_is_refused(tiny_clip_dir: Path, tmp_path: Path) -> None:
    pair = {"visual": "text_model_output.pooler_output", "textual": "text_model_output.x"}
    with pytest.raises(ExportError, match=r"is not a image-tower output"):
        ducho_fast.export(two_tower_config(tiny_clip_dir, tmp_path, output_layers=[pair]))


def test_a_missing_attribute_names_what_exists(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"cannot select.*pooler_output, last_hidden_state"):
        ducho_fast.export(
            two_tower_config(tiny_clip_dir, tmp_path, output_layers=["vision_model_output.nope"])
        )


def test_a_single_tower_model_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"loads as BertModel, which is not a two-tower model"):
        ducho_fast.export(two_tower_config(tiny_bert_dir, tmp_path))


def test_a_source_model_returning_nan_is_an_export_error(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ducho_fast.exporters.hf_towers import TowersExporter

    def nan_reference(self: Any, built: Any, raw: Any, payload: Any) -> dict[str, np.ndarray]:
        return {"1": np.full(16, np.nan, dtype=np.float32)}

    monkeypatch.setattr(TowersExporter, "reference_item", nan_reference)
    with pytest.raises(ExportError, match=r"the source model itself returns NaN"):
        ducho_fast.export(two_tower_config(tiny_clip_dir, tmp_path))


def test_layers_command_lists_tower_outputs(tiny_clip_dir: Path) -> None:
    from typer.testing import CliRunner

    from ducho_fast.cli import app

    result = CliRunner().invoke(app, ["layers", "transformers", str(tiny_clip_dir)])
    assert result.exit_code == 0, result.output
    assert "vision_model_output.pooler_output" in result.output
    assert "text_model_output.hidden_states.N  (N = 0..2)" in result.output
