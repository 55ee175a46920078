"""Resume and atomicity end to end: killed, failed and changed runs.

A run killed at any moment (SIGKILL included) and started again skips complete items and ends
with features byte-identical to an uninterrupted run's; changed settings are refused.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

import ducho_fast
from ducho_fast.errors import OutputError
from ducho_fast.outputs.lock import LOCK_FILE
from ducho_fast.outputs.manifest import MANIFEST_FILE
from tests.conftest import REPO, resnet18_entry, textual_config, visual_config, write_image

pytestmark = pytest.mark.slow


def images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        write_image(folder / f"item{i}.jpg", size=(40 + i % 7 * 9, 30 + i % 5 * 11), seed=i)
    return folder


def snapshot(root: Path) -> dict[str, bytes]:
    """Every feature, matrix and id file under ``root`` (manifests record timings: not bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".npy", ".txt", ".tsv") and "errors" not in p.name
    }


def config_for(data: Path, store: Path, weights: Path, out: str, **model: Any) -> dict[str, Any]:
    entry = resnet18_entry(weights, **{"batch_size": 4, "reshape": [160, 160], **model})
    config = visual_config(data, entry, store)
    config["visual"]["items"]["output_path"] = out
    config["output"] = {"layouts": ["ducho", "matrix"]}
    return config


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    images(tmp_path / "images", 160)
    return tmp_path


def extract_until(
    dataset: Path, store: Path, weights: Path, written: int = 30
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The reference run ("ref") made in this process, then a real ``extract`` process into
    "out", returned once it has written ``written`` features (with its config and folder).
    Its SIGINT is Python's default even where the test runs as a background job."""
    reference = config_for(dataset, store, weights, "ref")
    ducho_fast.export(reference)
    ducho_fast.extract(reference)
    path = dataset / "out.yml"
    path.write_text(yaml.safe_dump(config_for(dataset, store, weights, "out")))
    folder = dataset / "out" / "torch" / "resnet18" / "avgpool"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ducho_fast", "extract", str(path), "--no-progress"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while len(list(folder.glob("item*.npy"))) < written:
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc, path, folder


def test_sigkill_mid_run_then_resume_is_byte_identical(dataset, store, resnet18_state_dict):
    proc, path, folder = extract_until(dataset, store, resnet18_state_dict)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    partial = len(list(folder.glob("item*.npy")))
    assert 30 <= partial < 160, partial
    assert json.loads((folder / MANIFEST_FILE).read_text())["status"] == "running"
    assert not (dataset / "out" / "matrix").exists() or partial == 160

    report = ducho_fast.extract(path)
    result = report.runs[0].result
    assert result.reused >= partial - 2 * 4 and result.reused + result.written == 160
    assert snapshot(dataset / "out") == snapshot(dataset / "ref")
    assert len(snapshot(dataset / "out")) == 160 + 2  # the files, image_feat.npy, ids.txt
    assert json.loads((folder / MANIFEST_FILE).read_text())["status"] == "complete"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_cleanly_then_resume_is_byte_identical(
    dataset, store, resnet18_state_dict, sig
):
    """A batch scheduler's SIGTERM stops a run as Ctrl-C does: the batches in flight are
    written, the exit code is 128 + the signal's number, and a message says what to do."""
    proc, path, folder = extract_until(dataset, store, resnet18_state_dict)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr.decode()
    message = " ".join(stderr.decode().split())
    assert f"stopped by {sig.name}. The features written so far are complete and kept" in message
    partial = len(list(folder.glob("item*.npy")))
    assert 30 <= partial < 160, partial
    assert not list(folder.glob(".tmp-*"))  # every write finished
    assert json.loads((folder / MANIFEST_FILE).read_text())["status"] == "running"

    report = ducho_fast.extract(path)
    result = report.runs[0].result
    assert result.reused == partial and result.reused + result.written == 160
    assert snapshot(dataset / "out") == snapshot(dataset / "ref")


def test_a_second_run_into_a_folder_being_written_stops_and_loses_nothing(
    dataset, store, resnet18_state_dict
):
    """Two runs writing one folder would remove each other's unfinished files: the second
    stops before any work, naming the first, which completes every item."""
    proc, path, folder = extract_until(dataset, store, resnet18_state_dict)
    with pytest.raises(
        OutputError,
        match=rf"{folder} is being written by another ducho-fast run now \(ducho-fast extract, "
        rf"pid {proc.pid} on ",
    ):
        ducho_fast.extract(path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert snapshot(dataset / "out") == snapshot(dataset / "ref")
    assert not (folder / LOCK_FILE).exists()
    assert ducho_fast.extract(path).runs[0].result.reused == 160


def test_full_disk_stops_the_run_and_a_rerun_completes_it(
    dataset, store, resnet18_state_dict, monkeypatch
):
    from ducho_fast.outputs.atomic import NpyFiles

    reference = config_for(dataset, store, resnet18_state_dict, "ref", reshape=[64, 64])
    ducho_fast.export(reference)
    ducho_fast.extract(reference)
    config = config_for(dataset, store, resnet18_state_dict, "out", reshape=[64, 64])
    real_save = NpyFiles.save
    writes: list[Path] = []

    def fills_up(self: NpyFiles, path: Path, array: np.ndarray) -> None:
        if len(writes) == 21:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(path)
        real_save(self, path, array)

    monkeypatch.setattr(NpyFiles, "save", fills_up)
    with pytest.raises(OutputError, match=r"No space left on device.*items already written"):
        ducho_fast.extract(config)
    folder = dataset / "out" / "torch" / "resnet18" / "avgpool"
    assert len(list(folder.glob("*.npy"))) == 21 and not list(folder.glob(".tmp-*"))
    monkeypatch.setattr(NpyFiles, "save", real_save)  # space freed
    report = ducho_fast.extract(config)
    assert report.runs[0].result.reused == 20  # the complete batches; the 6th batch runs again
    assert snapshot(dataset / "out") == snapshot(dataset / "ref")


def test_an_emptied_feature_file_is_embedded_again(tmp_path, store, image_dir, resnet18_state_dict):
    """A feature file a power loss emptied (renamed, never synced) is not reused: resume
    embeds its batch again and the matrix is built, where it stopped with 'Aborted.'."""
    (tmp_path / "images").symlink_to(image_dir)
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    ducho_fast.export(config)
    ducho_fast.extract(config)
    before = snapshot(tmp_path / "out")
    emptied = sorted((tmp_path / "out" / "torch" / "resnet18" / "avgpool").glob("*.npy"))[0]
    emptied.write_bytes(b"")
    report = ducho_fast.extract(config)
    assert report.runs[0].result.written == 4  # the batch holding it
    assert snapshot(tmp_path / "out") == before


def test_other_weights_under_the_same_graph_are_refused(tmp_path, store, resnet18_state_dict):
    """Two state dicts of one architecture export byte-identical graphs (the weights are in
    model.onnx.data): resuming one's features with the other is refused all the same."""
    import torch

    from ducho_fast.exporters.compat import import_torchvision

    torch.manual_seed(1)
    other = tmp_path / "resnet18_seed1.pth"
    torch.save(import_torchvision().models.resnet18(weights=None).state_dict(), other)
    images(tmp_path / "images", 6)
    first, second = (config_for(tmp_path, store, w, "out") for w in (resnet18_state_dict, other))
    (a,), (b,) = ducho_fast.export(first), ducho_fast.export(second)
    assert a.artifact.hashes["model_sha256"] == b.artifact.hashes["model_sha256"]
    assert a.artifact.hashes["data_sha256"] != b.artifact.hashes["data_sha256"]
    ducho_fast.extract(first)
    before = snapshot(tmp_path / "out")
    with pytest.raises(OutputError, match=r"other settings \(data_sha256: "):
        ducho_fast.extract(second)
    assert snapshot(tmp_path / "out") == before


def test_reduced_jpeg_decoding_end_to_end_and_kept_apart_from_full(
    tmp_path, store, resnet18_state_dict
):
    """``input.jpeg_decode: reduced``: each feature is the model's on the JPEG decoded at the
    reduced scale (small ones and PNGs as in full); full-decoding features are not resumed."""
    from tests.data.test_images import photo

    (tmp_path / "images").mkdir()
    sizes = {"big": (1000, 800), "mid": (400, 300), "small": (120, 100)}  # 1/8, 1/4, full
    for name, size in sizes.items():
        photo(tmp_path / "images" / f"{name}.jpg", size)
    photo(tmp_path / "images" / "png.png", (1000, 800))
    full = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    (exported,) = ducho_fast.export(full)
    ducho_fast.extract(full)
    before = snapshot(tmp_path / "out")
    with pytest.raises(OutputError, match=r"other settings \(jpeg_decode: "):
        ducho_fast.extract({**full, "input": {"jpeg_decode": "reduced"}})
    assert snapshot(tmp_path / "out") == before
    reduced = config_for(tmp_path, store, resnet18_state_dict, "reduced", reshape=[64, 64])
    reduced["input"] = {"jpeg_decode": "reduced"}
    assert ducho_fast.extract(reduced).runs[0].result.written == 4
    embedder = ducho_fast.load(exported.artifact.path)
    as_extract = ducho_fast.load(exported.artifact.path, input_options={"jpeg_decode": "reduced"})
    for name in [*sizes, "png"]:
        path = next((tmp_path / "images").glob(f"{name}.*"))
        file = Image.open(path)
        file.draft(None, (64, 64))
        (want,) = embedder.embed([file])
        got, other = (
            np.load(next((tmp_path / out).rglob(f"{name}.npy"))).reshape(-1)
            for out in ("reduced", "out")
        )
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(as_extract.embed([path])[0], want, rtol=1e-4, atol=1e-5)
        if name in ("big", "mid"):
            assert not np.allclose(got, other, rtol=1e-4, atol=1e-5), name
        else:
            np.testing.assert_array_equal(got, other)


def _inline_weights(artifact: Path) -> None:
    """Rewrite an artifact as ducho-fast wrote them before model.onnx.data: the weights
    inside model.onnx, and a manifest with that file's sha256 only."""
    import hashlib

    import onnx

    model = onnx.load(str(artifact / "model.onnx"))
    (artifact / "model.onnx.data").unlink()
    onnx.save(model, str(artifact / "model.onnx"))
    manifest = json.loads((artifact / "manifest.json").read_text())
    del manifest["data_sha256"]
    manifest["model_sha256"] = hashlib.sha256((artifact / "model.onnx").read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_an_artifact_with_the_weights_inside_the_graph_still_extracts(
    tmp_path, store, resnet18_state_dict
):
    """Older artifacts load and give the same features; once exported again, the features
    made with the old one are not resumed with the new one."""
    images(tmp_path / "images", 6)
    config = config_for(tmp_path, store, resnet18_state_dict, "new")
    (result,) = ducho_fast.export(config)
    ducho_fast.extract(config)
    _inline_weights(result.artifact.path)
    assert not (result.artifact.path / "model.onnx.data").exists()
    old = config_for(tmp_path, store, resnet18_state_dict, "old")
    (again,) = ducho_fast.export(old)
    assert again.reused  # valid as it is: not rewritten behind the user's back
    ducho_fast.extract(old)
    assert snapshot(tmp_path / "old") == snapshot(tmp_path / "new")
    ducho_fast.export(old, force=True)
    with pytest.raises(OutputError, match=r"other settings \(data_sha256: null -> "):
        ducho_fast.extract(old)


def test_changed_settings_are_refused_before_any_work(
    tmp_path, store, texts_tsv, minilm_dir, monkeypatch
):
    """...and --fresh replaces them; the earlier features it set aside are deleted before
    extract returns, however long deleting takes."""
    import shutil

    from typer.testing import CliRunner

    from ducho_fast.cli import app
    from ducho_fast.outputs import manifest as manifest_module

    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    entry = {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1}
    config = textual_config(tmp_path, entry, store)
    ducho_fast.export(config)
    ducho_fast.extract(config)
    before = snapshot(tmp_path / "out")
    again = ducho_fast.extract(config)
    assert again.runs[0].result.reused == 11 and again.runs[0].result.written == 0
    changed = textual_config(tmp_path, {**entry, "clear_text": True}, store)
    with pytest.raises(OutputError, match=r"other settings \(clear_text: false -> true\)"):
        ducho_fast.extract(changed)
    assert snapshot(tmp_path / "out") == before
    path = tmp_path / "changed.yml"
    path.write_text(yaml.safe_dump(changed))
    real_rmtree = shutil.rmtree

    def slow_rmtree(folder: Path, **kwargs: Any) -> None:
        time.sleep(0.5)
        real_rmtree(folder, **kwargs)

    monkeypatch.setattr(manifest_module.shutil, "rmtree", slow_rmtree)
    result = CliRunner().invoke(app, ["extract", str(path), "--fresh", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "11 written" in result.output
    folder = next((tmp_path / "out").rglob(MANIFEST_FILE)).parent
    assert len(list(folder.glob("*.npy"))) == 11 and not list(folder.glob(".tmp-*"))
    assert json.loads((folder / MANIFEST_FILE).read_text())["key"]["clear_text"] is True


def test_float16_squeezed_files(tmp_path, store, image_dir, resnet18_state_dict):
    (tmp_path / "images").symlink_to(image_dir)
    base = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    ducho_fast.export(base)
    ducho_fast.extract(base)
    half = {**base, "output": {"dtype": "float16", "squeeze": True}}
    half["visual"] = {"items": {**base["visual"]["items"], "output_path": "half"}}
    ducho_fast.extract(half)
    for name in ("B001", "B007"):
        full = np.load(tmp_path / "out/torch/resnet18/avgpool" / f"{name}.npy")
        small = np.load(tmp_path / "half/torch/resnet18/avgpool" / f"{name}.npy")
        assert full.shape == (1, 512) and small.shape == (512,) and small.dtype == np.float16
        np.testing.assert_allclose(small.astype(np.float32), full[0], rtol=1e-3, atol=1e-3)


def test_an_image_edited_in_place_is_embedded_again(tmp_path, store, resnet18_state_dict):
    """A feature is reused only if its input file was not modified after it was written: the
    resumed run ends with the files a fresh run writes on the edited images."""
    images(tmp_path / "images", 10)
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    ducho_fast.export(config)
    ducho_fast.extract(config)
    old = snapshot(tmp_path / "out")
    edited = write_image(tmp_path / "images" / "item3.jpg", size=(50, 50), seed=99)
    written = next((tmp_path / "out").rglob("item3.npy")).stat().st_mtime_ns
    os.utime(edited, ns=(written + 1000, written + 1000))  # coarse clocks: 1 us after it
    report = ducho_fast.extract(config)
    assert report.runs[0].changed == 1 and report.runs[0].result.written == 4  # its batch
    fresh = config_for(tmp_path, store, resnet18_state_dict, "fresh", reshape=[64, 64])
    ducho_fast.extract(fresh)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "fresh") != old
    again = ducho_fast.extract(config).runs[0]
    assert again.changed == 0 and again.result.reused == 10

    # Edited into a broken file: its stale feature goes, so no matrix row is made from it.
    (tmp_path / "images" / "item3.jpg").write_bytes(b"<html>")
    os.utime(tmp_path / "images" / "item3.jpg", ns=(written + 10**10, written + 10**10))
    broken = ducho_fast.extract(config)
    assert broken.runs[0].changed == 1 and broken.failed == 1
    assert not list((tmp_path / "out").rglob("item3.npy"))
    (ids,) = (tmp_path / "out").rglob("ids.txt")
    assert "item3" not in ids.read_text().split()


def test_an_image_changed_while_in_flight_is_embedded_again(tmp_path, store, resnet18_state_dict):
    """A file changed after it was read but before its feature was written has a modification
    time older than the feature's, as if it had not changed: the time it had when the run
    listed it is recorded, so the next run finds it. A copy onto a file system with whole
    seconds (its times floored) still counts as the same files."""
    images(tmp_path / "images", 10)
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    ducho_fast.export(config)
    ducho_fast.extract(config)
    written = next((tmp_path / "out").rglob("item3.npy")).stat().st_mtime_ns
    edited = write_image(tmp_path / "images" / "item3.jpg", size=(50, 50), seed=99)
    os.utime(edited, ns=(written - 1, written - 1))  # changed in flight: just before the write
    report = ducho_fast.extract(config)
    assert report.runs[0].changed == 1 and report.runs[0].result.written == 4  # its batch
    fresh = config_for(tmp_path, store, resnet18_state_dict, "fresh", reshape=[64, 64])
    ducho_fast.extract(fresh)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "fresh")

    for path in (tmp_path / "images").iterdir():  # as a copy onto exFAT or ext3 leaves them
        at = path.stat().st_mtime_ns // 10**9 * 10**9
        os.utime(path, ns=(at, at))
    again = ducho_fast.extract(config).runs[0]
    assert again.changed == 0 and again.result.reused == 10
    at = edited.stat().st_mtime_ns
    os.utime(edited, ns=(at - 10**9, at - 10**9))  # an older copy put back (rsync -t)
    assert ducho_fast.extract(config).runs[0].changed == 1


def test_a_file_rewritten_right_after_it_was_read_is_embedded_again(
    tmp_path, store, resnet18_state_dict, monkeypatch
):
    """The race itself: a reader decodes item3, then its file is rewritten; the run writes a
    feature of the old image after that, newer than the file. The next run embeds it again."""
    from ducho_fast.data import sources

    images(tmp_path / "images", 10)
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    config["runtime"] = {"readers": "threads"}  # the patched reader runs in this process
    ducho_fast.export(config)
    decode = sources.ImageLoader.decode

    def then_rewrite(self: Any, item: Any) -> Any:
        out = decode(self, item)
        if item.item_id == "item3":
            write_image(tmp_path / "images" / "item3.jpg", size=(50, 50), seed=99)
        return out

    monkeypatch.setattr(sources.ImageLoader, "decode", then_rewrite)
    ducho_fast.extract(config)
    monkeypatch.setattr(sources.ImageLoader, "decode", decode)
    feature = next((tmp_path / "out").rglob("item3.npy"))
    assert feature.stat().st_mtime_ns >= (tmp_path / "images" / "item3.jpg").stat().st_mtime_ns
    stale = feature.read_bytes()
    report = ducho_fast.extract(config)
    assert report.runs[0].changed == 1
    ducho_fast.extract(config_for(tmp_path, store, resnet18_state_dict, "fresh", reshape=[64, 64]))
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "fresh")
    assert feature.read_bytes() != stale


def test_a_text_edited_under_its_id_is_embedded_again(tmp_path, store, texts_tsv, minilm_dir):
    """Each feature folder records a digest of the text each feature was made from: a text
    edited in the TSV is embedded again (with its window, so the files are a fresh run's),
    and a rerun reuses everything. Features with no record get a warning instead."""
    tsv = tmp_path / "descriptions.tsv"
    tsv.write_bytes(texts_tsv.read_bytes())
    entry = {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1}
    config = textual_config(tmp_path, entry, store)
    ducho_fast.export(config)
    assert not ducho_fast.extract(config).warnings
    rows = tsv.read_text().splitlines()
    item, text = rows[3].split("\t", 1)
    rows[3] = f"{item}\t{text} Now in blue."
    tsv.write_text("\n".join(rows) + "\n")
    report = ducho_fast.extract(config)
    assert (report.runs[0].changed, report.runs[0].result.written) == (1, 11)
    assert not report.warnings
    fresh = textual_config(tmp_path, entry, store)
    fresh["textual"]["items"]["output_path"] = "fresh"
    ducho_fast.extract(fresh)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "fresh")
    again = ducho_fast.extract(config)
    assert (again.runs[0].changed, again.runs[0].result.written, again.warnings) == (0, 0, [])
    rows[3] = f"{item}\t   "  # emptied: its stale feature goes and the item fails
    tsv.write_text("\n".join(rows) + "\n")
    emptied = ducho_fast.extract(config)
    assert (emptied.runs[0].changed, emptied.failed) == (1, 1)
    assert not list((tmp_path / "out").rglob(f"{item}.npy"))
    assert ducho_fast.extract(config).runs[0].changed == 0  # a failure has nothing to reuse

    for record in (tmp_path / "out").rglob("ducho-fast.texts*.json"):
        record.unlink()  # features of an older ducho-fast, which kept no record
    later = time.time_ns() + 10**9
    os.utime(tsv, ns=(later, later))
    report = ducho_fast.extract(config)
    assert report.runs[0].result.reused == 10 and report.runs[0].changed == 0
    (warning,) = report.warnings
    assert f"{tsv} was modified after the 10 feature(s)" in warning and "--fresh" in warning
    # Still not known what made them: the warning stays until they are embedded again.
    assert len(ducho_fast.extract(config).warnings) == 1
    report = ducho_fast.extract(config, ["output.resume=false"])
    assert report.runs[0].result.written == 10
    assert not ducho_fast.extract(config).warnings


def test_changed_files_compares_each_input_file_with_its_record_or_its_feature(tmp_path):
    from ducho_fast.data.items import Item
    from ducho_fast.data.sources import ListedFiles, changed_files

    old, new = write_image(tmp_path / "old.jpg"), write_image(tmp_path / "new.jpg")
    os.utime(old, ns=(1000, 1000))
    os.utime(new, ns=(3000, 3000))
    items = [
        Item("old", "old.jpg", old),
        Item("new", "new.jpg", new),
        Item("gone", "gone.jpg", tmp_path / "gone.jpg"),  # the reader reports it
        Item("text", "d.tsv:2", "a text"),
        Item("fresh", "fresh.jpg", new),  # not written before
    ]
    files = ListedFiles.of(items)
    assert len(files) == 3 and files.get(2) is None and files.get(3) is None  # gone; a text
    listed = files.of_ids(items, {"old", "new", "fresh", "gone", "text"})
    assert files.of_ids(items, {"old", "gone"}) == {"old": listed["old"]}
    size = old.stat().st_size
    assert listed["fresh"] == listed["new"] == (new.stat().st_size, 3000)
    assert listed == {"old": (size, 1000), "new": listed["new"], "fresh": listed["new"]}
    written = {"old": 2000, "new": 2000, "gone": 2000, "text": 2000}
    # No record: modified after the feature was written.
    assert changed_files(listed, written, {}) == {"new"}
    assert changed_files(listed, {"new": 3000}, {}) == set()  # same time: not after
    # A record: not as it was listed then, whatever the feature's time.
    assert changed_files(listed, written, {"old": (size, 999), "new": listed["new"]}) == {"old"}
    assert changed_files(listed, written, {"old": (size + 1, 1000)}) == {"old", "new"}


def test_a_listed_file_is_the_same_only_as_it_was_or_floored_by_a_copy():
    from ducho_fast.data.sources import same_listed

    then = (100, 1_700_000_000_123_456_789)
    assert same_listed(then, then)
    assert not same_listed(then, (101, then[1]))
    assert not same_listed(then, (100, then[1] + 1))  # changed since
    assert not same_listed(then, (100, then[1] - 1))  # an older copy put back
    assert same_listed(then, (100, 1_700_000_000_000_000_000))  # exFAT, ext3: whole seconds
    odd = 1_700_000_001_000_000_000  # a whole second, not a whole 2 s
    assert not same_listed((100, odd + 1_123_456_789), (100, odd))
    assert not same_listed((100, odd + 10**9), (100, odd))
    even = odd + 10**9
    assert same_listed((100, even + 1_500_000_000), (100, even))  # FAT: 2 s
    assert not same_listed((100, even + 2 * 10**9), (100, even))
    # Listed in whole seconds already: one second back is an older copy, not a FAT floor.
    assert not same_listed((100, even + 10**9), (100, even))


def test_empty_and_missing_images_do_not_make_their_window_run_again(
    tmp_path, store, resnet18_state_dict
):
    """A zero-byte image (a failed download) or a dangling link fails without reading a
    byte, so a resumed run reports it again without running its window; once the file is
    there, its window runs."""
    folder = images(tmp_path / "images", 10)
    (folder / "item3.jpg").write_bytes(b"")
    (folder / "item9.jpg").unlink()
    (folder / "item9.jpg").symlink_to(tmp_path / "nowhere.jpg")
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    ducho_fast.export(config)
    first = ducho_fast.extract(config).runs[0].result
    assert first.written == 8 and [e.item_id for e in first.errors] == ["item3", "item9"]
    again = ducho_fast.extract(config).runs[0].result
    assert (again.written, again.reused) == (0, 8)
    assert [(e.item_id, e.reason) for e in again.errors] == [
        (e.item_id, e.reason) for e in first.errors
    ]
    write_image(folder / "item3.jpg", seed=3)
    fixed = ducho_fast.extract(config).runs[0].result
    assert fixed.written == 4 and [e.item_id for e in fixed.errors] == ["item9"]


def test_damaged_images_are_not_read_again_while_unchanged(tmp_path, store, resnet18_state_dict):
    """A damaged image (a saved error page, a cut download) has to be read to fail. The run
    records it with its stamp, so a resumed run fails it unread, without running its window,
    until the file changes (replaced, or only touched) or the decoding settings do."""
    folder = images(tmp_path / "images", 10)
    (folder / "item5.jpg").write_bytes(b"<html>404 Not Found</html>")
    whole = (folder / "item2.jpg").read_bytes()
    (folder / "item2.jpg").write_bytes(whole[: len(whole) // 2])  # truncated JPEG
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    ducho_fast.export(config)
    first = ducho_fast.extract(config).runs[0].result
    assert first.written == 8 and [e.item_id for e in first.errors] == ["item2", "item5"]
    reasons = [(e.item_id, e.reason) for e in first.errors]
    assert "truncated" in reasons[0][1] and "cannot identify" in reasons[1][1]
    again = ducho_fast.extract(config).runs[0].result
    assert (again.written, again.reused) == (0, 8)  # neither window ran
    assert [(e.item_id, e.reason) for e in again.errors] == reasons

    write_image(folder / "item5.jpg", seed=5)  # fixed: its window runs
    fixed = ducho_fast.extract(config).runs[0].result
    assert fixed.written == 4 and [e.item_id for e in fixed.errors] == ["item2"]
    os.utime(folder / "item2.jpg", ns=(time.time_ns(), time.time_ns()))  # touched: read again
    touched = ducho_fast.extract(config).runs[0].result
    assert (touched.written, [(e.item_id, e.reason) for e in touched.errors]) == (3, reasons[:1])
    assert ducho_fast.extract(config).runs[0].result.written == 0
    config["input"] = {"max_image_pixels": 10**7}  # decoded otherwise: read again
    other = ducho_fast.extract(config).runs[0].result
    assert (other.written, [e.item_id for e in other.errors]) == (3, ["item2"])
    fresh = ducho_fast.extract(config, ["output.resume=false"]).runs[0].result
    assert fresh.written == 9 and ducho_fast.extract(config).runs[0].result.written == 0


def test_shards_record_damaged_images_for_the_final_run(tmp_path, store, resnet18_state_dict):
    """Each shard records the damaged images of its windows; the final plain run fails them
    unread, so it runs no window, and its one record replaces the shards' records."""
    folder = images(tmp_path / "images", 12)
    for name in ("item1.jpg", "item6.jpg", "item10.jpg"):
        (folder / name).write_bytes(b"GIF89a garbage")
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    ducho_fast.export(config)
    shards = [ducho_fast.extract(config, shard=f"{i}/2").runs[0].result for i in range(2)]
    assert [e.item_id for s in shards for e in s.errors] == ["item1", "item10", "item6"]
    final = ducho_fast.extract(config).runs[0].result
    assert (final.written, final.reused) == (0, 9)
    assert [e.item_id for e in final.errors] == ["item1", "item6", "item10"]
    features = next(p.parent for p in (tmp_path / "out").rglob("item0.npy"))
    assert sorted(p.name for p in features.glob("ducho-fast.unreadable*")) == [
        "ducho-fast.unreadable.json"
    ]


def test_an_image_over_the_pixel_limit_is_not_read_again_until_the_limit_changes(
    tmp_path, store, resnet18_state_dict
):
    """Over input.max_image_pixels is as lasting as a damaged file while the limit (part of
    the decoding) stays: a resumed run fails it from the record; a higher limit reads it."""
    folder = images(tmp_path / "images", 8)
    write_image(folder / "item6.jpg", size=(300, 200), seed=6)
    config = config_for(tmp_path, store, resnet18_state_dict, "out", reshape=[64, 64])
    config["input"] = {"max_image_pixels": 50_000}
    ducho_fast.export(config)
    first = ducho_fast.extract(config).runs[0].result
    assert first.written == 7 and "over the limit of 50000" in first.errors[0].reason
    again = ducho_fast.extract(config).runs[0].result
    assert (again.written, [e.reason for e in again.errors]) == (0, [first.errors[0].reason])
    config["input"] = {"max_image_pixels": 100_000}
    raised = ducho_fast.extract(config).runs[0].result
    assert (raised.written, raised.errors) == (4, [])
