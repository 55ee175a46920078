"""Audio reading: down-mix, a real resampler, crops and every bad file as a clear DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ducho_fast.config.model import InputOptions
from ducho_fast.data.audio.audio import list_audio, prepare_audio
from ducho_fast.data.items import FileStamp
from ducho_fast.errors import DataError, UnreadableFile
from tests.conftest import write_tone

PRE = {"sample_rate": 16000}


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_resampled_tone_keeps_its_frequency_and_level(tmp_path: Path, rate: int) -> None:
    path = write_tone(tmp_path / "tone.wav", seconds=1.0, rate=rate, freq=1000.0)
    wave = prepare_audio(path, PRE)
    assert wave.dtype == np.float32 and abs(len(wave) - 16000) <= 1
    assert abs(peak_hz(wave, 16000) - 1000.0) <= 1.0
    middle = wave[2000:-2000]  # away from the filter's edges
    assert abs(np.sqrt(np.mean(middle**2)) - 0.4 / np.sqrt(2)) < 0.005


def test_a_tone_above_the_new_nyquist_is_filtered_not_aliased(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "high.wav", seconds=1.0, rate=44100, freq=12000.0)
    wave = prepare_audio(path, PRE)  # 12 kHz cannot exist at 16 kHz: linear interpolation
    assert np.sqrt(np.mean(wave[2000:-2000] ** 2)) < 0.01  # would alias it to 4 kHz


def test_stereo_is_the_mean_of_its_channels(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "stereo.flac", channels=2)
    wave = prepare_audio(path, PRE)
    both, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_allclose(wave, both.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "subtype"), [("u8.wav", "PCM_U8"), ("s16.wav", "PCM_16"), ("s24.flac", "PCM_24")]
)
def test_integer_formats_read_as_float(tmp_path: Path, name: str, subtype: str) -> None:
    wave = prepare_audio(write_tone(tmp_path / name, subtype=subtype), PRE)
    reference = prepare_audio(write_tone(tmp_path / "f.wav", subtype="FLOAT"), PRE)
    np.testing.assert_allclose(wave, reference, atol=1.5 / 128)


def test_ogg_and_silence(tmp_path: Path) -> None:
    assert len(prepare_audio(write_tone(tmp_path / "a.ogg", rate=22050), PRE)) == 8000
    sf.write(str(tmp_path / "quiet.wav"), np.zeros(4000, np.float32), 16000)
    assert not prepare_audio(tmp_path / "quiet.wav", PRE).any()


def test_bad_files_are_data_errors(tmp_path: Path) -> None:
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "fake.mp3").write_text("not audio")
    good = write_tone(tmp_path / "good.wav").read_bytes()
    (tmp_path / "cut.flac").write_bytes(write_tone(tmp_path / "x.flac").read_bytes()[:60])
    assert good
    with pytest.raises(DataError, match=r"empty.wav: the audio is empty"):
        prepare_audio(tmp_path / "empty.wav", PRE)
    for name in ("fake.mp3", "cut.flac"):
        with pytest.raises(UnreadableFile, match=rf"{name}: not a readable audio file") as caught:
            prepare_audio(tmp_path / name, PRE)
        assert caught.value.stamp == FileStamp.of(tmp_path / name)
    with pytest.raises(UnreadableFile, match=r"zero.wav: the file is empty \(0 bytes\), as a co"):
        prepare_audio(tmp_path / "zero.wav", PRE)  # not "not readable", which says less


def test_a_system_error_of_libsndfile_is_not_an_unreadable_file(tmp_path, monkeypatch) -> None:
    path = write_tone(tmp_path / "good.wav")

    def fail(*args: object, **kwargs: object) -> None:
        raise sf.LibsndfileError(2, "Error opening: ")  # SF_ERR_SYSTEM: "System error."

    monkeypatch.setattr(sf, "info", fail)
    with pytest.raises(DataError, match=r"good.wav: not a readable audio file") as caught:
        prepare_audio(path, PRE)
    assert not isinstance(caught.value, UnreadableFile)
    with pytest.raises(DataError, match=r"file not found"):
        prepare_audio(tmp_path / "none.wav", PRE)


def test_long_audio_needs_a_crop(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "long.wav", seconds=3.0, rate=8000)
    with pytest.raises(UnreadableFile, match=r"3 s of audio, over input.max_audio_seconds \(2 s\)"):
        prepare_audio(path, PRE, InputOptions(max_audio_seconds=2))
    cropped = prepare_audio(path, {**PRE, "max_seconds": 1.5}, InputOptions(max_audio_seconds=2))
    assert len(cropped) == 24000


def test_too_short_for_the_model(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "blip.wav", seconds=0.001)
    with pytest.raises(DataError, match=r"16 samples at 16000 Hz is shorter than the model's"):
        prepare_audio(path, {**PRE, "min_samples": 400})


def test_opus_is_listed_and_read_at_its_own_rate(tmp_path: Path) -> None:
    """Ogg Opus (.opus), which libsndfile reads from 1.0.29: a tone keeps its pitch."""
    t = np.arange(48000) / 48000
    wave = (0.4 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    sf.write(str(tmp_path / "voice.opus"), wave, 48000, format="OGG", subtype="OPUS")
    (item,) = list_audio(tmp_path).items
    read = prepare_audio(item.raw, PRE)
    assert item.item_id == "voice" and abs(len(read) - 16000) <= 1
    assert abs(peak_hz(read, 16000) - 1000.0) <= 1.0


def test_listing_and_arrays(tmp_path: Path) -> None:
    for name in ("b10.wav", "b2.flac", "notes.txt"):
        (write_tone(tmp_path / name) if name != "notes.txt" else (tmp_path / name)).touch()
    items, ignored, _ = list_audio(tmp_path)
    assert [i.item_id for i in items] == ["b2", "b10"] and [p.name for p in ignored] == [
        "notes.txt"
    ]
    pcm = (np.sin(np.arange(800) / 5) * 20000).astype(np.int16)
    wave = prepare_audio(pcm, PRE)
    np.testing.assert_allclose(wave, pcm / 32768.0, atol=1e-6)


@pytest.mark.parametrize(
    ("source", "says"),
    [
        (None, r"an audio input must be a file path or a waveform array.* found NoneType"),
        (b"RIFF", r"found 4 bytes in memory"),
        ({"path": "a.wav"}, r"found dict"),
        ("", r"found an empty path"),
        (np.zeros(800, np.complex64), r"integer or float arrays.*\(800,\) \(complex64\)"),
        (np.zeros(800, bool), r"integer or float arrays"),
        (np.zeros((2, 2, 100), np.float32), r"found an array of shape \(2, 2, 100\)"),
        (np.zeros((2, 800), np.float32), r"more channels than samples.*array\.T"),
        (np.zeros(0, np.float32), r"^an array of shape \(0,\) \(float32\): the audio is empty"),
        (np.full(800, np.nan, np.float32), r"^an array of shape \(800,\) .*NaN or infinite"),
    ],
)
def test_what_is_not_a_waveform_is_named_as_such(source: object, says: str) -> None:
    with pytest.raises(DataError, match=says) as caught:
        prepare_audio(source, PRE)  # type: ignore[arg-type]
    assert "[" not in str(caught.value).split(":")[0]  # no array printed as its values


def test_a_path_too_long_for_the_system_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"^a{200}\.\.\. \(5000 characters\): "):
        prepare_audio("a" * 5000, PRE)


@pytest.mark.parametrize("rate", [0, -8000])
def test_a_waveform_rate_that_is_no_rate_is_a_data_error(rate: int) -> None:
    with pytest.raises(
        DataError, match=rf"an array of shape \(800,\) \(float32\): a sample rate of {rate} Hz"
    ):
        prepare_audio(np.zeros(800, np.float32), PRE, source_rate=rate)
