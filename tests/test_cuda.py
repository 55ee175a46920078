"""On a real CUDA session: extract (texts, images, audio clips of several lengths) and the
embedding API give the CPU's features within the fp32 bounds, through I/O binding (pinned
staging, device buffers) and without it, and an fp16 export passes its parity check on the
GPU it is meant for.

Every test here is marked ``gpu`` and skips without a real CUDAExecutionProvider session (a
CPU-only onnxruntime, or onnxruntime-gpu without a usable GPU: ``ducho-fast doctor`` says
why). On a GPU machine with the ``gpu`` extra: ``pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.config.model import RuntimeOptions
from ducho_fast.doctor import cuda_runs
from ducho_fast.runtime.session import CUDA
from tests.conftest import (
    audio_config,
    resnet18_entry,
    textual_config,
    visual_config,
    within_fp32_bounds,
    write_tone,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not cuda_runs(), reason="no real CUDAExecutionProvider session on this machine"
    ),
]

RUNTIMES: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu"},
    "cuda": {"device": "cuda", "allow_fallback": False},  # I/O binding: on for CUDA
    "cuda_plain": {"device": "cuda", "allow_fallback": False, "io_binding": "off"},
}


def _extract_each_way(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` extracted on the CPU, on CUDA with I/O binding and without, each into its
    own output folder (the folder named as the runtime); each run's report."""
    reports = {}
    for name, runtime in RUNTIMES.items():
        run = {**config, "runtime": runtime}
        for modality in ("visual", "textual", "audio"):
            if modality in run:
                run[modality] = {"items": {**run[modality]["items"], "output_path": name}}
        reports[name] = ducho_fast.extract(run)
        assert reports[name].failed == 0
        expected = "CPUExecutionProvider" if name == "cpu" else CUDA
        assert [r.provider for r in reports[name].runs] == [expected]
    return reports


def _each_way_equals_cpu(tmp_path: Path, files: int) -> None:
    """The CUDA runs' features (with I/O binding and without) are the CPU run's ``files``
    features within the fp32 bounds."""
    cpu = sorted(tmp_path.joinpath("cpu").rglob("*.npy"))
    assert len(cpu) == files
    for name in ("cuda", "cuda_plain"):
        for file in cpu:
            twin = tmp_path / name / file.relative_to(tmp_path / "cpu")
            within_fp32_bounds(np.load(twin), np.load(file))


def test_text_on_cuda_equals_cpu(tmp_path: Path, store: Path, texts_tsv, minilm_dir) -> None:
    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    model = {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "batch_size": 4,  # several length buckets, so several shapes in the buffer pool
    }
    config = textual_config(tmp_path, model, store)
    ducho_fast.export(config)  # parity checked on CUDA here (device auto)
    _extract_each_way(config)
    tail = ("sentence_transformers", *minilm_dir.parts[1:], "1")
    cpu = sorted(tmp_path.joinpath("cpu", *tail).glob("*.npy"))
    assert len(cpu) == 11
    for name in ("cuda", "cuda_plain"):
        for file in cpu:
            within_fp32_bounds(np.load(tmp_path.joinpath(name, *tail, file.name)), np.load(file))


def test_images_on_cuda_equal_cpu(tmp_path: Path, store: Path, image_dir, resnet18_state_dict):
    (tmp_path / "images").symlink_to(image_dir)
    entry = resnet18_entry(resnet18_state_dict, batch_size=4)  # 10 images: batches 4, 4, 2
    config = visual_config(tmp_path, entry, store)
    ducho_fast.export(config)
    _extract_each_way(config)
    _each_way_equals_cpu(tmp_path, files=10)


def test_the_smaller_last_batch_of_images_runs_padded_on_cuda(
    tmp_path: Path, store: Path, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """One input shape for the whole run, so cuDNN's exhaustive search runs once (the
    features of the padded batch are checked against the CPU's above)."""
    from ducho_fast.runtime import embedder as embedder_module

    real = embedder_module.padded
    rows: list[int] = []

    def spy(feeds: dict[str, Any], count: int) -> dict[str, Any]:
        out = real(feeds, count)
        rows.append(len(next(iter(out.values()))))
        return out

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=4), store)
    ducho_fast.export(config)
    monkeypatch.setattr(embedder_module, "padded", spy)
    report = ducho_fast.extract({**config, "runtime": RUNTIMES["cuda"]})
    assert report.failed == 0 and sorted(rows) == [4, 4, 4]  # 10 images: 4, 4, and 2 padded


def test_audio_clips_of_several_lengths_on_cuda_equal_cpu(
    tmp_path: Path, store: Path, tiny_wav2vec2_dir: Path
) -> None:
    """Clips of three lengths, one of them stereo at another rate: each length is a batch of
    its own shape, so I/O binding's device buffers are made for several shapes and reused."""
    folder = tmp_path / "audio"
    folder.mkdir()
    for i, seconds in enumerate([0.5, 0.8, 0.5, 1.1, 0.8, 0.5, 1.1]):
        write_tone(folder / f"c{i}.wav", seconds=seconds, freq=200.0 + 50 * i)
    write_tone(folder / "stereo.flac", seconds=0.8, rate=44_100, channels=2)
    model = {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers", "batch_size": 4}
    config = audio_config(tmp_path, model, store)
    ducho_fast.export(config)
    _extract_each_way(config)
    _each_way_equals_cpu(tmp_path, files=8)


def test_embedding_api_on_cuda_pins_and_equals_cpu(tmp_path: Path, store: Path, minilm_dir):
    from ducho_fast.runtime.binding import cuda_pinning

    model = {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1}
    (result,) = ducho_fast.export(textual_config(tmp_path, model, store))
    texts = ["ok", "A waterproof jacket with taped seams.", "Great value. " * 30]
    options = RuntimeOptions(device="cuda", allow_fallback=False)
    cuda = ducho_fast.load(result.artifact.path, options)
    assert cuda.info.provider == CUDA
    # The CUDA runtime the provider loaded is found and pins memory, so staging buffers are
    # page-locked (on a machine with the runtime but no GPU, registering fails: unpinned).
    pin = cuda_pinning()
    assert pin is not None and pin(np.empty(256, np.float32))
    ours = cuda.embed(texts, batch_size=2)
    cpu = ducho_fast.load(result.artifact.path, RuntimeOptions(device="cpu")).embed(texts)
    assert isinstance(ours, np.ndarray) and isinstance(cpu, np.ndarray)
    within_fp32_bounds(ours, cpu)


def test_fp16_export_passes_parity_on_cuda_and_runs_there(
    tmp_path: Path, store: Path, minilm_dir
) -> None:
    texts = ["ok", "A waterproof jacket with taped seams.", "Great value. " * 30]
    vectors: dict[str, np.ndarray] = {}
    for precision in ("fp32", "fp16"):
        model = {
            "model_name": str(minilm_dir),
            "backend": "sentence_transformers",
            "output_layers": 1,
            "precision": precision,
        }
        (result,) = ducho_fast.export(textual_config(tmp_path, model, store))
        parity = result.artifact.manifest["parity"]
        assert parity["provider"] == CUDA  # checked where it is meant to run (device auto)
        assert (
            parity["passed"]
            and parity["layers"]["1"]["min_cosine"] >= parity["bounds"]["min_cosine"]
        )
        options = RuntimeOptions(device="cuda", allow_fallback=False)
        pooled = ducho_fast.load(result.artifact.path, options).embed(texts)
        assert isinstance(pooled, np.ndarray)
        vectors[precision] = pooled
    a, b = vectors["fp16"].astype(np.float64), vectors["fp32"].astype(np.float64)
    cosines = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosines.min() >= 0.999, cosines
