"""Several models over the same items: each item read and decoded once, files as separate runs."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import ducho_fast
from ducho_fast.api import ERRORS_FILE
from ducho_fast.data import sources
from ducho_fast.data.items import Item
from ducho_fast.errors import DataError
from ducho_fast.runtime import pipeline
from ducho_fast.runtime.batcher import TEXT_WINDOW_BATCHES, window_size
from ducho_fast.runtime.loading import Failed, load_each
from ducho_fast.runtime.pipeline import shared_window
from tests.conftest import (
    npy_bytes,
    resnet18_entry,
    two_job_config,
    visual_config,
    write_image,
)
from tests.runtime.test_pipeline import read_errors


class FakeLoader(sources.Loader):
    """Counts its calls; ``bad`` names items whose decode or finish fails."""

    def __init__(self, finish_key: Any, calls: Counter[str], bad_finish: str = "") -> None:
        self.decode_key = "fake"
        self.finish_key = finish_key
        self.calls = calls
        self.bad_finish = bad_finish

    def decode(self, item: Item) -> Any:
        self.calls["decode"] += 1
        if item.item_id == "broken":
            raise DataError(f"{item.origin}: cannot decode")
        return item.raw

    def finish(self, decoded: Any, item: Item) -> Any:
        self.calls[f"finish {self.finish_key}"] += 1
        if item.item_id == self.bad_finish:
            raise DataError(f"{item.origin}: too short for {self.finish_key}")
        return f"{decoded}@{self.finish_key}"


def test_load_each_decodes_once_and_finishes_once_per_key() -> None:
    calls: Counter[str] = Counter()
    loaders = [FakeLoader("a", calls), FakeLoader("b", calls), FakeLoader("a", calls)]
    assert load_each(loaders, Item("x", "x.jpg", "raw")) == ["raw@a", "raw@b", "raw@a"]
    assert calls == {"decode": 1, "finish a": 1, "finish b": 1}


def test_load_each_fails_every_model_on_a_bad_decode_and_one_on_a_bad_finish() -> None:
    calls: Counter[str] = Counter()
    loaders = [FakeLoader("a", calls), FakeLoader("b", calls, bad_finish="short")]
    assert load_each(loaders, Item("broken", "broken.wav", None)) == [Failed("cannot decode")] * 2
    assert load_each(loaders, Item("short", "short.wav", "raw")) == [
        "raw@a",
        Failed("too short for b"),
    ]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    for i in range(7):
        write_image(folder / f"p{i}.jpg", size=(50 + 3 * i, 40 + i), seed=i)
    (folder / "p3.jpg").write_bytes(b"not a jpeg")
    return folder


def two_models(data: Path, store: Path, weights: Path, batch: tuple[int, int]) -> dict[str, Any]:
    """ResNet18 twice: different layers and input sizes, so decoding is shared, resizing not."""
    first = resnet18_entry(weights, batch_size=batch[0])
    second = resnet18_entry(
        weights, batch_size=batch[1], output_layers=["layer4"], reshape=[48, 48]
    )
    config = visual_config(data, first, store)
    config["visual"]["items"]["model"].append(second)
    return config


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each image file is decoded during the test."""
    counts: Counter[str] = Counter()
    real = sources.decode_image

    def counting(source: Any, options: Any = None, draft: int | None = None) -> Any:
        counts[Path(source).name] += 1
        return real(source, options, draft)

    monkeypatch.setattr(sources, "decode_image", counting)
    return counts


def counting_progress() -> tuple[list[int], Any]:
    """A progress factory for ``extract`` and the ticks it saw: -total, then each step."""
    ticks: list[int] = []

    @contextmanager
    def progress(label: str, total: int):
        ticks.append(-total)
        yield ticks.append

    return ticks, progress


def alone_bytes(tmp_path: Path, images: Path, config: dict[str, Any], store: Path) -> Any:
    """The files of each model of ``config`` run alone, over a copy of the images."""
    files = {}
    for k, model in enumerate(config["visual"]["items"]["model"]):
        alone = tmp_path / f"alone{k}"
        shutil.copytree(images, alone / "images")
        ducho_fast.extract(visual_config(alone, model, store))
        files.update(npy_bytes(alone / "out"))
    return files


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch_sizes",
    # (3, 2): windows of 6, each model cuts them into its own batches.
    [(3, 3), (3, 2)],
    ids=["same-batch-size", "batch-sizes-3-and-2"],
)
def test_two_models_decode_each_image_once_and_write_what_separate_runs_write(
    tmp_path, store, images, resnet18_state_dict, decodes, batch_sizes
) -> None:
    config = two_models(tmp_path / "data", store, resnet18_state_dict, batch_sizes)
    ducho_fast.export(config)
    ticks, progress = counting_progress()
    report = ducho_fast.extract(config, progress=progress)
    assert decodes == {f"p{i}.jpg": 1 for i in range(7)}
    assert ticks[0] == -7 and sum(ticks[1:]) == 7  # one bar, items counted once
    assert [r.layers for r in report.runs] == [("avgpool",), ("layer4",)]  # config order
    assert [r.result.written for r in report.runs] == [6, 6]
    assert [[e.item_id for e in r.result.errors] for r in report.runs] == [["p3"], ["p3"]]
    rows = read_errors(tmp_path / "data" / "out" / ERRORS_FILE)
    assert [(r["item_id"], "not a readable image" in r["reason"]) for r in rows] == [
        ("p3", True),
        ("p3", True),
    ]
    together = npy_bytes(tmp_path / "data" / "out")
    assert len(together) == 12
    assert together == alone_bytes(tmp_path, images, config, store)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "rerun", "decoded"),
    [
        # Only the window holding the bad p3 runs again (as with one model), decoded once.
        ((3, 3), [(4, 2), (4, 2)], ["p3", "p4", "p5"]),
        # Each model reruns its own window holding p3: p3-p5 (batches of 3) and p2-p3
        # (batches of 2). The items of either are decoded once; the others not at all.
        ((3, 2), [(4, 2), (5, 1)], ["p2", "p3", "p4", "p5"]),
    ],
)
def test_resume_decodes_only_what_a_model_still_needs(
    tmp_path, store, images, resnet18_state_dict, decodes, batch, rerun, decoded
) -> None:
    config = two_models(tmp_path / "data", store, resnet18_state_dict, batch)
    ducho_fast.export(config)
    first_only = visual_config(tmp_path / "data", config["visual"]["items"]["model"][0], store)
    ducho_fast.extract(first_only)
    decodes.clear()
    os.utime(images / "p3.jpg")  # touched: no longer the file recorded as unreadable
    report = ducho_fast.extract(config)
    # The first model has every good item; it runs again only the window holding the bad
    # one (p3-p5, as with one model), and the items are decoded once for both.
    assert [(r.result.reused, r.result.written) for r in report.runs] == [(4, 2), (0, 6)]
    assert decodes == {f"p{i}.jpg": 1 for i in range(7)}
    decodes.clear()
    os.utime(images / "p3.jpg")
    ticks, progress = counting_progress()
    report = ducho_fast.extract(config, progress=progress)
    assert [(r.result.reused, r.result.written) for r in report.runs] == rerun
    assert decodes == {f"{name}.jpg": 1 for name in decoded}
    # The bar counts the items some model embeds again, each once.
    assert ticks[0] == -len(decoded) and sum(ticks[1:]) == len(decoded)
    decodes.clear()  # p3 unchanged since both models recorded it: nothing is read
    report = ducho_fast.extract(config)
    assert [r.result.written for r in report.runs] == [0, 0] and not decodes
    assert [[e.item_id for e in r.result.errors] for r in report.runs] == [["p3"], ["p3"]]


@pytest.mark.slow
def test_models_whose_windows_do_not_fit_together_run_apart_with_the_same_results(
    tmp_path, store, images, resnet18_state_dict, decodes
) -> None:
    # 5 and 7 would need windows of 35, over 4 x 7: one pipeline each.
    config = two_models(tmp_path / "data", store, resnet18_state_dict, (5, 7))
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    assert decodes == {f"p{i}.jpg": 2 for i in range(7)}
    assert [r.result.written for r in report.runs] == [6, 6]


@pytest.mark.slow
def test_text_models_with_different_batch_sizes_sort_their_own_windows(
    tmp_path, store, resnet18_state_dict, tiny_bert_dir, monkeypatch
) -> None:
    # Windows of 16 batches: 32 and 64 texts, shared as 64. The model with batches of 2 sorts
    # each half on its own, as alone: the files are those of separate runs.
    data = tmp_path / "data"
    config = two_job_config(data, store, resnet18_state_dict, tiny_bert_dir)
    textual = config["textual"]
    second = {**textual["items"]["model"][0], "output_layers": ["last_hidden_state"]}
    textual["items"]["model"].append({**second, "batch_size": 4})
    config = {"dataset_path": str(data), "store": str(store), "textual": textual}
    ducho_fast.export(config)
    batches: dict[int, list[tuple[str, ...]]] = {2: [], 4: []}  # by batch size: ids per batch
    real = pipeline.assemble

    def spy(chunk: Any, loaded: Any, batcher: Any, options: Any) -> Any:
        made = real(chunk, loaded, batcher, options)
        batches[options.batch_size] += [tuple(i.item_id for i in b.items) for b in made[0]]
        return made

    monkeypatch.setattr(pipeline, "assemble", spy)
    ticks, progress = counting_progress()
    report = ducho_fast.extract(config, progress=progress)
    together = {k: list(v) for k, v in batches.items()}
    assert ticks[0] == -70 and sum(ticks[1:]) == 70  # one bar
    assert [r.result.written for r in report.runs] == [69, 69]
    assert [[e.item_id for e in r.result.errors] for r in report.runs] == [["t009"], ["t009"]]
    for k, model in enumerate(textual["items"]["model"]):
        alone = tmp_path / f"alone{k}"
        alone.mkdir()
        shutil.copy(data / "descriptions.tsv", alone)
        batches[model["batch_size"]].clear()
        ducho_fast.extract({**config, "dataset_path": str(alone)} | _only(textual, model))
    assert batches == together
    assert npy_bytes(data / "text_out") == {
        **npy_bytes(tmp_path / "alone0" / "text_out"),
        **npy_bytes(tmp_path / "alone1" / "text_out"),
    }


def _only(textual: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    return {"textual": {"items": {**textual["items"], "model": [model]}}}


def test_shared_window_holds_a_whole_number_of_each_models_window() -> None:
    assert shared_window([32]) == 32
    assert shared_window([32, 64, 16]) == 64
    assert shared_window([3, 2]) == 6
    assert shared_window([24, 32]) == 96
    assert shared_window([5, 7]) is None  # 35 > 4 x 7
    assert (
        shared_window([32 * TEXT_WINDOW_BATCHES, 64 * TEXT_WINDOW_BATCHES])
        == 64 * TEXT_WINDOW_BATCHES
    )


def test_text_windows_hold_sort_window_batches() -> None:
    assert window_size(True, 32) == 32 * TEXT_WINDOW_BATCHES
    assert window_size(True, 32, 8) == 256
    assert window_size(False, 32, 8) == 32  # images and audio: one batch


@pytest.mark.slow
@pytest.mark.parametrize("batch", [(2, 2), (3, 2)])
def test_shards_of_a_two_model_job_write_what_one_run_writes(
    tmp_path, store, images, resnet18_state_dict, decodes, batch
) -> None:
    config = two_models(tmp_path / "data", store, resnet18_state_dict, batch)
    ducho_fast.export(config)
    one = tmp_path / "one"
    shutil.copytree(images, one / "images")
    ducho_fast.extract({**config, "dataset_path": str(one)})
    decodes.clear()
    for shard in ("0/2", "1/2"):
        report = ducho_fast.extract(config, shard=shard)
        assert len({r.result.written for r in report.runs}) == 1  # both models, same windows
    assert decodes == {f"p{i}.jpg": 1 for i in range(7)}
    ducho_fast.extract(config)  # the final plain run: manifests, errors
    assert npy_bytes(tmp_path / "data" / "out") == npy_bytes(one / "out")


def test_loaders_share_what_reads_the_same_settings() -> None:
    from ducho_fast.config.model import InputOptions

    def image(**pre: Any) -> sources.Loader:
        return sources.ImageLoader({"resize": [224, 224], "mean": [0.5] * 3, **pre}, InputOptions())

    # Normalization happens in the graph: it does not stop two models sharing the resize.
    assert image().finish_key == image(mean=[0.4] * 3).finish_key
    assert image().finish_key != image(resize=[64, 64]).finish_key
    assert image().decode_key == image(resize=[64, 64]).decode_key
    exif = sources.ImageLoader({}, InputOptions(exif_orientation="ignore"))
    assert exif.decode_key != image().decode_key
    # Reduced JPEG decoding picks its scale from the model's size: shared by equal sizes only.
    reduced = [
        sources.ImageLoader({"resize": size}, InputOptions(jpeg_decode="reduced"))
        for size in ([224, 224], [224, 224], [64, 64])
    ]
    assert reduced[0].decode_key == reduced[1].decode_key != reduced[2].decode_key
    assert reduced[0].decode_key != image().decode_key
    assert image().decode_key == ("image", "apply", 89_478_485)  # as recorded by older runs
    audio = [sources.AudioLoader({"sample_rate": r}, InputOptions()) for r in (16000, 16000, 8000)]
    assert audio[0].finish_key == audio[1].finish_key != audio[2].finish_key
    cropped = sources.AudioLoader({"sample_rate": 16000, "max_seconds": 2}, InputOptions())
    assert cropped.decode_key != audio[0].decode_key  # it reads only the first 2 s
