"""export -> extract gives the files Ducho writes, equal to the source framework within fp32 bounds.

The reference here is computed the way Ducho computes it: one item at a time, PIL bicubic
resize, torchvision ToTensor/Normalize, create_feature_extractor, np.squeeze; unpadded
encode_plus for Transformers; SentenceTransformer.encode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

import ducho_fast
from ducho_fast.data.text.tsv import read_text_items
from tests.conftest import textual_config, visual_config, within_fp32_bounds

pytestmark = pytest.mark.slow


def run(config: dict[str, Any]) -> Any:
    ducho_fast.export(config)
    return ducho_fast.extract(config)


def test_visual_torch_items(tmp_path, store, image_dir, resnet18_state_dict) -> None:
    import torch
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.transforms import functional as TF

    from ducho_fast.exporters.compat import import_torchvision

    (tmp_path / "images").symlink_to(image_dir)
    model = {
        "model_name": "resnet18",
        "weights": str(resnet18_state_dict),
        "output_layers": ["avgpool", "layer4"],
        "reshape": [96, 80],
        "preprocessing": "zscore",
        "batch_size": 4,
    }
    report = run(visual_config(tmp_path, model, store))
    assert report.failed == 0 and report.runs[0].result.written == 10

    net = import_torchvision().models.resnet18(weights=None)
    net.load_state_dict(torch.load(resnet18_state_dict, weights_only=True))
    body = create_feature_extractor(net.eval(), {"avgpool": "a", "layer4": "b"})
    for image in sorted(image_dir.iterdir()):
        pil: Image.Image = Image.open(image)
        pil = pil.convert("RGB") if pil.mode != "RGB" else pil
        x = TF.normalize(
            TF.to_tensor(pil.resize((96, 80), Image.Resampling.BICUBIC)),
            [0.485, 0.456, 0.406],
            [0.229, 0.224, 0.225],
        )
        with torch.no_grad():
            ref = body(x[None])
        stem = image.name.split(".")[0]
        pooled = np.load(tmp_path / "out" / "torch" / "resnet18" / "avgpool" / f"{stem}.npy")
        spatial = np.load(tmp_path / "out" / "torch" / "resnet18" / "layer4" / f"{stem}.npy")
        assert pooled.dtype == np.float32 and pooled.shape == (1, 512)
        assert spatial.shape == (1, 512, 3, 3)
        within_fp32_bounds(pooled[0], np.squeeze(ref["a"].numpy()))
        within_fp32_bounds(spatial[0], np.squeeze(ref["b"].numpy()))
    assert (tmp_path / "out" / "ducho-fast.resolved.yml").is_file()


def test_visual_model_dir_is_the_file_stem(tmp_path, store, image_dir, resnet18_state_dict) -> None:
    (tmp_path / "images").symlink_to(image_dir)
    model = {
        "model_name": str(resnet18_state_dict),
        "architecture": "resnet18",
        "output_layers": "avgpool",
        "reshape": [64, 64],
    }
    run(visual_config(tmp_path, model, store))
    files = sorted(
        p.name for p in (tmp_path / "out" / "torch" / "resnet18_seed0" / "avgpool").iterdir()
    )
    records = ["ducho-fast.files.json", "ducho-fast.manifest.json"]
    assert files == [f"B{i:03d}.npy" for i in range(1, 11)] + records


def test_sentence_transformers_items_equal_encode(tmp_path, store, texts_tsv, minilm_dir) -> None:
    from ducho_fast.exporters.compat import import_sentence_transformers

    # Through compat: run alone, a plain import fails on torchvision's missing operators.
    SentenceTransformer = import_sentence_transformers().SentenceTransformer

    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    model = {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "batch_size": 4,
    }
    report = run(textual_config(tmp_path, model, store))
    assert report.runs[0].result.written == 11
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    folder = tmp_path.joinpath("out", "sentence_transformers", *minilm_dir.parts[1:], "1")
    for item in read_text_items(texts_tsv, "item_id", "description"):
        saved = np.load(folder / f"{item.item_id}.npy")
        assert saved.shape == (1, 384)
        within_fp32_bounds(saved, st.encode([item.raw]))
    assert (folder / "007.npy").is_file()  # ids stay strings: Ducho's pandas would write 7.npy


def test_transformers_items_unpadded_like_ducho(tmp_path, store, texts_tsv, tiny_bert_dir) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ducho_fast.data.text.clean import clear_text

    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    model = {
        "model_name": str(tiny_bert_dir),
        "output_layers": ["pooler_output", "last_hidden_state", 1],
        "clear_text": True,
        "batch_size": 3,
    }
    run(textual_config(tmp_path, model, store))
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    net = AutoModel.from_pretrained(tiny_bert_dir).eval()
    base = tmp_path.joinpath("out", "transformers", *tiny_bert_dir.parts[1:])
    for item in read_text_items(texts_tsv, "item_id", "description"):
        # Ducho calls encode_plus, which transformers 5 spells as __call__.
        enc = tok(clear_text(item.raw), return_tensors="pt", padding=False)
        with torch.no_grad():
            out = net(**enc, output_hidden_states=True)
        pooled = np.load(base / "pooler_output" / f"{item.item_id}.npy")
        tokens = np.load(base / "last_hidden_state" / f"{item.item_id}.npy")
        hidden1 = np.load(base / "1" / f"{item.item_id}.npy")
        assert pooled.shape == (1, 32)
        assert tokens.shape == (1, enc["input_ids"].shape[1], 32)
        within_fp32_bounds(pooled, out.pooler_output.numpy())
        within_fp32_bounds(tokens, out.last_hidden_state.numpy())
        within_fp32_bounds(hidden1, out.hidden_states[1].numpy())


def test_squeeze_option_writes_1d(tmp_path, store, texts_tsv, minilm_dir) -> None:
    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    config = textual_config(
        tmp_path,
        {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1},
        store,
    )
    config["output"] = {"squeeze": True}
    run(config)
    folder = tmp_path.joinpath("out", "sentence_transformers", *minilm_dir.parts[1:], "1")
    assert np.load(folder / "B001.npy").shape == (384,)


def test_absolute_model_name_cannot_escape_the_output_folder(
    tmp_path, store, texts_tsv, minilm_dir
) -> None:
    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    run(
        textual_config(
            tmp_path,
            {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1},
            store,
        )
    )
    assert not (minilm_dir / "1").exists()
    assert all(p.is_relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.npy"))


def test_extract_before_export_says_what_to_do(tmp_path, store, texts_tsv, minilm_dir) -> None:
    from ducho_fast.errors import ArtifactError

    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    config = textual_config(
        tmp_path,
        {
            "model_name": str(minilm_dir),
            "backend": "sentence_transformers",
            "output_layers": 1,
            "max_length": 64,
        },
        tmp_path / "empty-store",
    )
    with pytest.raises(ArtifactError, match=r"(?s)has not been exported.*ducho-fast export CONFIG"):
        ducho_fast.extract(config)


def test_demo_config_runs(tmp_path, store, effnet_weights, minilm_dir) -> None:
    """config/demo.yml as `make demo` runs it, in a scratch copy of the repo's layout."""
    import shutil

    from ducho_fast.config import load_config
    from tests.conftest import DEMO, REPO

    models = tmp_path / "local" / "demo" / "models"
    models.mkdir(parents=True)
    (models / "efficientnet_lite0.pth").symlink_to(effnet_weights)
    (models / "all-MiniLM-L6-v2").symlink_to(minilm_dir)
    shutil.copytree(DEMO, tmp_path / "data" / "demo", ignore=shutil.ignore_patterns("features"))
    config = load_config(REPO / "config" / "demo.yml", [f"store={store}"], cwd=tmp_path)
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    assert [r.result.written for r in report.runs] == [10, 11] and report.failed == 0
    features = tmp_path / "data" / "demo" / "features"
    assert np.load(features / "visual/torch/efficientnet_lite0/_avg_pooling/B002.npy").shape == (
        1,
        1280,
    )
    (fusion,) = report.fusions
    (fused,) = fusion.results
    assert fused.written == 10 and [e.item_id for e in fused.missing] == ["007"]
    assert np.load(features / "visual_textual_concat/B002.npy").shape == (1, 1280 + 384)
    image = np.load(features / "visual/matrix/torch/efficientnet_lite0/_avg_pooling/image_feat.npy")
    assert image.shape == (10, 1280)
    np.testing.assert_array_equal(
        image[1], np.load(features / "visual/torch/efficientnet_lite0/_avg_pooling/B002.npy")[0]
    )
    assert np.load(features / "visual_textual_concat/matrix/fused_feat.npy").shape == (10, 1664)
    again = ducho_fast.extract(config)  # a second run resumes
    assert [(r.result.written, r.result.reused) for r in again.runs] == [(0, 10), (0, 11)]


def test_audio_demo_config_runs(tmp_path, store, minilm_dir) -> None:
    """config/demo_audio.yml as `make demo-audio` runs it: generated tracks and model."""
    import runpy
    import shutil

    from ducho_fast.config import load_config
    from tests.conftest import REPO

    models = tmp_path / "local" / "demo" / "models"
    models.mkdir(parents=True)
    (models / "all-MiniLM-L6-v2").symlink_to(minilm_dir)
    data = tmp_path / "data" / "demo_audio"
    data.mkdir(parents=True)
    shutil.copy(REPO / "data" / "demo_audio" / "generate.py", data)
    shutil.copy(REPO / "data" / "demo_audio" / "tracks.tsv", data)
    generate = runpy.run_path(str(data / "generate.py"))
    generate["tracks"]()
    generate["model"](models / "hubert_4.pth")
    config = load_config(REPO / "config" / "demo_audio.yml", [f"store={store}"], cwd=tmp_path)
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    assert [r.result.written for r in report.runs] == [6, 6] and report.failed == 0
    features = data / "features"
    assert np.load(features / "audio/torch/HUBERT_BASE/4/T02.npy").shape == (1, 768)
    assert np.load(features / "audio_textual_concat/matrix/fused_feat.npy").shape == (6, 768 + 384)
    generate["tracks"]()  # `make demo-audio` again: the tracks stay, so the run resumes
    generate["model"](models / "hubert_4.pth")
    again = ducho_fast.extract(config)
    assert [(r.result.written, r.result.reused) for r in again.runs] == [(0, 6), (0, 6)]


def test_reviews_demo_config_runs(tmp_path, store, minilm_dir) -> None:
    """config/demo_reviews.yml as `make demo-reviews` runs it: items and reviews."""
    import shutil

    from ducho_fast.config import load_config
    from tests.conftest import REPO

    models = tmp_path / "local" / "demo" / "models"
    models.mkdir(parents=True)
    (models / "all-MiniLM-L6-v2").symlink_to(minilm_dir)
    for name in ("demo", "demo_reviews"):
        shutil.copytree(
            REPO / "data" / name,
            tmp_path / "data" / name,
            ignore=shutil.ignore_patterns("features"),  # a local `make demo` run's outputs
        )
    config = load_config(REPO / "config" / "demo_reviews.yml", [f"store={store}"], cwd=tmp_path)
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    assert [r.result.written for r in report.runs] == [11, 9] and report.failed == 0
    reviews = next((tmp_path / "data" / "demo_reviews" / "features" / "reviews").rglob("1"))
    assert sorted(p.stem for p in reviews.glob("*.npy"))[:2] == ["U01__B001", "U01__B002"]


def test_every_input_is_checked_before_any_job_runs(
    tmp_path, store, resnet18_state_dict, tiny_bert_dir, monkeypatch
) -> None:
    """An empty last input stops the run before the first job has written anything, and
    before a session is created; each job at fault is named."""
    from ducho_fast import api
    from ducho_fast.errors import DataError
    from tests.conftest import two_job_config

    data = tmp_path / "data"
    config = two_job_config(data, store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(config)
    ahead = api._session_ahead
    monkeypatch.setattr(api, "_session_ahead", lambda cfg: pytest.fail("a session was started"))
    (data / "descriptions.tsv").write_text("item_id\tdescription\n\n")
    with pytest.raises(DataError) as caught:
        ducho_fast.extract(config)
    assert str(caught.value).startswith("textual.items: ") and "no data rows" in str(caught.value)
    assert not list(data.rglob("*.npy"))
    for image in (data / "images").iterdir():
        image.rename(image.with_suffix(".txt"))
    with pytest.raises(
        DataError,
        match=r"(?s)^visual\.items: image folder .* are not image "
        r"files.*\ntextual\.items: .*no data rows",
    ):
        ducho_fast.extract(config)
    (data / "descriptions.tsv").write_text("item_id\tdescription\nt1\tred shirt\n")
    (data / "images" / "img00.txt").rename(data / "images" / "img00.jpg")
    monkeypatch.setattr(api, "_session_ahead", ahead)
    report = ducho_fast.extract(config)
    assert [r.result.written for r in report.runs] == [1, 1] and report.failed == 0


def test_extract_runs_on_the_session_made_ahead(
    tmp_path, store, texts_tsv, minilm_dir, monkeypatch
) -> None:
    """The first model's session, made while the run checks its inputs, is the one its
    pipeline runs on: made with the options the artifact's embedder asks for (texts' shapes
    vary, so cuDNN's convolutions would be tuned by heuristics on CUDA)."""
    from ducho_fast import api
    from ducho_fast.runtime.session import PendingSession

    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    model = {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1}
    config = textual_config(tmp_path, model, store)
    ducho_fast.export(config)
    made: list[PendingSession | None] = []
    waited: list[PendingSession] = []
    ahead, result = api._session_ahead, PendingSession.result

    def recording_ahead(cfg: Any) -> Any:
        pending = ahead(cfg)
        made.append(pending)
        return pending

    def recording_result(self: PendingSession) -> Any:
        waited.append(self)
        return result(self)

    monkeypatch.setattr(api, "_session_ahead", recording_ahead)
    monkeypatch.setattr(PendingSession, "result", recording_result)
    report = ducho_fast.extract(config)
    assert report.failed == 0 and report.runs[0].result.written == 11
    (pending,) = made
    assert pending is not None
    assert pending.options.cuda_options == {"cudnn_conv_algo_search": "HEURISTIC"}
    assert waited and all(p is pending for p in waited)  # used, not made again
