"""Audio throughput: ducho-fast extract vs the source model eager, clip by clip, vs bare ORT.

    python benchmarks/audio.py --n 48 --seconds 2,10 [--source transformers]

N generated clips (WAV and FLAC, mono and stereo, at 16, 22.05, 44.1 and 48 kHz, lengths drawn
from ``--seconds``), a base-size model with random weights (seed 0: no download) cut at
``--layer``: torchaudio's HUBERT_BASE (``--source torchaudio``, the default) or a transformers
``Wav2Vec2Model`` of wav2vec2-base's shape whose feature extractor normalizes each clip
(``--source transformers``); all on one device (``--device``: cpu, the default, or cuda), in
one process:
- ``torch``: what Ducho runs, one clip at a time: read the file, resample to 16 kHz with
  ``torchaudio.functional.resample``, then ``model.extract_features(clip,
  num_layers=layer)[0][-1]`` (torchaudio) or the whole model's
  ``hidden_states[layer]`` (transformers). Departures, each in torch's favour or neutral:
  ``torch.no_grad()`` (Ducho's call keeps autograd on); the file read with soundfile and
  averaged to mono as extract does (Ducho's ``torchaudio.load`` hands a stereo file's two
  channels to the model as a batch of two, twice the work and other features); for
  transformers, the clip normalized as its feature extractor says, as extract does (Ducho's
  loop skips it, so its features of a normalizing model are not the model's).
- ``extract``: ``ducho_fast.extract`` end to end (decode, mono, soxr resampling in reader
  threads; ONNX Runtime; one .npy of (1, frames, 768) per clip), each round into a new,
  empty output folder (``common.NewFolders``).
- ``bare``: the artifact's ORT session alone on the same clips decoded and resampled
  beforehand, in extract's batches (``batch_size`` consecutive clips, cut into those of one
  length: the generated lengths all differ, so one clip a batch), run as extract runs them
  (``runtime.concurrent_batches``). ``extract / bare`` is the pipeline efficiency.
The three run side by side in ``--repeats`` rounds, once each per round: items/s are each
system's median round, each ratio the median of the ratios within a round; seconds of audio
per second (x real time) beside them. Outputs are checked: every clip's features from extract
against the eager model on extract's own waveform (computed once, untimed), cosine >= 0.9999.
The summary also gives their least cosine against ``torch``'s features, both averaged over
time (``min_cosine_vs_torchaudio_resampling``): soxr and torchaudio resample differently, and
may give a clip one frame more or less. The pipeline efficiency is split into factors as in
``visual.py`` (``common.efficiency_factors``, and on the CPU ``common.cpu_factors``).
``--bf16`` (CPU only) adds ``extract_bf16`` and ``bare_bf16``: the model exported again with
``precision: bf16`` (run in bfloat16 by OpenVINO's CPU plugin for ONNX Runtime, where this CPU
has the math), end to end and alone, its features checked against the eager model on
extract's waveforms at the bf16 bound (cosine >= 0.999), its efficiency over its own bare
session. A refused bf16 export ends the run, saying why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BF16_MIN_COSINE,
    BF16_PAIRS,
    NewFolders,
    add_bf16_option,
    add_device_option,
    add_work_option,
    bare_sessions,
    check_bf16,
    check_device,
    cosines,
    cpu_factors,
    efficiency_factors,
    fresh_run,
    median_rates,
    paired,
    ratio_summary,
    recorded,
    report,
    rounded,
    rounds,
    said_warm_up,
    warm_up,
    work_folder,
)

BUNDLE = "HUBERT_BASE"
NAMES = {"torchaudio": BUNDLE, "transformers": "Wav2Vec2Model (wav2vec2-base's shape)"}
RATES = (16000, 22050, 44100, 48000)


def write_clips(folder: Path, n: int, seconds: tuple[float, float], seed: int) -> list[Path]:
    """Deterministic voice-like clips: a gliding fundamental with harmonics, syllable-like
    loudness and noise; WAV (16-bit) and FLAC alternately, every other pair stereo."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.wav"), *folder.glob("*.flac")]:  # a reused --work folder
        old.unlink()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rate = RATES[i % len(RATES)]
        length = round(float(rng.uniform(*seconds)) * rate)
        t = np.arange(length) / rate
        pitch = rng.uniform(90, 250) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 6))
        loud = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
        wave = 0.2 * loud * voice + rng.normal(0, 0.01, length)
        channels = 2 if (i // 2) % 2 else 1
        if channels == 2:
            wave = np.stack([wave, np.roll(wave, 7) * 0.8], axis=1)
        path = folder / f"{i:05d}.{'wav' if i % 2 == 0 else 'flac'}"
        sf.write(str(path), np.clip(wave, -1, 1).astype(np.float32), rate, subtype="PCM_16")
        paths.append(path)
    return paths


def seeded_model(work: Path, source: str) -> tuple[Any, dict[str, Any]]:
    """The source's base-size model with random weights (seed 0), saved for export, and its
    config entry: torchaudio's HUBERT_BASE, or a transformers ``Wav2Vec2Model`` of
    wav2vec2-base's shape whose feature extractor normalizes each clip (as
    facebook/wav2vec2-base-960h's does)."""
    from ducho_fast.exporters.compat import import_torch, import_torchaudio, import_transformers

    torch, torchaudio = import_torch(), import_torchaudio()  # before its submodules
    torch.manual_seed(0)
    if source == "transformers":
        transformers = import_transformers()
        folder = work / "models" / "wav2vec2_base_seed0"
        if not (folder / "config.json").exists():
            built = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).eval()
            built.save_pretrained(folder)
            transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(folder)
        model = transformers.Wav2Vec2Model.from_pretrained(folder).eval()
        return model, {"model_name": str(folder), "backend": "transformers"}
    from torchaudio.pipelines._wav2vec2 import utils

    bundle = getattr(torchaudio.pipelines, BUNDLE)
    model = utils._get_model(bundle._model_type, bundle._params).eval()
    path = work / "models" / "hubert_base_seed0.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model, {"model_name": BUNDLE, "backend": "torch", "weights": str(path)}


def forward(model: Any, clip: Any, layer: int, source: str) -> np.ndarray:
    """The layer's features of one (1, samples) clip, as Ducho asks each source for them:
    torchaudio's ``extract_features`` up to the layer, or the whole transformers model with
    ``output_hidden_states`` (its input normalized as the feature extractor says, as extract
    does; Ducho's loop feeds it unnormalized)."""
    if source == "transformers":
        normalized = (clip - clip.mean()) / (clip.var(unbiased=False) + 1e-7).sqrt()
        return model(normalized, output_hidden_states=True).hidden_states[layer].cpu().numpy()
    return model.extract_features(clip, num_layers=layer)[0][-1].cpu().numpy()


def torch_eager(
    model: Any, layer: int, source: str, paths: list[Path], device: str = "cpu"
) -> list[np.ndarray]:
    """Ducho's way, one clip at a time (see the module's docstring for the departures)."""
    import soundfile as sf

    from ducho_fast.exporters.compat import import_torch, import_torchaudio

    torch, torchaudio = import_torch(), import_torchaudio()
    out = []
    with torch.no_grad():
        for path in paths:
            wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
            clip = torch.from_numpy(wave.mean(axis=1, dtype=np.float32))[None]
            clip = torchaudio.functional.resample(clip, rate, 16000)
            out.append(forward(model, clip.to(device), layer, source))
    return out


def eager_on(
    model: Any, layer: int, source: str, waves: list[np.ndarray], device: str
) -> list[np.ndarray]:
    """The eager model on given 16 kHz waveforms: extract's own inputs, for the check."""
    from ducho_fast.exporters.compat import import_torch

    torch = import_torch()
    with torch.no_grad():
        return [forward(model, torch.from_numpy(w)[None].to(device), layer, source) for w in waves]


def write_config(
    work: Path, entry: dict[str, Any], layer: int, batch_size: int, device: str, suffix: str = ""
) -> tuple[Path, str]:
    """``work/audio<suffix>.yml``: the clips through ``entry`` to ``layer``, features into
    ``work/features<suffix>``."""
    import yaml

    config = {
        **fresh_run(work, device),
        "audio": {
            "items": {
                "input_path": "clips",
                "output_path": f"features{suffix}",
                "model": [{**entry, "output_layers": [layer], "batch_size": batch_size}],
            }
        },
    }
    path = work / f"audio{suffix}.yml"
    path.write_text(yaml.safe_dump(config))
    return path, "audio.items.output_path"


def extract_batches(artifact: Any, waves: list[np.ndarray], batch_size: int) -> list[Any]:
    """Extract's batches of the decoded clips (``Batcher.plan``: runs of ``batch_size``, cut
    into clips of one length), as graph inputs for ``common.bare_sessions``."""
    from ducho_fast.runtime.batcher import Batcher

    batcher = Batcher(artifact)
    plan = batcher.plan(waves, batch_size, 0)
    return [batcher.feeds([waves[i] for i in idx]) for idx in plan]


def least_cosine(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """The least cosine between each clip's features, all frames as one vector (clips differ
    in length, so each pair on its own; a pair of other shapes fails the check)."""
    return min(
        float(cosines(a.reshape(1, -1), b.reshape(1, -1))[0]) if a.shape == b.shape else -1.0
        for a, b in zip(ours, theirs, strict=True)
    )


def time_means(arrays: list[np.ndarray]) -> np.ndarray:
    return np.stack([a.reshape(-1, a.shape[-1]).mean(axis=0) for a in arrays])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=48, help="clips (default 48)")
    parser.add_argument(
        "--seconds", default="2,10", help="clip lengths drawn from MIN,MAX s (default 2,10)"
    )
    parser.add_argument("--layer", type=int, default=9, help="layer (default 9, of 12)")
    parser.add_argument(
        "--source",
        choices=tuple(NAMES),
        default="torchaudio",
        help="torchaudio's HUBERT_BASE (default) or a transformers Wav2Vec2Model",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    add_bf16_option(parser, "the model")
    add_work_option(parser)
    add_device_option(parser)
    args = parser.parse_args()
    low, high = (float(s) for s in args.seconds.split(","))
    if not 0.1 <= low <= high:
        parser.error("--seconds MIN,MAX needs 0.1 <= MIN <= MAX")
    check_device(args.device)
    if args.bf16:
        check_bf16(args.device)

    from ducho_fast import api
    from ducho_fast.artifact import find_artifact
    from ducho_fast.exporters.compat import import_torch
    from ducho_fast.runtime.cpu import cpu_quota
    from ducho_fast.runtime.embedder import Embedder

    work = work_folder(args.work, "ducho-bench-audio-")
    paths = write_clips(work / "clips", args.n, (low, high), args.seed)
    torch = import_torch()
    torch.set_num_threads(cpu_quota())
    model, entry = seeded_model(work, args.source)
    model = model.to(args.device)
    config, key = write_config(work, entry, args.layer, args.batch_size, args.device)
    api.export(config)
    cfg = api.as_config(config)
    artifact = find_artifact(cfg.store, cfg.graphs()[0])
    waves = [Embedder(artifact).prepare(p) for p in paths]
    audio_seconds = sum(len(w) for w in waves) / 16000
    print(
        f"{args.n} clips, {audio_seconds:.0f} s of audio ({low:g}-{high:g} s each), "
        f"{NAMES[args.source]} to layer {args.layer}, batch size {args.batch_size}, "
        f"on {args.device}, {cpu_quota()} CPUs, in {work}"
    )
    eager = partial(torch_eager, model, args.layer, args.source, device=args.device)
    eager(paths[:2])  # warm-up
    api.extract(config)  # warm-up
    reports: list[Any] = []
    extract = NewFolders(api.extract, config, key, "features")
    systems: dict[str, Callable[[], Any]] = {
        "torch": partial(eager, paths),
        "extract": recorded(extract, reports),
        "bare": bare_sessions(
            artifact, extract_batches(artifact, waves, args.batch_size), device=args.device
        ),
    }
    bf16_reports: list[Any] = []
    if args.bf16:
        bf16_config, _ = write_config(
            work, {**entry, "precision": "bf16"}, args.layer, args.batch_size, "cpu", "_bf16"
        )
        api.export(bf16_config)
        bf16_artifact = find_artifact(cfg.store, api.as_config(bf16_config).graphs()[0])
        api.extract(bf16_config)  # warm-up
        bf16_extract = NewFolders(api.extract, bf16_config, key, "features_bf16")
        systems["extract_bf16"] = recorded(bf16_extract, bf16_reports)
        systems["bare_bf16"] = bare_sessions(
            bf16_artifact, extract_batches(bf16_artifact, waves, args.batch_size)
        )
    cpu: dict[str, list[float]] = {}
    seconds, values = rounds(args.repeats, systems, cpu)
    result = values["extract"]
    assert result.failed == 0, result
    folder = next((work / str(extract.last)).rglob(f"{paths[0].stem}.npy")).parent
    ours = [np.load(folder / f"{p.stem}.npy") for p in paths]
    same_input = eager_on(model, args.layer, args.source, waves, args.device)
    cos = least_cosine(ours, same_input)
    cos_ducho = float(cosines(time_means(ours), time_means(values["torch"])).min())
    ok = cos >= 0.9999
    rates = median_rates(args.n, seconds)
    realtime = {k: v * audio_seconds / args.n for k, v in rates.items()}
    pairs = {"extract_vs_torch": ("extract", "torch"), "pipeline_efficiency": ("extract", "bare")}
    bf16: dict[str, Any] = {}
    if args.bf16:
        pairs |= BF16_PAIRS
        assert values["extract_bf16"].failed == 0, values["extract_bf16"]
        found = next((work / str(bf16_extract.last)).rglob(f"{paths[0].stem}.npy")).parent
        bf16_cos = least_cosine([np.load(found / f"{p.stem}.npy") for p in paths], same_input)
        ok = ok and bf16_cos >= BF16_MIN_COSINE
        bf16 = {
            "min_cosine_bf16_vs_torch_same_input": float(f"{bf16_cos:.7g}"),
            "bf16_efficiency_factors": efficiency_factors(
                bf16_reports, seconds["extract_bf16"], seconds["bare_bf16"]
            ),
        }
        print(f"bf16: {bf16}")
    ratios = {k: paired(seconds, *pair) for k, pair in pairs.items()}
    factors = efficiency_factors(reports, seconds["extract"], seconds["bare"])
    warm = warm_up(reports)
    print(
        "pipeline efficiency = bare_vs_model x model_busy x pipeline_share (medians): "
        + ", ".join(f"{k} {v:.3f}" for k, v in factors.items())
        + f"; {said_warm_up(warm)}"
    )
    summary: dict[str, Any] = {
        "benchmark": "audio",
        "n": args.n,
        "audio_seconds": round(audio_seconds, 1),
        "source": args.source,
        "layer": args.layer,
        "batch_size": args.batch_size,
        "rounds": args.repeats,
        "cpus": cpu_quota(),
        "device": args.device,
        "items_per_second": {k: round(v, 2) for k, v in rates.items()},
        "x_real_time": {k: round(v, 1) for k, v in realtime.items()},
        **ratio_summary(ratios),
        "efficiency_factors": factors,
        "warm_up_seconds": rounded(warm),
        "min_cosine_vs_torch_same_input": float(f"{cos:.7g}"),
        "min_cosine_vs_torchaudio_resampling": float(f"{cos_ducho:.7g}"),
        "outputs_agree": ok,
        **bf16,
    }
    if args.device == "cpu":  # on CUDA the model's work is not CPU time
        split = {
            k: cpu_factors(seconds[k], cpu[k], seconds[bare], cpu[bare], args.n)
            for k, bare in (("extract", "bare"), ("extract_bf16", "bare_bf16"))
            if k in systems
        }
        for k, f in split.items():
            print(
                f"{k}: pipeline efficiency = work x use (medians): work {f['work']:.3f} (CPU "
                f"per clip: bare session {f['bare_cpu_ms']:.1f} ms, {k} "
                f"{f['extract_cpu_ms']:.1f} ms), use {f['use']:.3f}"
            )
        summary["cpu_factors"] = split["extract"]
        if "extract_bf16" in split:
            summary["bf16_cpu_factors"] = split["extract_bf16"]
    print(
        f"features: min cosine {cos:.7f} against the eager model on extract's waveforms; "
        f"{cos_ducho:.7f} against torch's (torchaudio's resampling), averaged over time"
    )
    rows = [(k, v, f"({realtime[k]:.1f}x real time)") for k, v in rates.items()]
    print("\nclips/s:")
    report(rows, summary, ratios)
    if not ok:
        sys.exit("outputs disagree beyond the bounds; the ratios above are not comparable")


if __name__ == "__main__":
    main()
