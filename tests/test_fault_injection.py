"""Fault injection: every kind of bad input mixed into good items, in one run per modality.

Every good item is extracted exactly as it is when the bad ones are absent, every bad item is
reported with its reason, and nothing is written outside the output folder.
"""

from __future__ import annotations

import csv
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import ducho_fast
from ducho_fast.api import ERRORS_FILE, ExtractReport
from ducho_fast.data.audio.audio import pyav_found
from ducho_fast.data.visual.images import heif_plugin
from tests.conftest import (
    audio_config,
    resnet18_entry,
    textual_config,
    visual_config,
    write_image,
    write_tone,
)
from tests.data.test_audio import chirp, write_ffmpeg
from tests.data.test_images import HEIC

pytestmark = pytest.mark.slow
# formats read with an extra package (the test extra has both): mixed in where installed
HEIF, PYAV = heif_plugin() is not None, pyav_found()

# file name -> what the errors file must say about it
BAD_IMAGES = {
    "zero.jpg": "the file is empty (0 bytes)",
    "cut.jpg": "not a readable image",
    "cutpng.png": "not a readable image",
    "fake.jpg": "not a readable image",
    "gone.jpg": "does not exist: it is a symbolic link to",
    "loop.jpg": "a symbolic link on it leads round in a loop",
    "bomb.png": "decompression bomb",
    "new\nline.jpg": "control characters",
    "good03.png": "duplicate id",
    "pipe.jpg": "not a regular file but a named pipe",  # a reader opening it would wait
    "piped.jpg": "not a regular file but a named pipe",  # a link to one outside the folder
    **({"halved.heic": "not a readable image"} if HEIF else {}),
}
ODD_BUT_GOOD = ["cmyk.jpg", "gray16.png", "gray.jpg", "rgba.png", "palette.png", "exif.jpg"]
ODD_BUT_GOOD += ["phone.heic"] if HEIF else []


def good_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(10):
        write_image(folder / f"good{i:02d}.jpg", size=(30 + 7 * i, 50 - 2 * i), seed=i)
    write_image(folder / "cmyk.jpg", mode="CMYK", seed=20)
    wide = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(wide).save(folder / "gray16.png")
    write_image(folder / "gray.jpg", mode="L", seed=21)
    write_image(folder / "rgba.png", mode="RGBA", seed=22)
    palette = Image.new("P", (30, 20), 3)
    palette.info["transparency"] = 3
    palette.save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    write_image(folder / "exif.jpg", size=(50, 20), seed=23)
    Image.open(folder / "exif.jpg").save(folder / "exif.jpg", exif=exif.tobytes())
    write_image(folder / "big.jpg", size=(3000, 2000), seed=24)
    if HEIF:  # a phone's photo, turned by its container
        (folder / "phone.heic").write_bytes((HEIC / "turned.heic").read_bytes())


def bad_images(folder: Path) -> None:
    good = (folder / "good01.jpg").read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    png = write_image(folder / "full.png", seed=30).read_bytes()
    (folder / "full.png").unlink()
    (folder / "cutpng.png").write_bytes(png[: len(png) - 40])
    (folder / "fake.jpg").write_text("<html>not an image</html>")
    (folder / "gone.jpg").symlink_to(folder / "deleted-after-listing.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png")
    write_image(folder / "new\nline.jpg", seed=31)
    write_image(folder / ".hidden.jpg", seed=32)  # ignored (its id would be empty), not failed
    write_image(folder / "._good01.jpg", seed=34)  # macOS's copy of good01.jpg's attributes
    write_image(folder / "good03.png", seed=33)
    (folder / "notes.txt").write_text("not an input")
    pipes(folder, "pipe.jpg", "piped.jpg")
    if HEIF:
        heic = (HEIC / "tile.heic").read_bytes()
        (folder / "halved.heic").write_bytes(heic[: len(heic) // 2])


def pipes(folder: Path, named: str, linked: str) -> None:
    """A named pipe in the input folder, and a link to one outside it."""
    os.mkfifo(folder / named)
    os.mkfifo(folder.parent / f"{linked}.target")
    (folder / linked).symlink_to(folder.parent / f"{linked}.target")


@contextmanager
def unblocked(root: Path, after: float = 30.0) -> Iterator[None]:
    """Where a reader opens a named pipe (a regression), it waits for a writer for good:
    after a while, open each pipe under ``root`` for writing and close it, so that the
    test fails on the reason given instead of hanging."""
    done = threading.Event()

    def release() -> None:
        if done.wait(after):
            return
        for path in root.rglob("*"):
            if stat.S_ISFIFO(path.lstat().st_mode):
                with suppress(OSError):  # ENXIO: no reader waits on it
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def errors(folder: Path) -> dict[str, str]:
    with (folder / ERRORS_FILE).open() as f:
        return {row["origin"]: row["reason"] for row in csv.DictReader(f, delimiter="\t")}


def files_outside(root: Path, inside: tuple[str, ...]) -> dict[str, float]:
    return {
        str(p): p.stat().st_mtime
        for p in root.rglob("*")
        if not p.is_symlink() and not any(part in inside for part in p.relative_to(root).parts)
    }


def extract_both(tmp_path: Path, clean: dict, messy: dict) -> ExtractReport:
    """Extract the clean and the messy dataset; nothing outside messy/out may change."""
    ducho_fast.export(clean)
    ducho_fast.extract(clean)
    before = files_outside(tmp_path / "messy", ("out",))
    with unblocked(tmp_path / "messy"):
        report = ducho_fast.extract(messy)
    assert files_outside(tmp_path / "messy", ("out",)) == before
    return report


def assert_reasons_by_file(reported: dict[str, str], bad: dict[str, str]) -> None:
    for name, reason in bad.items():
        shown = name.encode("unicode_escape").decode("ascii")  # as the errors file writes it
        origin = next(o for o in reported if o.endswith(shown))
        assert reason in reported[origin], (name, reported[origin])


def assert_same_features(tmp_path: Path, probe: str) -> list[str]:
    """The messy run's features equal the clean run's: the bad items changed nothing."""
    clean_dir = next((tmp_path / "clean" / "out").rglob(probe)).parent
    messy_dir = tmp_path / "messy" / clean_dir.relative_to(tmp_path / "clean")
    expected = sorted(p.name for p in clean_dir.glob("*.npy"))
    assert sorted(p.name for p in messy_dir.glob("*.npy")) == expected
    for name in expected:
        np.testing.assert_allclose(
            np.load(messy_dir / name), np.load(clean_dir / name), rtol=1e-5, atol=1e-6
        )
    return expected


def test_images(tmp_path: Path, store: Path, resnet18_state_dict: Path) -> None:
    good_images(tmp_path / "clean" / "images")
    shutil.copytree(tmp_path / "clean", tmp_path / "messy")
    bad_images(tmp_path / "messy" / "images")
    entry = resnet18_entry(resnet18_state_dict, batch_size=4)
    clean, messy = (visual_config(tmp_path / d, entry, store) for d in ("clean", "messy"))
    report = extract_both(tmp_path, clean, messy)

    reported = errors(tmp_path / "messy" / "out")
    assert_reasons_by_file(reported, BAD_IMAGES)
    assert len(reported) == len(BAD_IMAGES) and report.failed == len(BAD_IMAGES)
    ignored = sorted(p.name for files in report.ignored_files.values() for p in files)
    assert ignored == ["._good01.jpg", ".hidden.jpg", "notes.txt"]
    expected = assert_same_features(tmp_path, "good00.npy")
    assert len(expected) == 10 + len(ODD_BUT_GOOD) + 1
    assert (tmp_path / "messy/out/torch/resnet18/avgpool/good00.npy").is_file()
    outputs = [p for p in (tmp_path / "messy" / "out").rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(tmp_path / "messy" / "out") for p in outputs)


GOOD_TEXTS = [(f"p{i}", f"Product {i}: a {'very ' * i}useful thing.") for i in range(8)]
GOOD_TEXTS += [
    ("long", "word " * 100_000),  # truncated to the model's max length
    ("quoted", '"a tab\there, a newline\nthere, and ""quotes"""'),
    ("inch", '5" screen, plain quotes in an unquoted cell'),
]
BAD_TEXTS = {
    "empty": ("", "the text is empty"),
    "spaces": ("   \u3000 ", "the text is empty"),
    "nan": ("NaN", "missing-value marker"),
    "p1": ("a second row for p1", "duplicate id"),
    "../../escape": ("text", "path separator"),
    "a/b": ("text", "path separator"),
    "x" * 300: ("text", "exceed 255 bytes"),
    "nul\x00id": ("text", "control characters"),
    "extra": ("one\tcell too many", "the row has 3 cells, the header 2"),
}


def write_tsv(path: Path, rows: list[tuple[str, str]], latin1_row: bool = False) -> None:
    with path.open("wb") as f:
        f.write(b"item_id\tdescription\n")
        for item_id, text in rows:
            f.write(f"{item_id}\t{text}\n".encode())
        if latin1_row:
            f.write("latin1\tcaf\xe9 cr\xe8me\n".encode("latin-1"))
            f.write(b"short\n")


def test_texts(tmp_path: Path, store: Path, minilm_dir: Path) -> None:
    entry = {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1}
    for name in ("clean", "messy"):
        (tmp_path / name).mkdir()
    write_tsv(tmp_path / "clean" / "descriptions.tsv", GOOD_TEXTS)
    rows = GOOD_TEXTS[:4] + [(k, v[0]) for k, v in BAD_TEXTS.items()] + GOOD_TEXTS[4:]
    write_tsv(tmp_path / "messy" / "descriptions.tsv", rows, latin1_row=True)
    clean, messy = (
        textual_config(tmp_path / d, {**entry, "batch_size": 3}, store) for d in ("clean", "messy")
    )
    report = extract_both(tmp_path, clean, messy)

    with (tmp_path / "messy" / "out" / ERRORS_FILE).open() as f:
        reported = list(csv.DictReader(f, delimiter="\t"))
    reasons = {r["item_id"]: r["reason"] for r in reported}
    for item_id, (_, reason) in BAD_TEXTS.items():
        shown = item_id.encode("unicode_escape").decode("ascii")
        assert reason in reasons[shown], (item_id, reasons[shown])
    assert "not valid UTF-8" in reasons["latin1"] and "no text column" in reasons["short"]
    assert len(reported) == len(BAD_TEXTS) + 2 == report.failed
    assert len(assert_same_features(tmp_path, "p0.npy")) == len(GOOD_TEXTS)


BAD_AUDIO = {
    "empty.wav": "the audio is empty",
    "zero.wav": "the file is empty (0 bytes)",
    "fake.mp3": "not a readable audio file",
    "cut.flac": "not a readable audio file",
    "gone.wav": "does not exist: it is a symbolic link to",
    "loop.wav": "a symbolic link on it leads round in a loop",
    "long.wav": "over input.max_audio_seconds",
    "blip.wav": "shorter than the model's smallest input",
    "s1.x.wav": "duplicate id",
    "pipe.wav": "not a regular file but a named pipe",
    "piped.wav": "not a regular file but a named pipe",
    **(
        {"junk.m4a": "not a readable audio file", "short.m4a": "not a readable audio file"}
        if PYAV
        else {}
    ),
}


def good_audio(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(6):
        write_tone(folder / f"s{i}.wav", seconds=0.3 + 0.1 * (i % 3), freq=200.0 + 50 * i)
    write_tone(folder / "stereo.wav", seconds=0.4, channels=2)
    write_tone(folder / "u8.wav", seconds=0.4, subtype="PCM_U8")
    write_tone(folder / "odd_rate.wav", seconds=0.4, rate=22_050)
    write_tone(folder / "hi_rate.flac", seconds=0.4, rate=48_000)
    write_tone(folder / "vorbis.ogg", seconds=0.4)
    sf.write(str(folder / "silence.wav"), np.zeros(6400, np.float32), 16_000)
    if PYAV:
        write_ffmpeg(folder / "alac.m4a", chirp(0.4, 22_050, channels=2), 22_050, codec="alac")
        write_ffmpeg(folder / "aac.m4a", chirp(0.5, 44_100, channels=1), 44_100)


def bad_audio(folder: Path) -> None:
    sf.write(str(folder / "empty.wav"), np.zeros(0, np.float32), 16_000)
    (folder / "zero.wav").write_bytes(b"")
    (folder / "fake.mp3").write_text("ID3 but not really")
    (folder / "cut.flac").write_bytes(write_tone(folder / "cut.flac").read_bytes()[:60])
    (folder / "gone.wav").symlink_to(folder / "deleted.wav")
    (folder / "loop.wav").symlink_to(folder / "loop.wav")
    write_tone(folder / "long.wav", seconds=3.0, rate=8000)
    write_tone(folder / "blip.wav", seconds=0.001)
    write_tone(folder / "s1.x.wav")  # id s1 again; s1.wav sorts first and is kept
    pipes(folder, "pipe.wav", "piped.wav")
    if PYAV:
        (folder / "junk.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(64))
        aac = write_ffmpeg(folder / "short.m4a", chirp(0.5, 16_000, channels=1), 16_000)
        aac.write_bytes(aac.read_bytes()[:200])


def test_audio(tmp_path: Path, store: Path, tiny_wav2vec2_dir: Path) -> None:
    good_audio(tmp_path / "clean" / "audio")
    shutil.copytree(tmp_path / "clean", tmp_path / "messy")
    bad_audio(tmp_path / "messy" / "audio")
    model = {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers", "batch_size": 4}
    clean, messy = (audio_config(tmp_path / d, model, store) for d in ("clean", "messy"))
    messy["input"] = clean["input"] = {"max_audio_seconds": 2}
    report = extract_both(tmp_path, clean, messy)

    reported = errors(tmp_path / "messy" / "out")
    assert_reasons_by_file(reported, BAD_AUDIO)
    assert len(reported) == len(BAD_AUDIO) == report.failed
    assert len(assert_same_features(tmp_path, "s0.npy")) == 12 + 2 * PYAV
