"""Transformers audio models: parity with the eager model and its feature extractor, and
extraction of a folder of files of every rate and channel count, as Ducho keeps them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ducho_fast
from ducho_fast.config import load_config
from ducho_fast.data.audio.audio import prepare_audio
from ducho_fast.errors import ConfigError
from ducho_fast.exporters import export_model
from tests.conftest import audio_config, write_tone

pytestmark = pytest.mark.slow


def entry(model_dir: Path, **extra) -> dict:
    return {"model_name": str(model_dir), "backend": "transformers", **extra}


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_parity_per_frame_and_pooled(kind, tmp_path, store, request) -> None:
    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    for pooling, layers in ((None, [1, "last_hidden_state"]), ("mean", [2])):
        config = audio_config(
            tmp_path, entry(model_dir, output_layers=layers, pooling=pooling), store
        )
        (spec,) = load_config(config).models()
        (result,) = export_model(spec, store)
        manifest = result.artifact.manifest
        assert manifest["modality"] == "audio" and manifest["parity"]["passed"]
        for layer in manifest["parity"]["layers"].values():
            assert layer["min_cosine"] >= 0.9999 and layer["max_rel_diff"] <= 1e-4
        assert all(o["per_frame"] is (pooling is None) for o in manifest["outputs"])
        assert manifest["preprocessing"]["sample_rate"] == 16000


def test_folder_of_mixed_files_matches_the_eager_model(tmp_path, store, tiny_wav2vec2_dir) -> None:
    import torch

    from ducho_fast.exporters.compat import import_transformers

    folder = tmp_path / "audio"
    folder.mkdir()
    write_tone(folder / "a1.wav", seconds=0.5)
    write_tone(folder / "a2.flac", seconds=0.8, rate=44100, channels=2)
    write_tone(folder / "a3.wav", seconds=0.5, rate=8000, subtype="PCM_U8")
    write_tone(folder / "a4.ogg", seconds=0.5, freq=220.0)  # same length as a1: one batch
    config = audio_config(tmp_path, entry(tiny_wav2vec2_dir, output_layers=[1]), store)
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    assert report.failed == 0 and report.runs[0].result.written == 4

    transformers = import_transformers()
    model = transformers.Wav2Vec2Model.from_pretrained(tiny_wav2vec2_dir).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tiny_wav2vec2_dir)
    out = tmp_path / "out" / "transformers" / str(tiny_wav2vec2_dir).lstrip("/") / "1"
    for path in sorted(folder.iterdir()):
        wave = prepare_audio(path, {"sample_rate": 16000})
        with torch.no_grad():
            ref = (
                model(
                    **extractor(wave, sampling_rate=16000, return_tensors="pt"),
                    output_hidden_states=True,
                )
                .hidden_states[1][0]
                .numpy()
            )
        ours = np.load(out / f"{path.stem}.npy")
        assert ours.shape == (1, *ref.shape)  # Ducho keeps the time axis: (1, frames, D)
        np.testing.assert_allclose(ours[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_embed_takes_waveforms_listed_or_stacked(tmp_path, store, tiny_wav2vec2_dir) -> None:
    from ducho_fast.errors import DataError

    config = audio_config(
        tmp_path, entry(tiny_wav2vec2_dir, output_layers=[1], pooling="mean"), store
    )
    (result,) = ducho_fast.export(config)
    emb = ducho_fast.load(result.artifact.path)
    t = np.arange(8000, dtype=np.float32) / 16000
    waves = [np.sin(2 * np.pi * f * t).astype(np.float32) for f in (220.0, 440.0)]
    listed = emb.embed(waves)
    np.testing.assert_array_equal(emb.embed(np.stack(waves)), listed)
    stereo = np.stack([waves[0], waves[0]], axis=1)  # (samples, 2): its mean is waves[0]
    np.testing.assert_allclose(emb.embed([stereo])[0], listed[0], rtol=1e-5, atol=1e-6)
    alone = [
        (waves[0], r"shape \(8000,\) is not a stack of waveforms .* \[array\]"),
        (stereo, r"shape \(8000, 2\) looks like one clip, \(samples, channels\)"),
    ]
    for inputs, says in alone:
        with pytest.raises(DataError, match=says):
            emb.embed(inputs)
    with pytest.raises(DataError, match=r"^inputs\[1\]: a waveform of shape \(2, 8000\) has"):
        emb.embed([waves[0], stereo.T])  # (channels, samples), as torchaudio loads it

    # a waveform at another rate: resampled as a file at that rate is
    import soundfile as sf

    slow = waves[1][::2].copy()  # 440 Hz at 8 kHz
    sf.write(tmp_path / "slow.wav", slow, 8000, subtype="FLOAT")
    from_file = emb.embed([tmp_path / "slow.wav"])
    np.testing.assert_allclose(emb.embed([slow], sample_rate=8000), from_file, rtol=1e-6)
    assert not np.allclose(emb.embed([slow]), from_file, rtol=1e-3)  # taken as 16 kHz
    for rate in (0, 8000.0, True):
        with pytest.raises(DataError, match=r"sample_rate must be a whole number of Hz"):
            emb.embed([slow], sample_rate=rate)  # type: ignore[arg-type]


def test_audio_config_rules(tmp_path, store) -> None:
    torch_entry = {"model_name": "WAV2VEC2_BASE", "backend": "torch"}
    with pytest.raises(ConfigError, match=r"needs the key .*output_layers.*num_layers=12"):
        load_config(audio_config(tmp_path, torch_entry, store))
    hf_rate = {"model_name": "m", "sample_rate": 8000}
    with pytest.raises(ConfigError, match=r"sample_rate' must be >= 1 and is for torch audio"):
        load_config(audio_config(tmp_path, hf_rate, store))
    text = {
        "dataset_path": str(tmp_path),
        "textual": {
            "items": {
                "input_path": "t.tsv",
                "output_path": "o",
                "model": [{"model_name": "m", "pooling": "mean"}],
            }
        },
    }
    with pytest.raises(ConfigError, match=r"apply to audio models only"):
        load_config(text)
    bad = audio_config(tmp_path, {"model_name": "m", "max_seconds": 0}, store)
    with pytest.raises(ConfigError, match=r"max_seconds' must be > 0"):
        load_config(bad)


def test_bench_times_audio_clips_and_their_source_model(tmp_path, store, tiny_wav2vec2_dir) -> None:
    from ducho_fast.bench import bench

    folder = tmp_path / "audio"
    folder.mkdir()
    write_tone(folder / "a1.wav", seconds=0.5)
    write_tone(folder / "a2.flac", seconds=0.8, rate=44100, channels=2)  # another length
    (folder / "a3.wav").write_bytes(b"not audio")
    config = audio_config(
        tmp_path, entry(tiny_wav2vec2_dir, output_layers=[1], pooling="mean"), store
    )
    ducho_fast.export(config)
    (run,) = bench(config, items=5, repeats=1, work=tmp_path, source=True).runs
    assert (run.items, run.job_items, run.unreadable) == (2, 3, 1)
    assert run.source is not None and run.source.min_cosine > 0.9999
