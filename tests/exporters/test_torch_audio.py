"""torchaudio pipeline bundles by Ducho's names, and custom PyTorch audio models.

No bundle weights ship in a PyPI package: the tests build each bundle's architecture (a
smaller variant through architecture_kwargs) with random weights, seed 0, and check the
export against Ducho v1's call, ``extract_features(waveform, num_layers=N)``, last tensor.
The download boundary (torch.hub) is mocked for ``weights: default``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import ducho_fast
from ducho_fast.cli import app
from ducho_fast.data.audio.audio import prepare_audio
from ducho_fast.errors import ExportError
from ducho_fast.exporters.compat import import_torch, import_torchaudio
from tests.conftest import audio_config, within_fp32_bounds, write_tone

pytestmark = pytest.mark.slow
torch = import_torch()
torchaudio = import_torchaudio()
SMALL = {"encoder_num_layers": 2}


def seeded_bundle(name: str, folder: Path, **kwargs: Any) -> tuple[Any, Path]:
    """The bundle's architecture (``kwargs`` override its parameters), seed 0, saved."""
    from torchaudio.pipelines._wav2vec2 import utils

    bundle = getattr(torchaudio.pipelines, name)
    torch.manual_seed(0)
    model = utils._get_model(bundle._model_type, {**bundle._params, **kwargs}).eval()
    path = folder / f"{name.lower()}.pth"
    torch.save(model.state_dict(), path)
    return model, path


def bundle_entry(name: str, weights: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model_name": name,
        "backend": "torch",
        "weights": str(weights),
        "output_layers": [1, 2],
        "architecture_kwargs": SMALL,
        **extra,
    }


def clips(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [
        write_tone(folder / "a.wav", seconds=0.45, rate=22050, freq=330.0),
        write_tone(folder / "b.flac", seconds=0.3, rate=44100, freq=550.0, channels=2),
        write_tone(folder / "c.wav", seconds=0.45, rate=16000, freq=770.0),
    ]


def eager_like_ducho(model: Any, waveform: np.ndarray, layer: int, normalize: bool) -> Any:
    x = torch.from_numpy(waveform)[None]
    if normalize:
        x = torch.nn.functional.layer_norm(x, x.shape)
    with torch.no_grad():
        return model.extract_features(x, num_layers=layer)[0][-1].numpy()


def test_a_bundle_parameter_it_does_not_have_is_named(tmp_path: Path, store: Path) -> None:
    clips(tmp_path / "audio")
    entry = {
        "model_name": "HUBERT_BASE",
        "backend": "torch",
        "weights": "none",
        "output_layers": [1],
        "architecture_kwargs": {**SMALL, "encoder_num_layer": 2},
    }
    with pytest.raises(
        ExportError,
        match=r"HUBERT_BASE cannot be built with architecture_kwargs .*'encoder_num_layer'.*"
        r"Check 'audio\.items\.model\.0\.architecture_kwargs'",
    ):
        ducho_fast.export(audio_config(tmp_path, entry, store))


@pytest.mark.parametrize(
    ("bundle", "extra"),
    [
        ("WAV2VEC2_BASE", {}),
        ("HUBERT_BASE", {}),
        ("WAVLM_BASE", {}),
        # normalizes the waveform first; a narrower encoder keeps the test quick
        ("WAV2VEC2_LARGE_LV60K", {"encoder_embed_dim": 256, "encoder_ff_interm_features": 512}),
    ],
)
def test_bundle_features_equal_ducho_extract_features(
    tmp_path: Path, store: Path, bundle: str, extra: dict[str, Any]
) -> None:
    files = clips(tmp_path / "audio")
    kwargs = {**SMALL, **extra}
    model, weights = seeded_bundle(bundle, tmp_path, **kwargs)
    entry = bundle_entry(bundle, weights, architecture_kwargs=kwargs, batch_size=2)
    config = audio_config(tmp_path, entry, store)
    artifact = ducho_fast.export(config)[0].artifact
    report = ducho_fast.extract(config)
    assert report.failed == 0 and report.runs[0].result.written == 3
    assert artifact.manifest["parity"]["passed"]
    normalize = getattr(torchaudio.pipelines, bundle)._normalize_waveform
    assert (artifact.manifest["preprocessing"]["normalize"] is not None) == normalize
    out = tmp_path / "out" / "torch" / bundle
    for path in files:
        waveform = prepare_audio(path, artifact.manifest["preprocessing"], None)
        for layer in (1, 2):
            saved = np.load(out / str(layer) / f"{path.stem}.npy")
            within_fp32_bounds(saved, eager_like_ducho(model, waveform, layer, normalize))


def test_default_weights_come_through_torch_hub(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the download boundary is mocked: where there is network, this is the real path."""
    from torchaudio.pipelines._wav2vec2 import utils

    model, weights = seeded_bundle("HUBERT_BASE", tmp_path, **SMALL)
    asked: list[str] = []

    def download(url: str, **_: Any) -> dict[str, Any]:
        asked.append(url)
        return torch.load(weights, weights_only=True)

    monkeypatch.setattr(utils, "load_state_dict_from_url", download)
    clips(tmp_path / "audio")
    entry = {**bundle_entry("HUBERT_BASE", weights, output_layers=[2]), "weights": "default"}
    config = audio_config(tmp_path, entry, store)
    artifact = ducho_fast.export(config)[0].artifact
    assert asked and asked[0].startswith("https://") and "hubert" in asked[0]
    assert artifact.manifest["source"]["weights"] == "default"
    ducho_fast.extract(config)
    saved = np.load(tmp_path / "out" / "torch" / "HUBERT_BASE" / "2" / "c.npy")
    waveform = prepare_audio(tmp_path / "audio" / "c.wav", artifact.manifest["preprocessing"])
    within_fp32_bounds(saved, eager_like_ducho(model, waveform, 2, False))


def test_offline_default_weights_say_what_to_do(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchaudio.pipelines._wav2vec2 import utils

    def offline(url: str, **_: Any) -> Any:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(utils, "load_state_dict_from_url", offline)
    entry = {**bundle_entry("WAV2VEC2_BASE", tmp_path), "weights": "default"}
    with pytest.raises(ExportError, match="use weights: none or a local state-dict file"):
        ducho_fast.export(audio_config(tmp_path, entry, store))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output_layers": [3]}, r"has no layer '3'"),
        ({"output_layers": [1, "encoder"]}, "mixes layer numbers and names"),
        ({"model_name": "HUBERT_BASS"}, r"Did you mean 'HUBERT_BASE'"),
        ({"sample_rate": 8000}, r"trained at 16000 Hz"),
        ({"weights": "imagenet"}, "take default, none or a state-dict file"),
    ],
)
def test_bundle_errors_name_the_key_and_the_fix(
    tmp_path: Path, store: Path, change: dict[str, Any], message: str
) -> None:
    entry = {**bundle_entry("HUBERT_BASE", tmp_path), "weights": "none", **change}
    with pytest.raises(ExportError, match=message):
        ducho_fast.export(audio_config(tmp_path, entry, store))


def test_layers_command_lists_bundle_layers() -> None:
    result = CliRunner().invoke(app, ["layers", "torch", "HUBERT_BASE"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(n) for n in range(1, 13)]


def _tiny_net(tmp_path: Path) -> tuple[Any, Path]:
    from tests.exporters.tiny_audio_net import TinyAudioNet

    torch.manual_seed(0)
    net = TinyAudioNet().eval()
    path = tmp_path / "tiny_audio_net.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_custom_state_dict_with_module_names(tmp_path: Path, store: Path) -> None:
    net, weights = _tiny_net(tmp_path)
    files = clips(tmp_path / "audio")
    entry = {
        "model_name": str(weights),
        "backend": "torch",
        "architecture": "tests.exporters.tiny_audio_net:TinyAudioNet",
        "trust": True,
        "output_layers": ["conv2", "head"],
        "sample_rate": 8000,
        "pooling": "max",
    }
    config = audio_config(tmp_path, entry, store)
    artifact = ducho_fast.export(config)[0].artifact
    assert artifact.manifest["preprocessing"]["sample_rate"] == 8000
    ducho_fast.extract(config)
    folder = next((tmp_path / "out" / "torch").rglob("head")).parent
    for path in files:
        waveform = prepare_audio(path, artifact.manifest["preprocessing"])
        assert abs(len(waveform) - 8000 * {"a": 0.45, "b": 0.3, "c": 0.45}[path.stem]) <= 1
        with torch.no_grad():
            head = net(torch.from_numpy(waveform)[None]).amax(dim=1).numpy()  # (1, D)
        within_fp32_bounds(np.load(folder / "head" / f"{path.stem}.npy"), head)
        # conv2 is (batch, channels, frames): 3-D outputs are pooled over axis 1 as frames
        assert np.load(folder / "conv2" / f"{path.stem}.npy").ndim == 2


def test_custom_torchscript_output(tmp_path: Path, store: Path) -> None:
    net, _ = _tiny_net(tmp_path)
    scripted = tmp_path / "net.pt"
    torch.jit.trace(net, torch.zeros(1, 4000)).save(str(scripted))
    clips(tmp_path / "audio")
    entry = {"model_name": str(scripted), "backend": "torch", "output_layers": ["output"]}
    config = audio_config(tmp_path, entry, store)
    ducho_fast.export(config)
    ducho_fast.extract(config)
    saved = np.load(next((tmp_path / "out").rglob("output/a.npy")))
    waveform = prepare_audio(tmp_path / "audio" / "a.wav", {"sample_rate": 16000})
    with torch.no_grad():
        within_fp32_bounds(saved, net(torch.from_numpy(waveform)[None]).numpy())
    assert saved.ndim == 3  # (1, frames, D): the time axis is kept, as Ducho does
