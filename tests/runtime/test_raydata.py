"""Ray Data on a local instance (2 CPUs): ``extract --engine ray`` writes the files of a local run,
and ``RayEmbedder`` works in ``Dataset.map_batches``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import ducho_fast
from ducho_fast.errors import ConfigError, DataError
from ducho_fast.runtime.raydata import RayEmbedder, RayOptions
from tests.conftest import closed_port, npy_bytes, two_job_config, write_image

ray = pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_engine_ray_writes_the_files_of_a_local_run(
    local_ray, tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    local = two_job_config(tmp_path / "local", store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(local)
    expected = ducho_fast.extract(local)
    on_ray = two_job_config(tmp_path / "ray", store, resnet18_state_dict, tiny_bert_dir)
    with pytest.raises(ConfigError, match="take all 2 CPUs of the Ray cluster"):
        ducho_fast.extract(on_ray, engine="ray", ray=RayOptions(actors=2))
    report = ducho_fast.extract(on_ray, engine="ray", ray=RayOptions(actors=1))

    assert [r.provider for r in report.runs] == ["ray: CPUExecutionProvider"] * 2
    assert [r.result.written for r in report.runs] == [21, 69]
    errors = [(e.item_id, e.reason) for r in report.runs for e in r.result.errors]
    assert errors == [
        (e.item_id, e.reason.replace("/local/", "/ray/"))
        for r in expected.runs
        for e in r.result.errors
    ]
    assert {i for i, _ in errors} == {"img05", "t009"}
    # Byte for byte, matrices included: the batches are the local pipeline's.
    assert npy_bytes(tmp_path / "ray") == npy_bytes(tmp_path / "local")

    # Resumable like a local run. The bad image was read and recorded as unreadable, and the
    # blank text fails from the listing alone: neither window runs again (no bar), and both
    # are still reported. Touched, the image is read again: only its window runs, and the
    # progress counts only it.
    bars: list[tuple[str, int, list[int]]] = []

    @contextmanager
    def progress(label: str, total: int) -> Iterator[Any]:
        bars.append((label, total, []))
        yield bars[-1][2].append

    settled = ducho_fast.extract(on_ray, engine="ray", progress=progress)
    assert [r.result.written for r in settled.runs] == [0, 0] and bars == []
    assert [e.item_id for r in settled.runs for e in r.result.errors] == ["img05", "t009"]
    os.utime(tmp_path / "ray" / "images" / "img05.jpg")
    again = ducho_fast.extract(on_ray, engine="ray", progress=progress)
    assert [r.result.written for r in again.runs] == [2, 0]
    assert [r.result.reused for r in again.runs] == [19, 69]
    assert [e.item_id for r in again.runs for e in r.result.errors] == ["img05", "t009"]
    # The image's window, then its matrix: remade, as a feature in it is new.
    assert [(total, sum(ticks)) for _, total, ticks in bars] == [(3, 3), (21, 21)]
    assert "matrix" not in bars[0][0] and "matrix" in bars[1][0]
    half = two_job_config(tmp_path / "half", store, resnet18_state_dict, tiny_bert_dir)
    shard = ducho_fast.extract(half, engine="ray", shard="1/2")
    # Windows 1, 3, 5, 7 of the images (3 + 3 + 3 + 1, img05 among them) and 1 of the texts.
    assert [r.result.written for r in shard.runs] == [10 - 1, 32]
    assert [e.item_id for r in shard.runs for e in r.result.errors] == ["img05"]


def test_engine_ray_writes_with_several_writers_as_with_one(
    local_ray,
    tmp_path: Path,
    store: Path,
    resnet18_state_dict: Path,
    tiny_bert_dir: Path,
    monkeypatch,
) -> None:
    """The driver's writer threads (``runtime.writers``): the same files and bad items, in
    input order, as a local run; each item counted once; a bad item under ``on_error: fail``
    stops the run with what the writers had queued written."""
    import threading
    import time

    from ducho_fast.runtime import raydata

    local = two_job_config(tmp_path / "local", store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(local)
    expected = ducho_fast.extract(local)
    real = raydata.write_checked
    names: set[str] = set()

    def slow(write: Any, item: Any, out: Any) -> str | None:
        names.add(threading.current_thread().name)
        time.sleep(0.005)  # a shared file system's round trip
        return real(write, item, out)

    monkeypatch.setattr(raydata, "write_checked", slow)
    on_ray = two_job_config(tmp_path / "ray", store, resnet18_state_dict, tiny_bert_dir)
    bars: list[tuple[int, list[int]]] = []

    @contextmanager
    def progress(label: str, total: int) -> Iterator[Any]:
        bars.append((total, []))
        yield bars[-1][1].append

    report = ducho_fast.extract(
        on_ray, ["runtime.writers=3"], engine="ray", ray=RayOptions(actors=1), progress=progress
    )
    assert [r.result.written for r in report.runs] == [21, 69]
    assert [total for total, _ in bars] == [22, 21, 70, 69]  # items, then each matrix's rows
    assert all(sum(ticks) == total for total, ticks in bars)
    assert [[e.item_id for e in r.result.errors] for r in report.runs] == [
        [e.item_id for e in r.result.errors] for r in expected.runs
    ]
    assert names == {f"ducho-writer-{k}" for k in range(3)}  # each took batches
    assert npy_bytes(tmp_path / "ray") == npy_bytes(tmp_path / "local")

    # Bad items written by different writers at different paces: recorded in input order.
    refused = {"img01": 0.3, "img08": 0.0, "img14": 0.0}  # the first one the slowest

    def refusing(write: Any, item: Any, out: Any) -> str | None:
        if item.item_id in refused:
            time.sleep(refused[item.item_id])
            return "refused by the test"
        return real(write, item, out)

    monkeypatch.setattr(raydata, "write_checked", refusing)
    order = two_job_config(tmp_path / "order", store, resnet18_state_dict, tiny_bert_dir)
    run = ducho_fast.extract(order, ["runtime.writers=3"], engine="ray", ray=RayOptions(actors=1))
    assert [e.item_id for e in run.runs[0].result.errors] == ["img01", "img05", "img08", "img14"]

    failing = two_job_config(tmp_path / "fail", store, resnet18_state_dict, tiny_bert_dir)
    failing["runtime"] = {"on_error": "fail", "writers": 2}
    with pytest.raises(DataError, match=r"item 'img01' .*: refused by the test"):  # in a writer
        ducho_fast.extract(failing, engine="ray", ray=RayOptions(actors=1))


def test_a_cluster_that_cannot_be_joined_stops_the_run_before_any_work(
    tmp_path: Path, store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    """The address is tried after the config's checks and before any output folder."""
    config = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    ducho_fast.export(config)
    before = sorted(tmp_path.rglob("*"))
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(ConfigError, match=f"--ray-address {address}: no Ray cluster answers"):
        ducho_fast.extract(config, engine="ray", ray=RayOptions(actors=1, address=address))
    assert sorted(tmp_path.rglob("*")) == before


def test_a_cli_run_on_ray_keeps_ray_data_notices_off_the_console(
    local_ray, tmp_path: Path, store: Path, resnet18_state_dict: Path
) -> None:
    """Ray Data's execution plans and notices would interleave with the progress bars. In a
    separate driver process, as a user runs it: in this one, pytest's capture hides them."""
    from tests.conftest import resnet18_entry, visual_config

    (tmp_path / "images").mkdir()
    for i in range(4):
        write_image(tmp_path / "images" / f"{i}.jpg", seed=i)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    ducho_fast.export(config)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    address = local_ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOG_LEVEL"}
    command = [sys.executable, "-m", "ducho_fast", "extract", str(path), "--engine", "ray"]
    done = subprocess.run(
        [*command, "--ray-address", address, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and "4 written" in done.stdout, done.stdout + done.stderr
    for notice in ("streaming_executor", "Progress bars disabled"):
        assert notice not in done.stderr, done.stderr


def test_ray_embedder_in_map_batches(local_ray, store: Path, resnet18_state_dict: Path, tmp_path):
    from tests.conftest import resnet18_entry, visual_config

    (tmp_path / "images").mkdir()
    paths = [write_image(tmp_path / "images" / f"{i}.png", (32 + i, 40), seed=i) for i in range(7)]
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    artifact = ducho_fast.export(config)[0].artifact.path
    embedder = ducho_fast.load(artifact)
    rows = [{"id": p.stem, "image": embedder.prepare(p)} for p in paths]

    ds = ray.data.from_items(rows).map_batches(
        RayEmbedder, fn_constructor_args=(artifact,), batch_size=3, concurrency=1
    )
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in out] == [p.stem for p in paths]
    assert all(r["error"] == "" for r in out)
    np.testing.assert_allclose(
        np.stack([r["avgpool"] for r in out]), embedder.embed(paths), rtol=1e-5, atol=1e-6
    )


def test_ray_embedder_prepares_each_row_as_embed_does(
    store: Path, resnet18_state_dict: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Rows as Ray Data reads them: images at their own size (``read_images``), file bytes
    (``read_binary_files``), nulls. They were passed to the model as they came: a null text
    was embedded as "None", and a full-size image through a graph that takes any size gave
    another feature than extract's, both without a word."""
    from PIL import Image

    from tests.conftest import resnet18_entry, textual_config, visual_config

    path = write_image(tmp_path / "a.png", (48, 36), seed=1)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    artifact = ducho_fast.export(config)[0].artifact.path
    expected = ducho_fast.load(artifact).embed([path])[0]
    full = np.asarray(Image.open(path).convert("RGB"))  # 48 x 36, not the model's 64 x 64
    column = np.empty(4, dtype=object)
    column[:] = [full, path.read_bytes(), str(path), None]
    with pytest.raises(ConfigError, match=r"sample_rate is for audio models"):
        RayEmbedder(artifact, sample_rate=16000)
    out = RayEmbedder(artifact)({"id": np.array(list("abcd")), "image": column})
    assert list(out["error"][:3]) == ["", "", ""]
    assert out["error"][3].startswith("an image input must be a file path")
    for row in out["avgpool"][:3]:
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(out["avgpool"][3]).all()
    for batch_size, sizes in [(None, [3]), (2, [2, 1])]:  # a call per batch, or of batch_size
        stage = RayEmbedder(artifact, batch_size=batch_size)
        made = _recorded_calls(stage)
        again = stage({"image": column})
        assert [len(c) for c in made] == sizes
        assert np.array_equal(again["avgpool"], out["avgpool"], equal_nan=True)

    model = {"model_name": str(tiny_bert_dir), "output_layers": ["pooler_output"]}
    text_artifact = ducho_fast.export(textual_config(tmp_path, model, store))[0].artifact.path
    texts = np.array(["red", None, "None"], dtype=object)
    out = RayEmbedder(text_artifact)({"id": np.array(list("abc")), "text": texts})
    assert list(out["error"]) == ["", "text inputs must be strings, found NoneType.", ""]
    assert np.isnan(out["pooler_output"][1]).all()
    np.testing.assert_allclose(
        out["pooler_output"][[0, 2]], ducho_fast.load(text_artifact).embed(["red", "None"])
    )
    # A batch of no rows (a filtered block) keeps its columns, with no rows and their shapes.
    none = RayEmbedder(text_artifact)({"id": np.array([]), "text": np.array([], dtype=object)})
    assert none["pooler_output"].shape == (0, 32) and none["error"].shape == (0,)
    assert RayEmbedder(artifact)({"image": np.empty(0, dtype=object)})["avgpool"].shape == (0, 512)


def test_ray_embedder_reads_what_read_audio_gives(
    local_ray, store: Path, tiny_wav2vec2_dir: Path, tmp_path: Path
) -> None:
    """``ray.data.read_audio`` gives ``amplitude`` (channels, samples) and ``sample_rate``
    per row: embedded as the files themselves are, whatever their rate and channels."""
    from tests.conftest import audio_config, write_tone

    folder = tmp_path / "audio"
    folder.mkdir()
    files = [
        write_tone(folder / "a.wav", seconds=0.5, subtype="FLOAT"),
        write_tone(folder / "b.wav", seconds=0.6, rate=8000, channels=2, subtype="FLOAT"),
    ]
    entry = {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers"}
    config = audio_config(tmp_path, {**entry, "output_layers": [1], "pooling": "mean"}, store)
    artifact = ducho_fast.export(config)[0].artifact.path
    expected = ducho_fast.load(artifact).embed(files)
    ds = ray.data.read_audio([str(f) for f in files], include_paths=True)
    out = ds.map_batches(RayEmbedder, fn_constructor_args=(artifact,), concurrency=1).take_all()
    rows = sorted(out, key=lambda r: r["path"])
    assert [r["error"] for r in rows] == ["", ""]
    np.testing.assert_allclose(np.stack([r["1"] for r in rows]), expected, rtol=1e-5, atol=1e-6)

    stage = RayEmbedder(artifact, sample_rate=8000)  # a waveform column at a rate given once
    slow = np.empty(1, dtype=object)
    slow[0] = np.asarray(ducho_fast.load(artifact).prepare(files[1], None))  # 16 kHz mono
    at_16k = RayEmbedder(artifact)({"waveform": slow})["1"]
    assert not np.allclose(stage({"waveform": slow})["1"], at_16k, rtol=1e-3)  # read as 8 kHz


def test_ray_embedder_says_which_column_it_needs(store: Path, resnet18_state_dict, tmp_path):
    from tests.conftest import resnet18_entry, visual_config

    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    artifact = ducho_fast.export(config)[0].artifact.path
    stage = RayEmbedder(artifact)
    with pytest.raises(DataError, match=r"needs a column 'image'; the batch has \['id', 'path'\]"):
        stage({"id": np.array(["a"]), "path": np.array(["a.jpg"])})
    with pytest.raises(Exception, match=r"no layer\(s\) \['fc'\]"):
        RayEmbedder(artifact, layers=["fc"])


def test_ray_embedder_token_layers_keep_each_length(store: Path, tiny_bert_dir: Path, tmp_path):
    from tests.conftest import textual_config

    model = {"model_name": str(tiny_bert_dir), "output_layers": ["last_hidden_state"]}
    artifact = ducho_fast.export(textual_config(tmp_path, model, store))[0].artifact.path
    texts = ["red", "a soft cotton shirt with long sleeves"]
    out = RayEmbedder(artifact)({"id": np.array(["a", "b"]), "text": np.array(texts)})
    expected = ducho_fast.load(artifact).embed(texts)
    assert [r.shape for r in out["last_hidden_state"]] == [e.shape for e in expected]
    assert expected[0].shape[0] != expected[1].shape[0]
    for row, ref in zip(out["last_hidden_state"], expected, strict=True):
        np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-6)
    assert list(out["id"]) == ["a", "b"] and list(out["error"]) == ["", ""]


def test_ray_embedder_runs_a_batch_of_texts_sorted_by_length(
    store: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A Ray batch of texts runs as ``embed`` runs texts: sorted by length, in calls of
    ``batch_size`` rows (32 by default), not as one call padded to the batch's longest text.
    Each row keeps its own result, and a row that is no text still fails alone."""
    from tests.conftest import textual_config

    model = {"model_name": str(tiny_bert_dir), "output_layers": ["pooler_output"]}
    artifact = ducho_fast.export(textual_config(tmp_path, model, store))[0].artifact.path
    words = ["soft", "cotton", "shirt", "with", "long", "sleeves"]
    # 20 of one word, 20 of 60 words, alternating; one of the long ones is a null
    texts = np.array([" ".join(words[: 1 + k % 2 * 5] * (1 + k % 2 * 9)) for k in range(40)])
    column = texts.astype(object)
    column[7] = None
    alone = ducho_fast.load(artifact)

    stage = RayEmbedder(artifact, batch_size=20)
    made = _recorded_calls(stage)
    out = stage({"id": np.arange(40), "text": column})
    lengths = [[len(tokens) for tokens in c] for c in made]
    assert [(len(c), len(set(c))) for c in lengths] == [(20, 1), (19, 1)]  # short, then long
    assert out["error"][7] == "text inputs must be strings, found NoneType."
    for k in (0, 1, 38, 39):
        np.testing.assert_allclose(
            out["pooler_output"][k], alone.embed([str(texts[k])])[0], rtol=1e-5, atol=1e-6
        )
    stage = RayEmbedder(artifact)
    made = _recorded_calls(stage)
    again = stage({"id": np.arange(40), "text": column})
    lengths = [[len(tokens) for tokens in c] for c in made]
    assert [len(c) for c in lengths] == [32, 7] and lengths[0] == sorted(lengths[0])
    np.testing.assert_allclose(again["pooler_output"], out["pooler_output"], rtol=1e-5, atol=1e-6)
    for bad in (0, 2.0, True):
        with pytest.raises(ConfigError, match=r"batch_size must be a whole number of 1 or more"):
            RayEmbedder(artifact, batch_size=bad)  # type: ignore[arg-type]


def test_ray_embedder_checks_its_runtime_options_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^RayEmbedder's runtime: key 'runtime\.spin_wait'"):
        RayEmbedder(tmp_path / "not-loaded", {"spin_wait": "yes"})


def _recorded_calls(stage: RayEmbedder) -> list[list[Any]]:
    """The rows of each call ``stage`` makes to its model, from now on."""
    calls: list[list[Any]] = []
    run = stage.embedder.run_prepared

    def recording(rows: Any) -> Any:
        calls.append(list(rows))
        return run(rows)

    setattr(stage.embedder, "run_prepared", recording)  # noqa: B010 (mypy refuses assigning to a method)
    return calls
