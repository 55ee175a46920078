"""Interactions of every modality: (user, item) ids, Ducho's ``<user>__<item>.npy`` naming.

Textual interactions come from a TSV (user, item and review columns); visual and audio
interactions from files named ``<user>__<item>.<ext>``, Ducho's rule. The features equal the
source framework's, and every bad row or file is reported with the rows around it kept.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.api import ERRORS_FILE
from ducho_fast.config import load_config
from ducho_fast.data.text.tsv import BadText, read_interaction_items
from ducho_fast.errors import ConfigError, DataError
from tests.conftest import resnet18_entry, within_fp32_bounds, write_image, write_tone

REVIEWS = (
    "user\titem\trating\treview\n"
    "u1\tB001\t5\tGreat mug, keeps coffee hot for hours.\n"
    "u2\tB001\t2\tThe handle broke after a week.\n"
    "u1\tB002\t4\tComfortable running shoes, true to size.\n"
    "u1\tB001\t3\tA second review of the same mug.\n"
    "\tB003\t4\tNo user on this row.\n"
    "u3\tB003\t1\t\n"
    "u3\tB004\t5\tNaN\n"
    "007\t010\t4\tIds stay strings: leading zeros are kept.\n"
)


def errors(folder: Path) -> dict[str, str]:
    with (folder / ERRORS_FILE).open() as f:
        return {row["origin"]: row["reason"] for row in csv.DictReader(f, delimiter="\t")}


def test_reader_names_pairs_like_ducho(tmp_path: Path) -> None:
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text(REVIEWS)
    items = read_interaction_items(tsv, None, None)
    assert [i.item_id for i in items][:3] == ["u1__B001", "u2__B001", "u1__B002"]
    assert items[0].raw == "Great mug, keeps coffee hot for hours."
    assert items[-1].item_id == "007__010"
    assert isinstance(items[4].raw, BadText) and "user cell is empty" in items[4].raw.reason
    named = read_interaction_items(tsv, ("item", "user"), "rating")
    assert named[0].item_id == "B001__u1" and named[0].raw == "5"


def test_reader_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text("user\treview\nu1\tgood\n")
    with pytest.raises(DataError, match=r"reviews.tsv: interactions need a user, an item and a"):
        read_interaction_items(tsv, None, None)
    tsv.write_text(REVIEWS)
    with pytest.raises(DataError, match=r"no column 'buyer' \(from 'interaction_columns'\)"):
        read_interaction_items(tsv, ("buyer", "item"), None)
    with pytest.raises(DataError, match="the text column 'item' is also an id column"):
        read_interaction_items(tsv, None, "item")


def _textual(data: Path, store: Path, model: dict[str, Any], **block: Any) -> dict[str, Any]:
    return {
        "dataset_path": str(data),
        "store": str(store),
        "textual": {
            "interactions": {
                "input_path": "reviews.tsv",
                "output_path": "reviews",
                "model": [model],
                **block,
            }
        },
    }


def test_ducho_interaction_column_is_the_review_column(tmp_path: Path) -> None:
    config = _textual(tmp_path, tmp_path, {"model_name": "m"}, interaction_column="review")
    job = load_config(config).jobs[0]
    assert job.origin == "interactions" and job.text_column == "review"
    assert job.interaction_columns is None
    config = _textual(tmp_path, tmp_path, {"model_name": "m"}, interaction_columns=["u", "i"])
    assert load_config(config).jobs[0].interaction_columns == ("u", "i")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"interaction_columns": ["user"]}, "must name two different columns"),
        ({"interaction_columns": ["u", "u"]}, "must name two different columns"),
        ({"item_column": "item"}, "does not apply to interactions.*interaction_columns"),
    ],
)
def test_bad_interaction_keys(tmp_path: Path, block: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_textual(tmp_path, tmp_path, {"model_name": "m"}, **block))


def test_interaction_columns_are_for_textual_blocks(tmp_path: Path) -> None:
    config = {
        "visual": {
            "interactions": {
                "input_path": "photos",
                "output_path": "o",
                "interaction_columns": ["user", "item"],
                "model": [{"model_name": "resnet18", "output_layers": ["avgpool"]}],
            }
        }
    }
    with pytest.raises(ConfigError, match="take their ids from file names"):
        load_config(config, cwd=tmp_path)


@pytest.mark.slow
def test_textual_interactions_equal_encode(tmp_path: Path, store: Path, minilm_dir: Path) -> None:
    from ducho_fast.exporters.compat import import_sentence_transformers

    SentenceTransformer = import_sentence_transformers().SentenceTransformer
    (tmp_path / "reviews.tsv").write_text(REVIEWS)
    model = {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "batch_size": 3,
    }
    config = _textual(tmp_path, store, model, interaction_columns=["user", "item"])
    config["textual"]["interactions"]["text_column"] = "review"
    ducho_fast.export(config)
    report = ducho_fast.extract(config)

    folder = next(tmp_path.joinpath("reviews").rglob("u1__B001.npy")).parent
    written = sorted(p.stem for p in folder.glob("*.npy"))
    assert written == ["007__010", "u1__B001", "u1__B002", "u2__B001"]
    assert report.runs[0].result.written == 4
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    texts: dict[str, Any] = {}
    for i in read_interaction_items(tmp_path / "reviews.tsv", None, None):
        texts.setdefault(i.item_id, i.raw)  # the first of duplicated pairs is kept
    for stem in written:
        within_fp32_bounds(np.load(folder / f"{stem}.npy"), st.encode([texts[stem]]))

    reported = errors(tmp_path / "reviews")
    assert "first seen at reviews.tsv:2, which is kept" in reported["reviews.tsv:5"]
    assert "user cell is empty" in reported["reviews.tsv:6"]
    assert "the text is empty" in reported["reviews.tsv:7"]
    assert "missing-value marker ('NaN')" in reported["reviews.tsv:8"]


@pytest.mark.slow
def test_visual_interactions_use_file_names(
    tmp_path: Path, store: Path, resnet18_state_dict: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "u1__B001.jpg", seed=1)
    write_image(photos / "u2__B001.png", seed=2)
    write_image(photos / "B003.jpg", seed=3)
    write_image(photos / "__B004.jpg", seed=4)
    model = resnet18_entry(resnet18_state_dict)
    block = {"input_path": "photos", "output_path": "photo_reviews", "model": [model]}
    items = {**block, "output_path": "as_items"}
    config = {
        "dataset_path": str(tmp_path),
        "store": str(store),
        "visual": {"interactions": block, "items": items},
    }
    ducho_fast.export(config)
    ducho_fast.extract(config)

    folder = next(tmp_path.joinpath("photo_reviews").rglob("u1__B001.npy")).parent
    assert sorted(p.name for p in folder.glob("*.npy")) == ["u1__B001.npy", "u2__B001.npy"]
    same = next(tmp_path.joinpath("as_items").rglob("u1__B001.npy"))
    np.testing.assert_array_equal(np.load(folder / "u1__B001.npy"), np.load(same))
    reported = errors(tmp_path / "photo_reviews")
    assert "named <user>__<item>.<extension>" in reported[str(photos / "B003.jpg")]
    assert "rename '__B004.jpg'" in reported[str(photos / "__B004.jpg")]


@pytest.mark.slow
def test_audio_interactions_use_file_names(
    tmp_path: Path, store: Path, tiny_wav2vec2_dir: Path
) -> None:
    clips = tmp_path / "voice_reviews"
    clips.mkdir()
    write_tone(clips / "u1__S01.wav", seconds=0.4)
    write_tone(clips / "u2__S01.flac", seconds=0.3, freq=660.0)
    write_tone(clips / "S02.wav", seconds=0.3)
    model = {"model_name": str(tiny_wav2vec2_dir), "pooling": "mean"}
    config = {
        "dataset_path": str(tmp_path),
        "store": str(store),
        "audio": {
            "interactions": {"input_path": "voice_reviews", "output_path": "out", "model": [model]}
        },
    }
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    assert report.runs[0].result.written == 2
    written = sorted(p.name for p in tmp_path.joinpath("out").rglob("*.npy"))
    assert written == ["u1__S01.npy", "u2__S01.npy"]
    assert "named <user>__<item>" in errors(tmp_path / "out")[str(clips / "S02.wav")]
    shutil.rmtree(clips)
