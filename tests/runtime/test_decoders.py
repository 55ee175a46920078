"""Readers in processes (``runtime.readers``): the same decoded inputs, features and errors as
the reader threads, a file that kills its decoder process failing alone, and the processes
ended with the run."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.config.model import InputOptions
from ducho_fast.data.audio.audio import pyav_found
from ducho_fast.data.items import Item
from ducho_fast.data.sources import AudioLoader, ImageLoader, TextLoader
from ducho_fast.data.visual.images import heif_plugin, load_image
from ducho_fast.errors import ConfigError
from ducho_fast.runtime import decoders
from ducho_fast.runtime.decoders import DecoderPool, DecoderStartError
from ducho_fast.runtime.loading import Failed, load_each
from ducho_fast.runtime.pipeline import use_processes
from tests.conftest import (
    audio_config,
    npy_bytes,
    resnet18_entry,
    visual_config,
    write_image,
    write_tone,
)
from tests.runtime.crashing import ChattyLoader, CrashingLoader, HangingLoader

PRE = {"resize": [32, 32], "interpolation": "bicubic"}


def _images(folder: Path, names: list[str]) -> list[Item]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for k, name in enumerate(names):
        path = write_image(folder / f"{name}.jpg", (40 + 7 * k, 30 + 3 * k), seed=k)
        items.append(Item(name, str(path), path))
    return items


def _same(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for g_each, w_each in zip(got, want, strict=True):
        for g, w in zip(g_each, w_each, strict=True):
            if isinstance(w, Failed):
                assert g == w
            else:
                assert g.dtype == w.dtype and np.array_equal(g, w)


def test_processes_decode_as_the_threads_in_order(tmp_path: Path) -> None:
    items = _images(tmp_path, [f"im{k}" for k in range(9)])
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG at all")
    items.insert(4, Item("broken", str(tmp_path / "broken.jpg"), tmp_path / "broken.jpg"))
    # two models sharing the decode, with their own sizes; and an unreadable file
    small = ImageLoader(PRE, InputOptions())
    large = ImageLoader({**PRE, "resize": [48, 40]}, InputOptions())
    want = [load_each([small, large], item) for item in items]
    assert isinstance(want[4][0], Failed) and not isinstance(want[3][0], Failed)
    with DecoderPool(3) as pool:
        for per_task in (1, 4, len(items)):
            _same(pool.map([([small, large], item) for item in items], per_task), want)
        assert pool.restarts == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_a_worker_decodes_without_loading_onnxruntime(tmp_path: Path) -> None:
    # ONNX Runtime's library would cost a worker 46 MB and 0.1 s more here.
    items = _images(tmp_path, ["a", "b"])
    loader = ImageLoader(PRE, InputOptions())
    with DecoderPool(1) as pool:
        want = [load_each([loader], i) for i in items]
        _same(pool.map([([loader], item) for item in items], 1), want)
        (worker,) = pool._procs
        assert worker is not None
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
        assert "PIL" in maps and "onnxruntime" not in maps


def test_a_file_that_kills_its_decoder_fails_alone(tmp_path: Path) -> None:
    items = _images(tmp_path, ["a", "crash-here", "b", "c"])
    loader = CrashingLoader(PRE, InputOptions())
    plain = ImageLoader(PRE, InputOptions())
    with DecoderPool(1) as pool:
        got = pool.map([([loader], item) for item in items], per_task=4)  # one task
        assert pool.restarts == 2  # the task's worker, then the one that tried it alone
        (failed,) = got[1]
        assert isinstance(failed, Failed) and "decoder process died" in failed.reason
        assert "signal 11" in failed.reason and "check or remove it" in failed.reason
        for k in (0, 2, 3):
            _same([got[k]], [load_each([plain], items[k])])
        # the pool goes on with a new worker
        _same(pool.map([([loader], items[3])], 1), [load_each([plain], items[3])])


def test_what_a_decoder_prints_goes_to_stderr_not_into_the_results(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    items = _images(tmp_path, ["a", "b"])
    with DecoderPool(1) as pool:
        got = pool.map([([ChattyLoader(PRE, InputOptions())], item) for item in items], 1)
    _same(got, [load_each([ImageLoader(PRE, InputOptions())], item) for item in items])
    err = capfd.readouterr().err
    assert "python says a" in err and "C says b" in err


def test_a_loader_bug_in_a_worker_stops_the_run_with_its_traceback(tmp_path: Path) -> None:
    (item,) = _images(tmp_path, ["bug"])
    with DecoderPool(1) as pool, pytest.raises(RuntimeError) as raised:
        pool.map([([CrashingLoader(PRE, InputOptions())], item)], 1)
    assert "ValueError: a bug in a loader, not a bad file" in str(raised.value)
    assert "crashing.py" in str(raised.value)  # where, from the worker's traceback


def test_workers_that_cannot_start_say_so(tmp_path: Path) -> None:
    pool = DecoderPool(2, command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(DecoderStartError, match=r"ended before it was ready \(exit code 3\)"):
        pool.start()


def test_workers_do_not_import_from_the_folder_the_run_starts_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``python -c`` puts the current folder first on a worker's path: a numpy.py there
    # (or PIL, or another ducho_fast checkout) was what the worker imported.
    (item,) = _images(tmp_path / "images", ["a"])
    start = tmp_path / "start"
    start.mkdir()
    (start / "numpy.py").write_text("raise ImportError('the numpy.py of the current folder')\n")
    monkeypatch.chdir(start)
    loader = ImageLoader(PRE, InputOptions())
    with DecoderPool(1) as pool:
        _same(pool.map([([loader], item)], 1), [load_each([loader], item)])


def test_a_worker_has_the_path_of_the_process_that_starts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", "/somewhere/else", *sys.path[1:]])
    assert decoders.worker_path().split(os.pathsep)[:2] == [str(tmp_path), "/somewhere/else"]


def test_close_ends_every_worker(tmp_path: Path) -> None:
    (item,) = _images(tmp_path, ["a"])
    pool = DecoderPool(3)
    pool.start()
    procs = list(pool._procs)
    pool.map([([ImageLoader(PRE, InputOptions())], item)], 1)
    pool.close()
    assert all(p is not None and p.poll() == 0 for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit([([ImageLoader(PRE, InputOptions())], item)])


def test_close_ends_a_worker_stuck_on_a_file(tmp_path: Path) -> None:
    stuck, after = _images(tmp_path, ["hang-here", "after"])
    loader = HangingLoader(PRE, InputOptions())
    pool = DecoderPool(1)
    pool.start()
    (proc,) = pool._procs
    one = pool.submit([([loader], stuck)])
    two = pool.submit([([loader], stuck), ([loader], after)])
    time.sleep(0.5)  # the worker is inside the task
    began = time.monotonic()
    pool.close()
    assert time.monotonic() - began < 15 and proc is not None and proc.poll() is not None
    assert pool._procs == [None]  # not started again after the kill
    (failed,) = one.result(timeout=1)[0]  # the stuck item: failed, as a crash
    assert isinstance(failed, Failed) and "signal 9" in failed.reason
    with pytest.raises(RuntimeError, match="closed"):  # queued: not run by a new worker
        two.result(timeout=1)


def test_loaders_sent_to_workers_leave_the_unreadable_records_behind() -> None:
    loader = ImageLoader(PRE, InputOptions())
    loader.unreadable = {(f"/data/{k}.jpg", None): "bad" for k in range(1000)}  # type: ignore[misc]
    pool = DecoderPool(1)
    light = pool._strip(loader)
    assert isinstance(light, ImageLoader) and light.unreadable == {}
    assert light.preprocessing == loader.preprocessing
    assert len(loader.unreadable) == 1000  # the pipeline's own loader keeps them


def test_which_readers_run_in_processes() -> None:
    image, audio = ImageLoader(PRE, InputOptions()), AudioLoader({}, InputOptions())
    text = TextLoader(clean=False)
    assert use_processes("processes", [image]) and use_processes("processes", [audio, audio])
    assert not use_processes("processes", [text])  # texts: always threads
    assert not use_processes("threads", [image])


def _run(config: dict[str, Any], readers: str, output: str, section: str) -> Any:
    run = {**config, "runtime": {"readers": readers, "workers": 2}}
    run[section] = {"items": {**config[section]["items"], "output_path": output}}
    return ducho_fast.extract(run)


def _both_ways(
    config: dict[str, Any], section: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, list[int]]:
    """``config`` exported, then extracted with reader threads and with decoder processes
    (into ``threads/`` and ``processes/``): both reports, and the items of each call to the
    processes (:func:`_spy`)."""
    ducho_fast.export(config)
    calls = _spy(monkeypatch)
    threads = _run(config, "threads", "threads", section)
    return threads, _run(config, "processes", "processes", section), calls


def _written(report: Any) -> int:
    return sum(run.result.written for run in report.runs)


def _errors(report: Any) -> list[tuple[str, str]]:
    return [(e.item_id, e.reason) for run in report.runs for e in run.result.errors]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many items each :meth:`DecoderPool.map` call got: proof processes decoded them."""
    calls: list[int] = []
    original = DecoderPool.map

    def counted(self: DecoderPool, pairs: Any, per_task: int) -> list[Any]:
        calls.append(len(pairs))
        return original(self, pairs, per_task)

    monkeypatch.setattr(DecoderPool, "map", counted)
    return calls


def _image_job(
    tmp_path: Path, store: Path, image_dir: Path, weights: Path, broken: bytes | None = None
) -> dict[str, Any]:
    """A ResNet18 job (batches of 4) over a copy of the demo images, plus ``broken.jpg`` of
    ``broken`` bytes if given; exported."""
    shutil.copytree(image_dir, tmp_path / "images")
    if broken is not None:
        (tmp_path / "images" / "broken.jpg").write_bytes(broken)
    config = visual_config(tmp_path, resnet18_entry(weights, batch_size=4), store)
    ducho_fast.export(config)
    return config


def test_extract_with_processes_writes_what_threads_write(
    tmp_path: Path,
    store: Path,
    image_dir: Path,
    resnet18_state_dict: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _image_job(
        tmp_path, store, image_dir, resnet18_state_dict, b"\xff\xd8 not really a JPEG"
    )
    images = tmp_path / "images"
    calls = _spy(monkeypatch)
    threads = _run(config, "threads", "threads", "visual")
    assert calls == []
    processes = _run(config, "processes", "processes", "visual")
    assert sum(calls) == len(list(images.iterdir()))  # every file, the broken one too
    assert _written(threads) == _written(processes) == len(list(image_dir.iterdir()))
    assert _errors(processes) == _errors(threads) and [e[0] for e in _errors(threads)] == ["broken"]
    assert npy_bytes(tmp_path / "processes") == npy_bytes(tmp_path / "threads")
    assert len(npy_bytes(tmp_path / "threads")) == _written(threads)


@pytest.mark.skipif(heif_plugin() is None, reason="no HEIF plugin (the heif extra)")
def test_heic_photos_extract_in_threads_and_processes_as_their_pixels_do(
    tmp_path: Path, store: Path, resnet18_state_dict: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEIC files beside a PNG of the same decoded pixels: each reader registers the HEIF
    plugin (a decoder process its own), and a HEIC's features are its pixels' features."""
    from PIL import Image

    from tests.data.test_images import HEIC

    images = tmp_path / "images"
    images.mkdir()
    for name in ("tile.heic", "turned.heic"):
        (images / name).write_bytes((HEIC / name).read_bytes())
    Image.fromarray(load_image(images / "tile.heic", None)).save(images / "pixels.png")
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    threads, processes, calls = _both_ways(config, "visual", monkeypatch)
    assert sum(calls) == 3  # the processes decoded every file
    assert _written(threads) == _written(processes) == 3 and _errors(processes) == []
    files = npy_bytes(tmp_path / "threads")
    assert npy_bytes(tmp_path / "processes") == files
    by_id = {Path(name).stem: data for name, data in files.items()}
    assert by_id["tile"] == by_id["pixels"] and by_id["turned"] != by_id["tile"]


def test_no_more_decoder_processes_start_than_there_are_items(
    tmp_path: Path,
    store: Path,
    image_dir: Path,
    resnet18_state_dict: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """runtime.workers: 200 started 200 Python processes for 9 images (24 s)."""
    config = _image_job(tmp_path, store, image_dir, resnet18_state_dict)
    started: list[int] = []
    original = DecoderPool.start

    def counted(self: DecoderPool) -> None:
        started.append(self.workers)
        original(self)

    monkeypatch.setattr(DecoderPool, "start", counted)
    run = {**config, "runtime": {"readers": "processes", "workers": 50}}
    report = ducho_fast.extract(run)
    images = len(list((tmp_path / "images").iterdir()))
    assert started == [images] and 1 < images < 50
    assert _written(report) == images


@pytest.mark.skipif(not pyav_found(), reason="no PyAV (the m4a extra)")
def test_m4a_extracts_in_threads_and_processes_as_its_samples_do(
    tmp_path: Path, store: Path, tiny_wav2vec2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ALAC .m4a (lossless) beside a WAV of the same samples, and an AAC one: FFmpeg
    decodes in the reader threads and in decoder processes alike, and the .m4a's features are
    its samples' features."""
    import soundfile as sf

    from tests.data.test_audio import chirp, write_ffmpeg

    (tmp_path / "audio").mkdir()
    wave = chirp(0.6, 22050, channels=2)
    write_ffmpeg(tmp_path / "audio" / "lossless.m4a", wave, 22050, codec="alac")
    write_ffmpeg(tmp_path / "audio" / "lossy.m4a", wave, 22050)
    sf.write(str(tmp_path / "audio" / "samples.wav"), wave, 22050, subtype="FLOAT")
    model = {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers", "batch_size": 2}
    threads, processes, calls = _both_ways(
        audio_config(tmp_path, model, store), "audio", monkeypatch
    )
    assert sum(calls) == 3
    assert _written(threads) == _written(processes) == 3 and _errors(processes) == []
    files = npy_bytes(tmp_path / "threads")
    assert npy_bytes(tmp_path / "processes") == files
    by_id = {Path(name).stem: data for name, data in files.items()}
    assert by_id["lossless"] == by_id["samples"] != by_id["lossy"]


def test_audio_with_processes_writes_what_threads_write(
    tmp_path: Path, store: Path, tiny_wav2vec2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "audio").mkdir()
    for k in range(5):
        write_tone(tmp_path / "audio" / f"tone{k}.wav", 0.3 + 0.1 * k, freq=200.0 + 50 * k)
    (tmp_path / "audio" / "noise.wav").write_bytes(b"RIFF....WAVEfmt nothing more")
    model = {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers", "batch_size": 2}
    threads, processes, calls = _both_ways(
        audio_config(tmp_path, model, store), "audio", monkeypatch
    )
    assert sum(calls) == 6
    assert _written(threads) == _written(processes) == 5
    assert _errors(processes) == _errors(threads) and len(_errors(threads)) == 1
    assert npy_bytes(tmp_path / "processes") == npy_bytes(tmp_path / "threads")


def test_readers_that_cannot_start_stop_the_run_saying_why(
    tmp_path: Path,
    store: Path,
    image_dir: Path,
    resnet18_state_dict: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _image_job(tmp_path, store, image_dir, resnet18_state_dict)
    monkeypatch.setattr(decoders, "WORKER", "import sys; sys.exit(3)")
    with pytest.raises(ConfigError) as raised:
        _run(config, "processes", "asked", "visual")
    assert "runtime.readers: processes" in str(raised.value)
    assert "exit code 3" in str(raised.value) and "runtime.readers: threads" in str(raised.value)


def test_bad_readers_value_is_refused(tmp_path: Path, store: Path) -> None:
    config = visual_config(tmp_path, {"model_name": "resnet18"}, store)
    config["runtime"] = {"readers": "forks"}
    with pytest.raises(ConfigError) as raised:
        ducho_fast.extract(config)
    assert "runtime.readers" in str(raised.value) and "processes" in str(raised.value)


def test_worker_processes_do_not_outlive_a_stopped_run(
    tmp_path: Path, store: Path, image_dir: Path, resnet18_state_dict: Path
) -> None:
    config = _image_job(tmp_path, store, image_dir, resnet18_state_dict, b"nope")
    before = _children()
    run = {**config, "runtime": {"readers": "processes", "workers": 2, "on_error": "fail"}}
    with pytest.raises(Exception, match="broken"):
        ducho_fast.extract(run)
    assert _children() == before


def _children() -> set[int]:
    """This process's live child processes (Linux)."""
    me = str(os.getpid())
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found
