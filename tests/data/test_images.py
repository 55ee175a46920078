from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ducho_fast.data.sources import check_ids
from ducho_fast.data.visual.images import list_images, load_image
from ducho_fast.errors import DataError
from tests.conftest import write_image


def test_listing_is_ducho_natural_order_and_stems_cut_at_first_dot(tmp_path: Path) -> None:
    for name in ["img10.jpg", "img2.png", "img1.tar.jpg", "notes.txt"]:
        if name.endswith(".txt"):
            (tmp_path / name).write_text("x")
        else:
            write_image(tmp_path / name)
    items, ignored = list_images(tmp_path)
    assert [i.item_id for i in items] == ["img1", "img2", "img10"]
    assert [p.name for p in ignored] == ["notes.txt"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_becomes_rgb_uint8(tmp_path: Path, mode: str) -> None:
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    write_image(path, mode=mode)
    array = load_image(path, (16, 8))
    assert array.shape == (8, 16, 3) and array.dtype == np.uint8


def test_resize_is_pil_bicubic_width_height(tmp_path: Path) -> None:
    path = write_image(tmp_path / "x.png", size=(50, 20))
    expected = np.asarray(
        Image.open(path).convert("RGB").resize((30, 10), Image.Resampling.BICUBIC)
    )
    np.testing.assert_array_equal(load_image(path, (30, 10)), expected)


def test_truncated_and_fake_images_are_data_errors(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.jpg", size=(64, 64))
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (truncated, fake, empty):
        with pytest.raises(DataError, match=r"not a readable image"):
            load_image(path, None)
    with pytest.raises(DataError, match=r"file not found"):
        load_image(tmp_path / "missing.jpg", None)


def test_unsafe_and_duplicate_ids_are_reported_not_written(tmp_path: Path) -> None:
    for name in ["a.jpg", "a.png", "b.jpg"]:
        write_image(tmp_path / name)
    items, _ = list_images(tmp_path)
    checked = check_ids(items, [])
    assert [i.item_id for i in checked.good] == ["a", "b"]
    assert "duplicate id" in checked.bad[0].reason


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist"):
        list_images(tmp_path / "nope")
