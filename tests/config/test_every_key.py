"""Every key of the shipped configs, given a value of the wrong kind, fails as a config error
(or is accepted): never a traceback. Fuzzing the same keys through export and extract found
a builder's ValueError escaping; this keeps the config layer, where most such values stop,
covered at every key."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ducho_fast.config import load_config
from ducho_fast.errors import DuchoError
from tests.conftest import REPO

VALUES: list[Any] = [None, "", -1, 0, [], {}, "x", 1.5, True, [1, 2, 3], {"a": 1}, 10**12]
# Keys the shipped configs leave to their defaults, where a wrong value is as likely.
UNSET = {
    "runtime": [
        "device",
        "prefetch",
        "workers",
        "concurrent_batches",
        "spin_wait",
        "io_binding",
        "memory_limit",
        "writers",
    ],
    "input": ["jpeg_decode", "exif_orientation", "max_image_pixels", "max_audio_seconds"],
    "output": ["resume", "id_order", "layouts"],
}


def leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            yield from leaves(value, (*path, k))
    if path:
        yield path


def with_value(config: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(config)
    node = changed
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value
    return changed


# Ducho's CLIP demo block, which no shipped config holds, with a fusion of its two folders.
TWO_TOWER: dict[str, Any] = {
    "dataset_path": "data/demo",
    "visual_textual": {
        "items": {
            "input_path": {"visual": "images", "textual": "descriptions.tsv"},
            "output_path": {"visual": "clip_visual", "textual": "clip_textual"},
            "item_column": "item_id",
            "text_column": "description",
            "model": [
                {
                    "model_name": "openai/clip-vit-base-patch16",
                    "backend": "transformers",
                    "output_layers": 1,
                    "fusion": "concat",
                    "batch_size": 4,
                }
            ],
        }
    },
    "fusion": [
        {
            "inputs": ["clip_visual", "clip_textual"],
            "mode": "sum",
            "normalize": True,
            "output_path": "clip_fused",
        }
    ],
}


@pytest.mark.parametrize("name", ["demo", "demo_audio", "demo_reviews", "two_tower"])
def test_a_wrong_value_at_any_key_is_a_config_error(tmp_path: Path, name: str) -> None:
    config: dict[str, Any]
    if name == "two_tower":
        config = copy.deepcopy(TWO_TOWER)
    else:
        config = yaml.safe_load((REPO / "config" / f"{name}.yml").read_text())
    config["dataset_path"] = str(REPO / config["dataset_path"])
    for block in ("visual", "textual", "audio"):  # weights a demo makes (make demo-audio)
        for entry in config.get(block, {}).get("items", {}).get("model", []):
            if entry.get("weights") not in (None, "default", "none"):
                entry["weights"] = "none"
    file = tmp_path / "config.yml"
    file.write_text(yaml.safe_dump(config))
    assert load_config(file, cwd=REPO).graphs()  # as written, it loads: the changes are tested
    paths = list(leaves(config))
    paths += [(section, key) for section, keys in UNSET.items() for key in keys]
    escaped = []
    for path in paths:
        for value in VALUES:
            file = tmp_path / "config.yml"
            file.write_text(yaml.safe_dump(with_value(config, path, value)))
            try:
                load_config(file, cwd=REPO).graphs()
            except DuchoError:
                pass
            except Exception as e:  # what the test is for: every other exception is a bug
                escaped.append(f"{'.'.join(map(str, path))} = {value!r}: {type(e).__name__}: {e}")
    assert len(paths) > 20
    assert escaped == []
