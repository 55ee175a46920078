"""Audio reading: down-mix, a real resampler, crops and every bad file as a clear DataError."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ducho_fast.config.model import InputOptions
from ducho_fast.data.audio.audio import decode_audio, list_audio, prepare_audio, pyav_found
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


def write_ffmpeg(path: Path, wave: np.ndarray, rate: int, codec: str = "aac") -> Path:
    """``wave`` ((samples, channels), float32) encoded by FFmpeg through PyAV: AAC or ALAC
    in MP4 for an .m4a (ALAC takes 16-bit samples: lossless for a wave on that grid), raw
    AAC (ADTS) for an .aac."""
    import av

    layout = {1: "mono", 2: "stereo"}[wave.shape[1]]
    planar = "s16p" if codec == "alac" else "fltp"
    with av.open(str(path), "w", format="ipod" if path.suffix.lower() == ".m4a" else "adts") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        for start in range(0, len(wave), 1024):
            chunk = np.ascontiguousarray(wave[start : start + 1024].T)
            if planar == "s16p":
                chunk = np.round(chunk * 32768).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(chunk, format=planar, layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def chirp(seconds: float, rate: int, channels: int) -> np.ndarray:
    """A sweep from 200 Hz to 4 kHz per channel (the second one radian ahead), on
    the 16-bit grid: no two stretches alike, so a shifted decode does not pass as aligned."""
    t = np.arange(int(seconds * rate)) / rate
    sweep = [
        0.4 * np.sin(2 * np.pi * (200 * t + 1900 * t**2 / seconds) + k) for k in range(channels)
    ]
    return (np.round(np.stack(sweep, axis=1) * 32768) / 32768).astype(np.float32)


needs_pyav = pytest.mark.skipif(not pyav_found(), reason="no PyAV (the m4a extra)")


@needs_pyav
def test_m4a_and_aac_are_listed_and_decoded_by_ffmpeg(tmp_path: Path) -> None:
    """ALAC in .m4a is lossless: its samples are the wave's, channels in their order. AAC is
    lossy and follows the wave as FFmpeg decodes it: in .m4a from the first sample (the
    encoder's 1024 priming samples dropped, as the file says), in raw .aac after them (ADTS
    has nowhere to say so; FFmpeg's own command line gives the same)."""
    wave = chirp(1.0, 44100, channels=2)
    write_ffmpeg(tmp_path / "lossless.m4a", wave, 44100, codec="alac")
    write_ffmpeg(tmp_path / "song.M4A", wave, 44100)
    write_ffmpeg(tmp_path / "raw.aac", wave, 44100)
    items, ignored, _ = list_audio(tmp_path)
    assert [i.item_id for i in items] == ["lossless", "raw", "song"] and ignored == []
    exact, rate = decode_audio(tmp_path / "lossless.m4a", None)
    assert rate == 44100 and exact.dtype == np.float32
    np.testing.assert_array_equal(exact, wave)
    for name, priming in (("song.M4A", 0), ("raw.aac", 1024)):
        lossy, rate = decode_audio(tmp_path / name, None)
        assert rate == 44100 and lossy.shape[1] == 2
        assert lossy.shape[0] >= wave.shape[0] + priming
        for k in range(2):
            ours = lossy[priming + 1024 : priming + wave.shape[0] - 1024, k]
            assert np.corrcoef(ours, wave[1024:-1024, k])[0, 1] > 0.999, (name, k)
    mono = prepare_audio(tmp_path / "lossless.m4a", PRE)  # to the model's rate, mono
    np.testing.assert_array_equal(mono, prepare_audio(wave, PRE, source_rate=44100))


@needs_pyav
def test_m4a_crops_limits_and_bad_files_as_other_audio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ducho_fast.data.audio import audio

    wave = chirp(3.0, 8000, channels=1)
    path = write_ffmpeg(tmp_path / "long.m4a", wave, 8000, codec="alac")
    limit = InputOptions(max_audio_seconds=2)
    too_long = r"3 s of audio, over input.max_audio_seconds \(2 s\)"
    with monkeypatch.context() as undecoded:  # refused from its stated length, not decoded
        undecoded.setattr(audio, "_decoded", None)
        with pytest.raises(UnreadableFile, match=too_long):
            prepare_audio(path, PRE, limit)
    with monkeypatch.context() as unstated:  # a file that says nothing: refused once decoded
        unstated.setattr(audio, "_stated_seconds", lambda container: None)
        with pytest.raises(UnreadableFile, match=too_long):
            prepare_audio(path, PRE, limit)
    cropped, _ = decode_audio(path, 1.5, limit)
    np.testing.assert_array_equal(cropped, wave[:12000])
    (tmp_path / "fake.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(64))
    (tmp_path / "cut.m4a").write_bytes(path.read_bytes()[:100])
    for name in ("fake.m4a", "cut.m4a"):
        with pytest.raises(UnreadableFile, match=rf"{name}: not a readable audio file") as caught:
            prepare_audio(tmp_path / name, PRE)
        assert caught.value.stamp == FileStamp.of(tmp_path / name)
    with pytest.raises(DataError, match=r"none.m4a: file not found"):
        prepare_audio(tmp_path / "none.m4a", PRE)


def test_without_pyav_m4a_files_are_ignored_and_the_way_to_read_them_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ducho_fast.console import _ignored
    from ducho_fast.data.audio import audio
    from ducho_fast.data.visual.images import check_files

    monkeypatch.setattr(audio, "pyav_found", lambda: False)
    for name in ("a.m4a", "b.aac"):
        (tmp_path / name).write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(64))
    advice = ".m4a and .aac files are read with FFmpeg's decoders: pip install 'ducho-fast[m4a]'"
    with pytest.raises(DataError, match=r"\(a\.m4a, b\.aac\) are not audio files") as e:
        check_files(tmp_path, audio.audio_suffixes(), "audio")
    assert advice in str(e.value)
    write_tone(tmp_path / "c.wav")
    items, ignored, _ = list_audio(tmp_path)
    assert [i.item_id for i in items] == ["c"] and len(ignored) == 2
    said = _ignored("audio.items", ignored)
    assert said.startswith("audio.items: 2 file(s) ignored: 1 .m4a (e.g. a.m4a), 1 .aac") and (
        advice in said
    )
    assert "FFmpeg" not in _ignored("visual.items", ignored)  # an image folder: no advice
    with pytest.raises(DataError, match=rf"a\.m4a: {re.escape(advice)}"):
        prepare_audio(tmp_path / "a.m4a", PRE)  # given by path: said at once
