"""Config for two-tower blocks and the fusion section: resolution and every error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ducho_fast.config import load_config
from ducho_fast.config.model import tower_path
from ducho_fast.errors import ConfigError

PATHS = {
    "input_path": {"visual": "images", "textual": "meta.tsv"},
    "output_path": {"visual": "visual_embeddings", "textual": "textual_embeddings"},
}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def two_tower(model: dict[str, Any], **block: Any) -> dict[str, Any]:
    return {"visual_textual": {"items": {**PATHS, "model": [model], **block}}}


def load(tmp_path: Path, data: dict[str, Any]) -> Any:
    return load_config(write(tmp_path, data), cwd=tmp_path)


def test_ducho_demo_block_resolves_to_two_towers(tmp_path: Path) -> None:
    data = two_tower(
        {
            "model_name": "openai/clip-vit-base-patch16",
            "backend": "transformers",
            "output_layers": 1,
            "fusion": "concat",
        },
        item_column="asin",
        text_column="description",
    )
    cfg = load(tmp_path, data)
    job = cfg.jobs[0]
    assert job.input_path == tmp_path / "images"
    assert job.text_input_path == tmp_path / "meta.tsv"
    assert job.output_path == tmp_path / "visual_embeddings"
    assert job.text_output_path == tmp_path / "textual_embeddings"
    assert job.unpaired == "skip"
    towers = cfg.graphs()
    assert [t.tower for t in towers] == ["image", "text"]
    assert [t.tower_layers() for t in towers] == [["image_embeds"], ["text_embeds"]]
    assert [t.layer_labels() for t in towers] == [["1"], ["1"]]
    assert towers[0].model_dir == "openai/clip-vit-base-patch16"  # verbatim, as Ducho


def test_default_layer_and_backend_are_the_projected_embeddings(tmp_path: Path) -> None:
    spec = load(tmp_path, two_tower({"model_name": "m"})).models()[0]
    assert spec.backend == "transformers" and spec.output_layers == (1,)


def test_layer_pairs_and_mirrored_paths(tmp_path: Path) -> None:
    pair = {"visual": "vision_model_output.pooler_output", "textual": "text_model_output.x"}
    spec = load(tmp_path, two_tower({"model_name": "m", "output_layers": [pair]})).models()[0]
    image, text = spec.towers()
    assert image.tower_layers() == ["vision_model_output.pooler_output"]
    assert text.tower_layers() == ["text_model_output.x"]
    assert spec.layer_labels() == ["vision_model_output.pooler_output+text_model_output.x"]
    assert tower_path("vision_model_output.last_hidden_state", "text") == (
        "text_model_output.last_hidden_state"
    )
    assert tower_path("text_model_output.pooler_output", "image") == (
        "vision_model_output.pooler_output"
    )


def test_towers_get_separate_artifacts(tmp_path: Path) -> None:
    from ducho_fast.artifact import slug_for

    image, text = load(tmp_path, two_tower({"model_name": "m"})).graphs()
    assert slug_for(image) != slug_for(text)
    assert "-image-" in slug_for(image) and "-text-" in slug_for(text)


def test_ducho_image_processor_name_is_accepted(tmp_path: Path) -> None:
    spec = load(tmp_path, two_tower({"model_name": "m", "image_processor_name": "p"})).models()[0]
    assert spec.image_processor == "p"


@pytest.mark.parametrize("key", ["input_path", "output_path"])
def test_paths_must_map_both_modalities(tmp_path: Path, key: str) -> None:
    data = two_tower({"model_name": "m"})
    data["visual_textual"]["items"][key] = {"visual": "images"}
    with pytest.raises(ConfigError, match=rf"'visual_textual.items.{key}' must map both"):
        load(tmp_path, data)


def test_mapping_path_on_a_single_modality_block(tmp_path: Path) -> None:
    data = {"textual": {"items": {**PATHS, "model": [{"model_name": "m"}]}}}
    with pytest.raises(ConfigError, match=r"must be a string for textual blocks"):
        load(tmp_path, data)


@pytest.mark.parametrize(
    ("key", "value"), [("reshape", [224, 224]), ("preprocessing", "zscore"), ("weights", "none")]
)
def test_visual_keys_do_not_apply_to_two_tower_models(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"\.{key}' does not apply to visual_textual models"):
        load(tmp_path, two_tower({"model_name": "m", key: value}))


def test_two_tower_backend_must_be_transformers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Allowed for visual_textual: transformers"):
        load(tmp_path, two_tower({"model_name": "m", "backend": "torch"}))


def test_unknown_fusion_mode_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'concatenate'.*allowed: 'concat'"):
        load(tmp_path, two_tower({"model_name": "m", "fusion": "concatenate"}))


def test_fusion_key_on_a_single_modality_model(tmp_path: Path) -> None:
    data = {
        "textual": {
            "items": {
                "input_path": "t.tsv",
                "output_path": "o",
                "model": [{"model_name": "m", "fusion": "sum"}],
            }
        }
    }
    with pytest.raises(ConfigError, match=r"only applies to visual_textual.*top-level 'fusion'"):
        load(tmp_path, data)


def test_layer_mapping_needs_both_towers(tmp_path: Path) -> None:
    model = {"model_name": "m", "output_layers": [{"visual": "vision_model_output.x"}]}
    with pytest.raises(ConfigError, match=r"with both keys"):
        load(tmp_path, two_tower(model))


def test_unpaired_rule_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'visual_textual.items.unpaired' is 'drop'"):
        load(tmp_path, two_tower({"model_name": "m"}, unpaired="drop"))


# -- the top-level fusion section --------------------------------------------------------------

SEPARATE = {
    "visual": {
        "items": {
            "input_path": "images",
            "output_path": "v",
            "model": [{"model_name": "resnet18", "output_layers": ["avgpool", "fc"]}],
        }
    },
    "textual": {
        "items": {"input_path": "t.tsv", "output_path": "t", "model": [{"model_name": "m"}]}
    },
}


def with_fusion(**entry: Any) -> dict[str, Any]:
    return {**SEPARATE, "fusion": [{"mode": "concat", "output_path": "fused", **entry}]}


def test_fusion_section_resolves_model_refs_and_folders(tmp_path: Path) -> None:
    cfg = load(tmp_path, with_fusion(inputs=["visual.items.model.0:fc", "old/features"]))
    (fusion,) = cfg.fusions
    ref, folder = fusion.inputs
    assert (ref.model_key, ref.layer, ref.folder) == ("visual.items.model.0", "fc", None)
    assert folder.folder == tmp_path / "old/features" and folder.model_key is None
    assert fusion.output_path == tmp_path / "fused" and fusion.normalize is False


def test_fusion_ref_defaults_to_the_first_layer(tmp_path: Path) -> None:
    cfg = load(tmp_path, with_fusion(inputs=["visual.items.model.0", "textual.items.model.0"]))
    assert [i.layer for i in cfg.fusions[0].inputs] == ["avgpool", "pooler_output"]


def test_a_single_fusion_mapping_is_a_list_of_one(tmp_path: Path) -> None:
    data = {**SEPARATE, "fusion": {"inputs": ["a", "b"], "mode": "sum", "output_path": "f"}}
    assert len(load(tmp_path, data).fusions) == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"inputs": ["visual.items.model.3", "a"]},
            r"names the model entry 'visual.items.model.3'",
        ),
        ({"inputs": ["visual.items.model.0:layer9", "a"]}, r"asks for layer 'layer9'"),
        ({"inputs": ["a"]}, r"needs at least two inputs"),
        ({"inputs": ["a", "b"], "mode": "avg"}, r"'fusion.0.mode' is 'avg'"),
        ({"inputs": ["a", "b"], "output_path": None}, r"'fusion.0.output_path' must be a string"),
        ({"inputs": ["a", "b"], "weights": 1}, r"unknown key 'fusion.0.weights'"),
    ],
)
def test_fusion_section_errors(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, with_fusion(**entry))


def test_fusion_section_cannot_name_a_two_tower_model(tmp_path: Path) -> None:
    data = {
        **two_tower({"model_name": "m"}),
        "fusion": [
            {"inputs": ["visual_textual.items.model.0", "x"], "mode": "sum", "output_path": "f"}
        ],
    }
    with pytest.raises(ConfigError, match=r"fuse its two towers with"):
        load(tmp_path, data)
