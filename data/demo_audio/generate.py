"""Generate the audio demo's inputs: six short tracks and a seeded HuBERT-style model.

No audio model weights ship in a PyPI package, so the demo builds torchaudio's HUBERT_BASE
architecture (4 of its 12 layers, to keep the demo quick) with random weights, seed 0, and
saves them as a state dict, the way a user points `weights:` at a local file. The tracks are
tones, chords, a chirp and noise at several sample rates and lengths, mono and stereo.

    python data/demo_audio/generate.py   (make demo-audio runs it)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).parent
TRACKS = HERE / "tracks"


def tracks() -> None:
    """The six tracks; one already there is left as it is, so a second `make demo-audio`
    resumes instead of embedding every track again (rewritten files count as changed)."""
    TRACKS.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)

    def write(name: str, samples: np.ndarray, rate: int) -> None:
        if not (TRACKS / name).exists():
            sf.write(TRACKS / name, samples, rate)

    def t(seconds: float, rate: int) -> np.ndarray:
        return np.arange(int(seconds * rate)) / rate

    x = t(2.0, 44100)
    write("T01.wav", 0.3 * np.sin(2 * np.pi * 440 * x), 44100)
    chord = sum(np.sin(2 * np.pi * f * x) for f in (261.6, 329.6, 392.0)) / 6
    write("T02.flac", np.stack([chord, 0.8 * chord], 1), 44100)
    y = t(1.5, 22050)
    write("T03.wav", 0.3 * np.sin(2 * np.pi * (200 + 900 * y) * y), 22050)
    z = t(1.0, 16000)
    write("T04.wav", 0.1 * rng.standard_normal(len(z)), 16000)
    beat = np.sin(2 * np.pi * 110 * z) * (np.sin(2 * np.pi * 4 * z) > 0)
    write("T05.ogg", 0.4 * beat, 16000)
    w = t(2.5, 48000)
    write("T06.wav", 0.2 * np.sin(2 * np.pi * 660 * w) * np.exp(-w), 48000)


def model(target: Path) -> None:
    if target.exists():  # seeded: the same weights each time
        return
    from ducho_fast.exporters.compat import import_torch, import_torchaudio

    torch = import_torch()
    torchaudio = import_torchaudio()
    from torchaudio.pipelines._wav2vec2 import utils

    bundle = torchaudio.pipelines.HUBERT_BASE
    torch.manual_seed(0)
    net = utils._get_model(bundle._model_type, {**bundle._params, "encoder_num_layers": 4})
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), target)


if __name__ == "__main__":
    tracks()
    model(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("local/demo/models/hubert_4.pth"))
    print(f"wrote {len(list(TRACKS.iterdir()))} tracks to {TRACKS}")
