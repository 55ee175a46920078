from __future__ import annotations

import errno
import io
import os
import pickle
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image, ImageOps

from ducho_fast.config.model import InputOptions
from ducho_fast.data.items import FileStamp
from ducho_fast.data.sources import check_ids
from ducho_fast.data.visual import images
from ducho_fast.data.visual.images import (
    IMAGE_SUFFIXES,
    check_files,
    decode_image,
    draft_edge,
    finish_image,
    list_images,
    load_image,
    prepare_image,
)
from ducho_fast.errors import DataError, UnreadableFile
from tests.conftest import write_image


def test_listing_is_ducho_natural_order_and_stems_cut_at_first_dot(tmp_path: Path) -> None:
    for name in ["img10.jpg", "img2.png", "img1.tar.jpg", "notes.txt", "._img2.png"]:
        if name.endswith(".txt"):
            (tmp_path / name).write_text("x")
        else:
            write_image(tmp_path / name)
    (tmp_path / ".jpg").write_bytes((tmp_path / "img10.jpg").read_bytes())
    items, ignored, folders = list_images(tmp_path)
    assert [i.item_id for i in items] == ["img1", "img2", "img10"] and folders == []
    # hidden files (macOS's ._ copies): counted as ignored, not items with an empty id
    assert sorted(p.name for p in ignored) == ["._img2.png", ".jpg", "notes.txt"]


def test_jpegs_named_jfif_or_jpe_avif_and_jpeg_2000_are_images(tmp_path: Path) -> None:
    """What Pillow's wheels read beside the usual suffixes: a .jfif or .jpe is a JPEG (saved
    from a browser) and decodes as the .jpg it is; AVIF and JPEG 2000 decode too."""
    jpeg = write_image(tmp_path / "a.jpg", size=(40, 30))
    for name in ("b.jfif", "c.JPE"):
        (tmp_path / name).write_bytes(jpeg.read_bytes())
    pixels = np.asarray(Image.open(jpeg).convert("RGB"))
    Image.fromarray(pixels).save(tmp_path / "d.avif", quality=90)
    Image.fromarray(pixels).save(tmp_path / "e.jp2")
    items, ignored, _ = list_images(tmp_path)
    assert [i.item_id for i in items] == ["a", "b", "c", "d", "e"] and ignored == []
    decoded = [load_image(item.raw, None) for item in items]
    for array in decoded[:3]:
        np.testing.assert_array_equal(array, pixels)
    assert np.abs(decoded[3].astype(int) - pixels).mean() < 8  # lossy
    np.testing.assert_array_equal(decoded[4], pixels)  # JPEG 2000 is lossless by default


def test_an_avif_this_pillow_cannot_read_says_which_pillow_can(tmp_path, monkeypatch) -> None:
    from PIL import features

    content = b"\x00\x00\x00\x1cftypavif" + bytes(64)  # no image Pillow knows
    bad, other = tmp_path / "a.avif", tmp_path / "a.png"
    bad.write_bytes(content)
    other.write_bytes(content)

    def reason(path: Path) -> str:
        with pytest.raises(UnreadableFile, match=r"not a readable image") as caught:
            load_image(path, None)
        return str(caught.value)

    assert "cannot read AVIF" not in reason(bad)  # this Pillow has a decoder: no advice
    monkeypatch.setattr(features, "check", lambda feature: feature != "avif")
    assert reason(bad).endswith(
        f"This Pillow ({PIL.__version__}) cannot read AVIF: install Pillow 11.2 or later, or "
        "convert the file to JPEG or PNG."
    )
    assert "AVIF" not in reason(other)  # not named .avif: nothing said of AVIF


HEIC = Path(__file__).resolve().parent / "heic"  # made by tests/data/heic/make.py


@pytest.mark.skipif(images.heif_plugin() is None, reason="no HEIF plugin (the heif extra)")
def test_heic_photos_are_read_upright_where_a_plugin_is_installed(tmp_path: Path) -> None:
    """The `heif` extra's plugin reads HEIC/HEIF (phones' photos): listed beside the other
    images, decoded close to the pixels written (HEVC is lossy), turned as the container
    says, once, whatever input.exif_orientation says (libheif turns it; the plugin then marks
    the EXIF upright)."""
    from tests.data.heic.make import source

    for name in ("tile.heic", "turned.heic"):
        (tmp_path / name).write_bytes((HEIC / name).read_bytes())
    (tmp_path / "tile.heif").write_bytes((HEIC / "tile.heic").read_bytes())
    items, ignored, _ = list_images(tmp_path)
    assert [i.item_id for i in items] == ["tile", "tile", "turned"] and ignored == []
    tile, _, turned = (load_image(item.raw, None) for item in items)
    assert tile.shape == (48, 64, 3) and turned.shape == (64, 48, 3)
    assert np.abs(tile.astype(int) - source()).max() <= 8
    np.testing.assert_array_equal(turned, np.rot90(tile, k=-1))
    kept = prepare_image(tmp_path / "turned.heic", {}, InputOptions(exif_orientation="ignore"))
    np.testing.assert_array_equal(kept, turned)
    # its bytes, as the embedding API takes them, decode as the file does
    np.testing.assert_array_equal(load_image((HEIC / "tile.heic").read_bytes(), None), tile)
    check_files(tmp_path / "turned.heic", images.image_suffixes(), "image")


def test_without_a_heif_plugin_heic_files_are_ignored_and_the_way_to_read_them_said(
    tmp_path: Path, monkeypatch
) -> None:
    from ducho_fast.console import _ignored

    monkeypatch.setattr(images, "heif_plugin", lambda: None)
    for name in ("IMG_0001.HEIC", "IMG_0002.heif"):
        (tmp_path / name).write_bytes((HEIC / "tile.heic").read_bytes())
    with pytest.raises(DataError, match=r"\(IMG_0001\.HEIC, IMG_0002\.heif\) are not image") as e:
        check_files(tmp_path, images.image_suffixes(), "image")
    advice = "HEIC/HEIF photos are read with a HEIF plugin: pip install 'ducho-fast[heif]'"
    assert advice in str(e.value)
    write_image(tmp_path / "a.jpg")
    items, ignored, _ = list_images(tmp_path)
    assert [i.item_id for i in items] == ["a"] and len(ignored) == 2
    said = _ignored("visual.items", ignored)
    assert said.startswith("visual.items: 2 file(s) ignored: 1 .heic (e.g. IMG_0001.HEIC), 1 .heif")
    assert advice in said
    assert "HEIF plugin" not in _ignored("visual.items", [tmp_path / "notes.txt"])
    assert "HEIF plugin" not in _ignored("audio.items", ignored)  # an audio folder: no advice
    # a HEIC given to the embedding API (no suffix to go by: told by its ftyp box's brand)
    heic = b"\x00\x00\x00\x18ftypheic" + bytes(64)
    with pytest.raises(DataError, match=r"It is a HEIC/HEIF image, read with a HEIF plugin"):
        load_image(heic, None)
    with pytest.raises(DataError) as other:
        load_image(b"\x00\x00\x00\x18ftypavif" + bytes(64), None)
    assert "HEIF" not in str(other.value)
    with pytest.raises(UnreadableFile, match=r"x\.heic: not a readable image .* HEIF plugin"):
        (tmp_path / "x.heic").write_bytes(b"junk")
        load_image(tmp_path / "x.heic", None)


@pytest.mark.skipif(images.heif_plugin() is None, reason="no HEIF plugin (the heif extra)")
def test_a_corrupt_heic_where_a_plugin_is_installed_is_a_bad_item_without_advice(
    tmp_path: Path,
) -> None:
    broken = b"\x00\x00\x00\x18ftypheic" + bytes(64)
    (tmp_path / "x.heic").write_bytes(broken)
    with pytest.raises(UnreadableFile, match=r"x\.heic: not a readable image") as e:
        load_image(tmp_path / "x.heic", None)
    with pytest.raises(DataError, match=r"not a readable image") as given:
        load_image(broken, None)
    assert "plugin" not in str(e.value) + str(given.value)


def test_digits_of_other_kinds_sort_without_failing(tmp_path: Path) -> None:
    """A superscript digit is no number: Ducho's sort key gave it to int(), whose ValueError
    ended the listing of the whole folder. Decimal digits of any script are numbers."""
    for name in ["1\u00b22.jpg", "2.jpg", "\u0661\u0660.jpg"]:  # 1²2; ten in Arabic-Indic
        write_image(tmp_path / name)
    items = list_images(tmp_path).items
    assert [i.item_id for i in items] == ["1\u00b22", "2", "\u0661\u0660"]


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
    for path, said in ((truncated, "not a readable image"), (fake, "not a readable image")):
        with pytest.raises(UnreadableFile, match=said) as caught:
            load_image(path, None)
        assert caught.value.stamp == FileStamp.of(path)  # recorded, so not read again
    with pytest.raises(UnreadableFile, match=r"empty.png: the file is empty \(0 bytes\)") as caught:
        load_image(empty, None)
    assert caught.value.stamp == FileStamp.of(empty)
    with pytest.raises(DataError, match=r"file not found"):
        load_image(tmp_path / "missing.jpg", None)


def test_file_objects_decode_and_fail_as_plain_data_errors() -> None:
    """Callers of the runtime may pass an open file or bytes in memory, as Pillow allows: they
    have no stamp, so they are never recorded as unreadable."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 8, 3), 7, np.uint8)).save(buffer, "PNG")
    buffer.seek(0)
    assert load_image(buffer, None).shape == (6, 8, 3)
    with pytest.raises(DataError, match=r"not a readable image") as caught:
        load_image(io.BytesIO(b"<html>"), None)
    assert not isinstance(caught.value, UnreadableFile)


def test_the_bytes_of_an_image_file_decode_as_the_file_does(tmp_path: Path) -> None:
    """A web service holds an upload's bytes; they are its content, not a file name."""
    path = write_image(tmp_path / "a.jpg", size=(40, 30))
    data = path.read_bytes()
    for content in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(load_image(content, (16, 16)), load_image(path, (16, 16)))
    with pytest.raises(DataError, match=r"^6 bytes in memory: not a readable image") as caught:
        load_image(b"<html>", None)
    assert "BytesIO" not in str(caught.value)  # not the repr of the buffer Pillow read


@pytest.mark.parametrize(
    ("source", "says"),
    [
        (None, r"an image input must be a file path, .* found NoneType"),
        (7, r"found int"),
        ({"path": "a.jpg"}, r"found dict"),
        (np.zeros((0, 32, 3), np.uint8), r"an image array of shape \(0, 32, 3\) is empty"),
        (np.zeros((32, 0), np.uint8), r"is empty"),
        ("", r"^an empty path: file not found"),
        ("x" * 5000 + ".jpg", r"^x{200}\.\.\. \(5004 characters\): not a readable image"),
    ],
)
def test_what_is_not_an_image_is_named_as_such(source: object, says: str) -> None:
    with pytest.raises(DataError, match=says) as caught:
        load_image(source, (8, 8))  # type: ignore[arg-type]
    assert len(str(caught.value)) < 600  # a 5000-character name is cut, not repeated


def test_a_failed_read_of_the_disk_is_not_an_unreadable_file(tmp_path, monkeypatch) -> None:
    """An OSError with an errno (EIO of a disk, a network file system) may pass next time:
    a plain DataError, which no run records as unreadable."""
    path = write_image(tmp_path / "good.jpg")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Image, "open", fail)
    with pytest.raises(DataError, match=r"good.jpg: not a readable image \(OSError") as caught:
        load_image(path, None)
    assert not isinstance(caught.value, UnreadableFile)


def test_listed_files_are_light_paths_that_open_and_travel(tmp_path: Path) -> None:
    # A job holds one item per file: its input is a path string with __fspath__ (48 bytes),
    # not a pathlib.Path (about 260 with its parts); it opens, stats and pickles as a path.
    write_image(tmp_path / "b.jpg")
    (tmp_path / "sub").mkdir()  # a folder is no item (it is counted), a dangling link is one
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    items, ignored, folders = list_images(tmp_path)
    assert [i.item_id for i in items] == ["b", "gone"] and ignored == []
    assert folders == [tmp_path / "sub"]
    raw = items[0].raw
    assert os.fspath(raw) == str(raw) == items[0].origin == str(tmp_path / "b.jpg")
    assert sys.getsizeof(raw) <= 64 and not hasattr(raw, "__dict__")
    assert os.stat(raw).st_size == (tmp_path / "b.jpg").stat().st_size
    assert pickle.loads(pickle.dumps(items[0])) == items[0]  # to decoder processes, Ray
    assert load_image(raw, (8, 8)).shape == (8, 8, 3)
    with pytest.raises(DataError, match=r"gone\.jpg: does not exist: it is a symbolic link"):
        load_image(items[1].raw, (8, 8))


def test_what_is_no_regular_file_is_listed_then_refused_unread(tmp_path: Path) -> None:
    """A named pipe named like an image is an item that fails, not one skipped in silence,
    and its reader never opens it (opening a pipe waits for a writer); nor a link to a
    folder. A folder holding only such an entry passes the check before the run: the run
    reports it."""
    write_image(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "dir.jpg").symlink_to(tmp_path / "sub", target_is_directory=True)
    items, ignored, folders = list_images(tmp_path)
    assert [i.item_id for i in items] == ["a", "dir", "pipe"] and ignored == []
    assert folders == [tmp_path / "sub"]
    with pytest.raises(DataError, match=r"dir\.jpg: not a regular file but a folder, which is"):
        load_image(items[1].raw, (8, 8))
    with pytest.raises(DataError, match=r"pipe\.jpg: not a regular file but a named pipe"):
        FileStamp.of_input(items[2].origin, items[2].raw)  # what the reader checks first
    only = tmp_path / "only"
    only.mkdir()
    os.mkfifo(only / "pipe.jpg")
    check_files(only, IMAGE_SUFFIXES, "image")


def test_links_that_loop_or_lead_nowhere_are_items_that_say_so(tmp_path: Path) -> None:
    """A file that links to itself, or to a file since removed, is an item that fails with
    what the link does (it said "Too many levels of symbolic links", or "file not found"); a
    folder given as such a link says the same."""
    write_image(tmp_path / "a.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "removed.jpg")
    items, _, _ = list_images(tmp_path)
    assert [i.item_id for i in items] == ["a", "gone", "loop"]
    with pytest.raises(
        DataError, match=r"gone\.jpg: does not exist: it is a symbolic link to .*removed\.jpg, "
    ):
        load_image(items[1].raw, (8, 8))
    with pytest.raises(DataError, match=r"loop\.jpg: cannot be reached: a symbolic link on it"):
        load_image(items[2].raw, (8, 8))
    with pytest.raises(DataError, match=r"missing\.jpg: file not found\."):
        load_image(tmp_path / "missing.jpg", (8, 8))  # no link: as before
    (tmp_path / "folder").symlink_to(tmp_path / "folder")
    with pytest.raises(DataError, match=r"folder/x\.jpg: cannot be reached: a symbolic link"):
        load_image(tmp_path / "folder" / "x.jpg", (8, 8))  # the loop above the file
    for look in (list_images, lambda f: check_files(f, IMAGE_SUFFIXES, "image")):
        with pytest.raises(
            DataError, match=r"image folder .*folder cannot be reached: a symbolic link on it "
        ):
            look(tmp_path / "folder")
        with pytest.raises(DataError, match=r"image folder .*x does not exist \(check"):
            look(tmp_path / "x")


def test_unsafe_and_duplicate_ids_are_reported_not_written(tmp_path: Path) -> None:
    for name in ["a.jpg", "a.png", "b.jpg"]:
        write_image(tmp_path / name)
    items, _, _ = list_images(tmp_path)
    checked = check_ids(items, [])
    assert [i.item_id for i in checked.good] == ["a", "b"]
    assert "duplicate id" in checked.bad[0].reason


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(DataError, match=r"image folder .*nope does not exist"):
        check_files(tmp_path / "nope", IMAGE_SUFFIXES, "image")


def test_check_refuses_a_folder_with_no_image_files(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(DataError, match=r"images holds nothing to extract: it has no files\."):
        check_files(folder, IMAGE_SUFFIXES, "image")
    for name in ("shoes", "hats"):  # images sorted into subfolders: say why none is read
        (folder / name).mkdir()
        write_image(folder / name / "a.jpg")
    with pytest.raises(
        DataError,
        match=r"it has no files; its 2 subfolder\(s\) \(hats, shoes\) are not read: point "
        r"'input_path' at the folder that holds the files",
    ):
        check_files(folder, IMAGE_SUFFIXES, "image")
    for name in ("shoes", "hats"):
        (folder / name / "a.jpg").unlink()
        (folder / name).rmdir()
    (folder / "sub.jpg").mkdir()  # a folder is not an image file
    for i in (10, 2, 1, 3):
        (folder / f"notes{i}.txt").write_text("x")
    with pytest.raises(
        DataError,
        match=r"its 4 file\(s\) \(notes1\.txt, notes2\.txt, notes3\.txt, \.\.\.\) are not "
        r"image files of a format read; .* Image files end in \.avif, \.bmp, ",
    ):
        check_files(folder, IMAGE_SUFFIXES, "image")
    write_image(folder / "._a.jpg")
    with pytest.raises(DataError, match=r"its 5 file\(s\) .* \(hidden ones, named '\.…', are not"):
        check_files(folder, IMAGE_SUFFIXES, "image")
    write_image(folder / "a.JPG")
    check_files(folder, IMAGE_SUFFIXES, "image")
    check_files(folder / "a.JPG", IMAGE_SUFFIXES, "image")  # one file as the input


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    array = load_image(tmp_path / "g16.png", None)
    expected = np.rint(wide / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(array[..., 0], expected)
    assert array[..., 0].min() == 0 and array[..., 0].max() == 255  # Pillow alone: all 255


def exif_rotated(path: Path) -> Path:
    """A 40 x 20 JPEG whose EXIF says: rotate 90 degrees clockwise to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(path, size=(40, 20))
    Image.open(path).save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_applied_or_ignored(tmp_path: Path) -> None:
    path = exif_rotated(tmp_path / "phone.jpg")
    applied = prepare_image(path, {}, InputOptions(exif_orientation="apply"))
    ignored = prepare_image(path, {}, InputOptions(exif_orientation="ignore"))
    assert applied.shape == (40, 20, 3) and ignored.shape == (20, 40, 3)
    np.testing.assert_array_equal(applied, np.rot90(ignored, k=-1))


@pytest.mark.parametrize("orientation", [None, 1, 0, 9])
def test_an_upright_image_is_not_copied_to_apply_its_orientation(
    tmp_path: Path, monkeypatch, orientation
) -> None:
    """Pillow's exif_transpose copies the pixels of an image it leaves as it is: a cost on
    every photo that the decoding threads pay beside the model."""
    path = write_image(tmp_path / "upright.jpg", size=(40, 20))
    if orientation is not None:  # 0 and 9 are no orientation: the pixels as stored
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.open(path).save(path, exif=exif.tobytes())
    copies: list[Image.Image] = []
    copy = Image.Image.copy

    def counted(self: Image.Image) -> Image.Image:
        copies.append(self)
        return copy(self)

    monkeypatch.setattr(Image.Image, "copy", counted)
    applied = np.asarray(decode_image(path, InputOptions(exif_orientation="apply")))
    ignored = np.asarray(decode_image(path, InputOptions(exif_orientation="ignore")))
    assert copies == []
    np.testing.assert_array_equal(applied, ignored)
    assert applied.shape == (20, 40, 3)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_turning_orientation_is_applied_as_pillow_applies_it(
    tmp_path: Path, orientation: int
) -> None:
    path = write_image(tmp_path / "turned.jpg", size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.open(path).save(path, exif=exif.tobytes())
    applied = np.asarray(decode_image(path, InputOptions(exif_orientation="apply")))
    expected = ImageOps.exif_transpose(Image.open(path))
    np.testing.assert_array_equal(applied, np.asarray(expected))
    assert applied.shape == ((40, 20, 3) if orientation >= 5 else (20, 40, 3))


def photo(path: Path, size: tuple[int, int]) -> Path:
    """A JPEG of smooth ramps, as photos are mostly smooth: what reduced decoding is for."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    pixels = np.stack([xx / size[0] * 255, yy / size[1] * 255, (xx + yy) % 256], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    return path


def test_reduced_jpeg_decoding_keeps_both_sides_at_least_the_models(tmp_path: Path) -> None:
    """libjpeg's largest scale (1/2, 1/4, 1/8) that leaves both sides >= the edge; the pixels
    resized from there are near the full decoding's, not equal to them."""
    path = photo(tmp_path / "photo.jpg", (1000, 800))
    assert decode_image(path).size == (1000, 800)
    assert decode_image(path, None, 224).size == (500, 400)  # 800 // 224 = 3: 1/2
    assert decode_image(path, None, 100).size == (125, 100)  # 1/8
    assert decode_image(path, None, 500).size == (1000, 800)  # 800 // 500 = 1: full
    pre = {"resize": [224, 224]}
    full = finish_image(decode_image(path), pre).astype(np.int16)
    reduced = finish_image(decode_image(path, None, 224), pre).astype(np.int16)
    assert reduced.shape == full.shape == (224, 224, 3)
    assert 0 < np.abs(full - reduced).mean() < 1.0


def test_reduced_decoding_leaves_other_formats_and_small_jpegs_as_they_are(tmp_path: Path) -> None:
    png = photo(tmp_path / "photo.png", (1000, 800))
    small = photo(tmp_path / "small.jpg", (440, 300))
    for path in (png, small):
        np.testing.assert_array_equal(
            np.asarray(decode_image(path, None, 224)), np.asarray(decode_image(path))
        )


def test_reduced_decoding_of_a_rotated_photo_keeps_the_short_side(tmp_path: Path) -> None:
    path = photo(tmp_path / "phone.jpg", (1000, 500))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored width is the shown height
    Image.open(path).save(path, exif=exif.tobytes(), quality=95)
    assert decode_image(path, None, 240).size == (250, 500)  # 500 // 240 = 2: 1/2, then turned
    assert decode_image(path, InputOptions(exif_orientation="ignore"), 240).size == (500, 250)


def test_the_draft_edge_covers_the_models_resize_either_way_up() -> None:
    assert draft_edge({"resize": [224, 300]}) == 300
    assert draft_edge({"resize_shortest_edge": 256, "crop": [224, 224]}) == 256
    assert draft_edge({"crop": [224, 224]}) is None
    assert draft_edge({}) is None


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    path = write_image(tmp_path / "big.png", size=(40, 30))
    # Recorded as unreadable: it stays over the limit while it and the limit are the same.
    with pytest.raises(UnreadableFile, match=r"40 x 30 = 1200 pixels, over the limit of 1000"):
        prepare_image(path, {}, InputOptions(max_image_pixels=1000))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 400 M pixels in a small file
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(UnreadableFile, match=r"over the limit|decompression bomb"):
        prepare_image(bomb, {"resize": (8, 8)})
    with pytest.raises(UnreadableFile, match=r"Pillow refuses images this large"):
        prepare_image(bomb, {"resize": (8, 8)}, InputOptions(max_image_pixels=10**9))


def test_pillows_bomb_warning_is_not_shown_beside_the_limit_error(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    big = tmp_path / "big.png"
    Image.new("1", (10_000, 9_500)).save(big)  # over Pillow's warning limit, under its error
    with pytest.raises(UnreadableFile, match=r"95000000 pixels, over the limit of 89478485"):
        prepare_image(big, {"resize": (8, 8)})
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def _broken_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block names a tag beyond its end: Pillow warns reading it."""
    ifd = b"\x01\x00" + (270).to_bytes(2, "little") + b"\x02\x00" + (100).to_bytes(4, "little")
    tiff = b"II*\x00\x08\x00\x00\x00" + ifd + (1000).to_bytes(4, "little") + bytes(4)
    Image.new("RGB", (16, 16), "gray").save(path, exif=b"Exif\x00\x00" + tiff)
    return path


def test_a_warning_per_file_is_shown_once_not_for_every_image(tmp_path: Path) -> None:
    # Decoding once reset the record of warnings already shown (warnings.catch_warnings around
    # each image), so a library's warning for a broken EXIF block came back for every image.
    paths = [_broken_exif_jpeg(tmp_path / f"{i}.jpg") for i in range(6)]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # Python's own: each warning once per place
        prepare_image(paths[0], {"resize": (8, 8)})
        first = len(shown)
        for path in paths[1:]:
            prepare_image(path, {"resize": (8, 8)})
    assert first > 0 and "Skipping tag 270" in str(shown[0].message)
    assert len(shown) == first


def test_decoding_in_threads_leaves_the_warning_filters_alone(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.jpg", size=(64, 48)) for i in range(32)]
    with warnings.catch_warnings():
        prepare_image(paths[0], {"resize": (8, 8)})  # adds Pillow's bomb filter once
        before = list(warnings.filters)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: prepare_image(p, {"resize": (8, 8)}), paths))
        assert warnings.filters == before


def test_huge_genuine_image_decodes(tmp_path: Path) -> None:
    path = write_image(tmp_path / "huge.jpg", size=(6000, 4000))
    assert prepare_image(path, {"resize": (32, 32)}).shape == (32, 32, 3)


def test_unreadable_file_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    # Simulated: tests run as root here, and root reads files whatever their mode.
    from ducho_fast.data.visual import images

    path = write_image(tmp_path / "locked.png")

    def denied(source: Path) -> Image.Image:
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(images.Image, "open", denied)
    with pytest.raises(DataError, match=r"locked.png: permission denied"):
        prepare_image(path, {})


def test_an_unlistable_folder_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    import os

    def denied(path: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "scandir", denied)  # root lists any folder: simulate the denial
    monkeypatch.setattr(os, "listdir", denied)
    monkeypatch.setattr(Path, "iterdir", denied)  # Python 3.10's took os.listdir at import
    for listing in (
        lambda: list_images(tmp_path),
        lambda: check_files(tmp_path, IMAGE_SUFFIXES, "image"),
    ):
        with pytest.raises(
            DataError, match=r"image folder .* cannot be listed \(Permission denied\)"
        ):
            listing()


def test_the_readme_lists_the_suffixes_that_are_read() -> None:
    from ducho_fast.data.audio.audio import AUDIO_SUFFIXES, FFMPEG_SUFFIXES

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    read = (
        ("Images", IMAGE_SUFFIXES | images.HEIF_SUFFIXES),
        ("Audio", AUDIO_SUFFIXES | FFMPEG_SUFFIXES),
    )
    for label, suffixes in read:
        start = readme.index(f"{label}: `.")
        listed = readme[
            start : readme.index("\n  Audio: " if label == "Images" else " (what", start)
        ]
        assert set(re.findall(r"`(\.\w+)`", listed)) == suffixes, label
