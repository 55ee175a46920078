from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.api import ERRORS_FILE
from ducho_fast.errors import DataError
from tests.conftest import (
    assert_said,
    resnet18_entry,
    textual_config,
    visual_config,
    write_image,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def messy_images(tmp_path: Path, image_dir: Path) -> Path:
    folder = tmp_path / "images"
    shutil.copytree(image_dir, folder)
    good = (folder / "B001.jpg").read_bytes()
    (folder / "C001.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (folder / "C002.png").write_text("this is not a png")
    (folder / "C003.jpg").write_bytes(b"")
    write_image(folder / "C004.png", size=(33, 17), mode="P")
    (folder / "readme.txt").write_text("not an input")
    (folder / "more").mkdir()  # a subfolder is not read, as in Ducho: counted, not embedded
    shutil.copy(folder / "B001.jpg", folder / "more" / "D001.jpg")
    return folder


def read_errors(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_bad_images_are_recorded_and_neighbours_extracted(
    tmp_path, store, messy_images, resnet18_state_dict
) -> None:
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=3), store)
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    run = report.runs[0]
    assert run.result.written == 11  # 10 demo images + the palette PNG
    assert sorted(e.item_id for e in run.result.errors) == ["C001", "C002", "C003"]
    reasons = [e.reason for e in run.result.errors]
    assert all("not a readable image" in r for r in reasons[:2])
    assert "the file is empty (0 bytes)" in reasons[2]
    assert report.failed == 3
    assert [p.name for p in report.ignored_files["visual.items"]] == ["readme.txt"]
    assert report.ignored_folders["visual.items"] == [messy_images / "more"]
    written = sorted(p.stem for p in (tmp_path / "out/torch/resnet18/avgpool").glob("*.npy"))
    assert written == [f"B{i:03d}" for i in range(1, 11)] + ["C004"]
    rows = read_errors(tmp_path / "out" / ERRORS_FILE)
    assert [r["item_id"] for r in rows] == ["C001", "C002", "C003"]
    assert not list((tmp_path / "out").rglob(".tmp-*"))


def test_a_batch_that_fails_to_stage_or_to_copy_back_loses_no_other_item(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """The device stage's failures (on CUDA: a copy to or from the GPU): a batch whose inputs
    cannot be built is run item by item on the model's thread; a batch whose outputs cannot
    be copied back fails its own items, named in the errors file, and a rerun extracts them."""
    from ducho_fast.runtime import pipeline
    from ducho_fast.runtime.embedder import Embedder

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=3), store)
    artifact = ducho_fast.export(config)[0].artifact.path
    batch_ids = threading.local()  # the pipeline's batch that the embedder's call is for

    def watched(stage: Any) -> Any:
        def call(embedder: Any, batch: Any, *rest: Any) -> Any:
            batch_ids.ids = [item.item_id for item in batch.items]
            return stage(embedder, batch, *rest)

        return call

    def failing(method: Any, item_id: str) -> Any:
        def call(self: Embedder, value: Any, *rest: Any) -> Any:
            if item_id in getattr(batch_ids, "ids", ()):  # not the model thread's calls
                raise RuntimeError(f"{method.__name__} failed on the device")
            return method(self, value, *rest)

        return call

    monkeypatch.setattr(pipeline, "prepare", watched(pipeline.prepare))
    monkeypatch.setattr(pipeline, "collect", watched(pipeline.collect))
    monkeypatch.setattr(Embedder, "prepare_batch", failing(Embedder.prepare_batch, "B005"))
    monkeypatch.setattr(Embedder, "collect", failing(Embedder.collect, "B008"))
    run = ducho_fast.extract(config).runs[0]
    lost = ["B007", "B008", "B009"]  # B004-B006 ran item by item instead
    assert run.result.written == 7 and sorted(e.item_id for e in run.result.errors) == lost
    rows = read_errors(tmp_path / "out" / ERRORS_FILE)
    assert [r["item_id"] for r in rows] == lost
    reason = "copying the model's outputs back failed: RuntimeError: collect failed on the device"
    assert all(r["reason"] == reason for r in rows)

    monkeypatch.undo()
    again = ducho_fast.extract(config).runs[0].result
    assert again.written == 3 and again.reused == 7 and not again.errors
    files = sorted(image_dir.iterdir())
    expected = ducho_fast.load(artifact).embed(files)
    folder = tmp_path / "out/torch/resnet18/avgpool"
    for path, row in zip(files, expected, strict=True):
        np.testing.assert_allclose(np.load(folder / f"{path.stem}.npy")[0], row, atol=1e-5)


def test_blocks_and_configs_sharing_an_output_path_keep_each_others_failures(
    tmp_path, store, resnet18_state_dict, tiny_bert_dir
) -> None:
    """One errors file for two blocks of one config, then a config of one of them: each run
    writes its job's rows and leaves the other's; each manifest keeps its own config."""
    from tests.conftest import two_job_config

    both = two_job_config(tmp_path, store, resnet18_state_dict, tiny_bert_dir)
    both["textual"]["items"]["output_path"] = "out"  # the visual block's
    both["output"] = {"layouts": ["ducho"]}
    ducho_fast.export(both)
    report = ducho_fast.extract(both)
    assert report.failed == 2
    errors = tmp_path / "out" / ERRORS_FILE
    listed = [(r["job"], r["stage"], r["item_id"]) for r in read_errors(errors)]
    text_model = str(tiny_bert_dir)
    assert listed == [("visual.items", "resnet18", "img05"), ("textual.items", text_model, "t009")]

    text_only = {key: value for key, value in both.items() if key != "visual"}
    tsv = tmp_path / "descriptions.tsv"
    tsv.write_text(tsv.read_text().replace("t009\t \n", "t009\tfixed now\n"))
    again = ducho_fast.extract(text_only)
    result = again.runs[0].result
    assert again.failed == 0 and result.written == 32 and result.reused == 38  # t009's window
    listed = [(r["job"], r["stage"], r["item_id"]) for r in read_errors(errors)]
    assert listed == [("visual.items", "resnet18", "img05")]  # the other config's row stays
    resolved = {
        m.parent.name: json.loads(m.read_text())["resolved_config"]
        for m in (tmp_path / "out").rglob("ducho-fast.manifest.json")
    }
    assert "visual" in resolved["avgpool"] and "visual" not in resolved["pooler_output"]


def test_on_error_fail_stops_naming_the_item(
    tmp_path, store, messy_images, resnet18_state_dict
) -> None:
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    config["runtime"] = {"on_error": "fail"}
    ducho_fast.export(config)
    with pytest.raises(
        DataError, match=r"(?s)item .C00\d. \(\S+\): not a readable image.*on_error: skip"
    ):
        ducho_fast.extract(config)


def test_nan_outputs_are_bad_items(tmp_path, store, resnet18_state_dict) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "ok.png", size=(64, 64))
    from PIL import Image

    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "flat.png")  # minmax divides by 0
    config = visual_config(
        tmp_path, resnet18_entry(resnet18_state_dict, preprocessing="minmax"), store
    )
    ducho_fast.export(config)
    run = ducho_fast.extract(config).runs[0]
    assert run.result.written == 1
    assert [(e.item_id, e.reason) for e in run.result.errors] == [
        ("flat", "the model returned NaN or infinite values")
    ]


@pytest.mark.parametrize("writers", [1, 3])
def test_ctrl_c_as_the_run_ends_still_writes_every_feature_queued(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch, ctrl_c, writers
) -> None:
    """Ctrl-C that lands while the main thread waits for the writer (the models are done,
    features are still being written) stops the run only once every queued feature is
    written. Before, the KeyboardInterrupt broke out of that wait: the command said it had
    stopped while the writer went on, and the interpreter's exit ended it mid-queue."""
    import signal

    from ducho_fast.runtime import pipeline

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=4), store)
    config["runtime"] = {"writers": writers}
    ducho_fast.export(config)
    ids = sorted(p.stem for p in image_dir.iterdir())
    real = pipeline.write_checked

    def slow_last(write: Any, item: Any, out: Any) -> str | None:
        if item.item_id == ids[-1]:  # a slow disk; Ctrl-C once the models are done
            main = threading.main_thread().ident or 0
            threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
            time.sleep(0.6)
        return real(write, item, out)

    monkeypatch.setattr(pipeline, "write_checked", slow_last)
    with pytest.raises(KeyboardInterrupt):
        ducho_fast.extract(config)
    written = sorted(p.stem for p in (tmp_path / "out/torch/resnet18/avgpool").glob("*.npy"))
    assert written == ids


def test_same_outputs_for_any_batch_size_and_worker_count(
    tmp_path, store, image_dir, resnet18_state_dict
) -> None:
    results = []
    for batch_size, workers in [(1, 1), (3, 2), (32, 4)]:
        data = tmp_path / f"run{batch_size}"
        data.mkdir()
        (data / "images").symlink_to(image_dir)
        config = visual_config(
            data, resnet18_entry(resnet18_state_dict, batch_size=batch_size), store
        )
        config["runtime"] = {"workers": workers, "prefetch": 1}
        ducho_fast.export(config)
        ducho_fast.extract(config)
        folder = data / "out/torch/resnet18/avgpool"
        results.append({p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))})
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for key in other:
            np.testing.assert_allclose(other[key], results[0][key], rtol=1e-5, atol=1e-6)


def test_text_items_bad_rows_and_padding_independence(tmp_path, store, minilm_dir) -> None:
    rows = [
        "item_id\tdescription",
        "a\tshort",
        "b\t" + "long text " * 60,
        "c\t   ",
        "d",
        "a\tdup",
        "../x\tescape",
        "e\tmedium length sentence here",
    ]
    (tmp_path / "descriptions.tsv").write_text("\n".join(rows) + "\n")
    model = {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "batch_size": 8,
    }
    config = textual_config(tmp_path, model, store)
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    run = report.runs[0]
    assert run.result.written == 3
    assert {e.item_id: e.reason for e in run.result.errors} == {
        "c": "the text is empty",
        "d": "the row has no text column value",
    }
    bad_ids = {e.item_id: e.reason for e in report.input_errors["textual.items"]}
    assert "duplicate id" in bad_ids["a"] and "separator" in bad_ids["../x"]
    emb = ducho_fast.load(ducho_fast.export(config)[0].artifact.path)
    folder = tmp_path.joinpath("out", "sentence_transformers", *minilm_dir.parts[1:], "1")
    alone = emb.embed(["short"])  # unpadded, batch of one
    np.testing.assert_allclose(np.load(folder / "a.npy"), alone, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "x.npy").exists()


def test_unwritable_output_stops_with_a_clear_error(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    import errno

    from ducho_fast.errors import OutputError
    from ducho_fast.outputs.atomic import NpyFiles

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    ducho_fast.export(config)

    def disk_full(self: NpyFiles, path: Path, array: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NpyFiles, "save", disk_full)
    with pytest.raises(OutputError, match=r"cannot write .*B001\.npy: No space left on device"):
        ducho_fast.extract(config)


def test_a_file_name_the_output_file_system_refuses_fails_its_item_not_the_run(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    import errno

    from ducho_fast.outputs.atomic import NpyFiles
    from tests.outputs.test_ducho import refusing

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=4), store)
    ducho_fast.export(config)
    monkeypatch.setattr(NpyFiles, "save", refusing({"B003.npy": errno.EINVAL}))
    report = ducho_fast.extract(config)
    run = report.runs[0]
    assert run.result.written == 9
    assert [
        (e.item_id, "refuses the file name 'B003.npy'" in e.reason) for e in run.result.errors
    ] == [("B003", True)]
    folder = tmp_path / "out" / "torch" / "resnet18" / "avgpool"
    assert sorted(p.stem for p in folder.glob("*.npy")) == [
        f"B{i:03d}" for i in range(1, 11) if i != 3
    ]
    errors = read_errors(tmp_path / "out" / "ducho-fast.errors.tsv")
    assert [row["item_id"] for row in errors] == ["B003"]


def test_progress_counts_every_item_bad_ones_too(
    tmp_path, store, messy_images, resnet18_state_dict
) -> None:
    from contextlib import contextmanager

    ticks: list[int] = []

    @contextmanager
    def progress(label: str, total: int):
        ticks.append(-total)
        yield ticks.append

    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    ducho_fast.export(config)
    ducho_fast.extract(config, progress=progress)
    assert ticks[0] == -14 and sum(ticks[1:]) == 14


def test_progress_of_a_resumed_run_counts_only_what_it_embeds(
    tmp_path, store, image_dir, resnet18_state_dict
) -> None:
    """Items complete from an earlier run are named in the label, not counted by the bar:
    counting them would show a rate and a time left that the run never reaches."""
    from contextlib import contextmanager

    bars: list[tuple[str, int, list[int]]] = []

    @contextmanager
    def progress(label: str, total: int):
        ticks: list[int] = []
        bars.append((label, total, ticks))
        yield ticks.append

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    ducho_fast.export(config)
    first = ducho_fast.extract(config, progress=progress).runs[0].result
    n = first.written
    next(iter(sorted((tmp_path / "out").rglob("*.npy")))).unlink()
    again = ducho_fast.extract(config, progress=progress).runs[0].result
    (label1, total1, ticks1), (label2, total2, ticks2) = bars
    assert total1 == sum(ticks1) == n and "done before" not in label1
    assert total2 == sum(ticks2) == again.written == 2  # the window of the missing file
    assert again.reused == n - 2 and label2.endswith(f"({n - 2} of {n} done before)")
    done = ducho_fast.extract(config, progress=progress).runs[0].result
    assert done.reused == n and len(bars) == 2  # nothing to embed: no empty 0/0 bar


def test_staged_device_path_writes_the_same_files(
    tmp_path, store, messy_images, resnet18_state_dict, tiny_bert_dir, monkeypatch
) -> None:
    """io_binding: on runs the CUDA path's logic on the CPU: inputs staged by the reader,
    outputs fetched by the writer. Same files, same bad items, as the plain session path."""
    import threading

    from ducho_fast.runtime.binding import IOBinder
    from tests.conftest import npy_bytes, two_job_config

    threads: dict[str, set[str]] = {"stage": set(), "run": set(), "fetch": set()}
    for step in threads:
        real = getattr(IOBinder, step)

        def spy(self: Any, *args: Any, _real: Any = real, _step: str = step) -> Any:
            threads[_step].add(threading.current_thread().name)
            return _real(self, *args)

        monkeypatch.setattr(IOBinder, step, spy)
    written = []
    for mode in ("off", "on"):
        data = tmp_path / mode
        config = two_job_config(data, store, resnet18_state_dict, tiny_bert_dir)
        shutil.copytree(messy_images, data / "images", dirs_exist_ok=True)
        config["runtime"] = {"io_binding": mode, "prefetch": 2}
        ducho_fast.export(config)
        report = ducho_fast.extract(config)
        assert sorted(e.item_id for r in report.runs for e in r.result.errors) == [
            "C001",
            "C002",
            "C003",
            "img05",
            "t009",
        ]
        written.append(npy_bytes(data))
    assert len(written[0]) == 21 + 11 + 69 + 2 and written[0] == written[1]  # + 2 matrices
    # Three steps on three threads: the model's thread (main) only runs.
    main = threading.main_thread().name
    assert threads["run"] == {main}
    assert threads["stage"] and main not in threads["stage"]
    assert threads["fetch"] and main not in threads["fetch"]
    assert threads["stage"].isdisjoint(threads["fetch"])


def test_batches_hold_inputs_only_near_the_queue_however_long_the_window(
    tmp_path, store, resnet18_state_dict, tiny_bert_dir, monkeypatch
) -> None:
    """A text window is 16 batches; only those queued or running hold built (on CUDA:
    device-staged) inputs: prefetch + 1 at the reader, 1 running, prefetch + 1 at the writer."""
    import threading

    from ducho_fast.runtime import pipeline
    from tests.conftest import two_job_config

    live, peak, lock = [0], [0], threading.Lock()
    real_prepare, real_collect = pipeline.prepare, pipeline.collect

    def prepare(embedder: Any, batch: Any, *rest: Any) -> Any:
        prepared = real_prepare(embedder, batch, *rest)
        with lock:
            live[0] += prepared is not None
            peak[0] = max(peak[0], live[0])
        return prepared

    def collect(embedder: Any, batch: Any, ran: Any) -> Any:
        out = real_collect(embedder, batch, ran)
        with lock:
            live[0] -= batch.prepared is not None
        return out

    monkeypatch.setattr(pipeline, "prepare", prepare)
    monkeypatch.setattr(pipeline, "collect", collect)
    config = two_job_config(tmp_path / "data", store, resnet18_state_dict, tiny_bert_dir)
    config = {**config, "visual": None, "runtime": {"prefetch": 1}}
    del config["visual"]
    ducho_fast.export(config)
    report = ducho_fast.extract(config)
    assert report.runs[0].result.written == 69  # 35 batches of 2, in windows of 16
    assert live[0] == 0 and 2 <= peak[0] <= 2 * 1 + 3


def test_extract_sessions_sleep_while_readers_decode_images(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """``runtime.spin_wait: auto`` in extract: the image decoders share the CPUs, so the
    session's threads do not spin; ``on`` makes them."""
    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    ducho_fast.export(config)
    asked = _record_sessions(monkeypatch)
    ducho_fast.extract(config)
    ducho_fast.extract(config, ["runtime.spin_wait=on"])
    assert [spinning for _, spinning in asked] == [False, True]


def test_extract_creates_the_first_session_while_it_checks_and_reads(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """The first model's session is made once, in the background; a second model's when its
    turn comes. A session that fails there stops the run with its error: its items are not
    run one by one and reported as failed."""
    (tmp_path / "images").symlink_to(image_dir)
    first = resnet18_entry(resnet18_state_dict)
    config = visual_config(tmp_path, first, store)
    config["visual"]["items"]["model"].append({**first, "output_layers": ["layer3"]})
    ducho_fast.export(config)
    asked = _record_sessions(monkeypatch)
    report = ducho_fast.extract(config)
    assert [thread for thread, _ in asked] == ["ducho-session", "MainThread"]
    assert all(run.result.written > 0 and not run.result.errors for run in report.runs)

    from ducho_fast.runtime import session

    def failing(model: Path, options: Any, *, spinning: bool, lanes: int = 1) -> Any:
        raise RuntimeError("no session here")

    from ducho_fast.runtime import batches

    one_by_one: list[Any] = []

    def infer(*args: Any) -> list[Any]:
        one_by_one.append(args)
        return []

    monkeypatch.setattr(session, "make_session", failing)
    monkeypatch.setattr(batches, "infer", infer)
    with pytest.raises(RuntimeError, match="no session here"):
        ducho_fast.extract(config, ["output.resume=false"])
    assert not one_by_one


def _record_sessions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Each session an extract creates: the thread that made it and whether it spins."""
    from ducho_fast.runtime import embedder, session

    asked: list[tuple[str, bool]] = []
    real = session.make_session

    def recording(model: Path, options: Any, *, spinning: bool, lanes: int = 1) -> Any:
        asked.append((threading.current_thread().name, spinning))
        return real(model, options, spinning=spinning, lanes=lanes)

    monkeypatch.setattr(embedder, "make_session", recording)
    monkeypatch.setattr(session, "make_session", recording)
    return asked


def test_a_resumed_run_does_not_rerun_windows_whose_texts_fail_from_the_listing(
    tmp_path, store, resnet18_state_dict, tiny_bert_dir
) -> None:
    """A blank text fails whatever is read: its window is settled once its other items are
    complete. The resumed run embeds only the window that lost a file, reports every bad text
    in input order as before, and leaves the files as they were."""
    from ducho_fast.config.model import InputOptions
    from ducho_fast.data.items import FileStamp, Item
    from ducho_fast.data.sources import ImageLoader, TextLoader
    from ducho_fast.runtime.loading import Failed
    from ducho_fast.runtime.pipeline import settled
    from tests.conftest import npy_bytes, two_job_config

    config = two_job_config(tmp_path / "data", store, resnet18_state_dict, tiny_bert_dir)
    del config["visual"]
    tsv = tmp_path / "data" / "descriptions.tsv"
    rows = tsv.read_text().splitlines()
    rows[1 + 40] = "t040\tNaN"  # a second bad text, in the second window of 32
    tsv.write_text("\n".join(rows) + "\n")
    ducho_fast.export(config)
    first = ducho_fast.extract(config).runs[0].result
    assert [e.item_id for e in first.errors] == ["t009", "t040"] and first.written == 68
    before = npy_bytes(tmp_path / "data")
    next((tmp_path / "data").rglob("t001.npy")).unlink()
    again = ducho_fast.extract(config).runs[0].result
    assert again.written == 31 and again.reused == 68 - 31  # only the first window ran
    assert [(e.item_id, e.reason) for e in again.errors] == [
        (e.item_id, e.reason) for e in first.errors
    ]
    assert npy_bytes(tmp_path / "data") == before

    texts = TextLoader(clean=False)
    ok, blank = Item("a", "d.tsv:2", "text"), Item("b", "d.tsv:3", "  ")
    assert settled([ok, blank], {"a"}, texts) == [(blank, Failed("the text is empty"))]
    assert settled([ok, blank], set(), texts) is None  # "a" must be embedded
    assert settled([ok], {"a"}, texts) == []
    images = ImageLoader({}, InputOptions())
    gone, empty = tmp_path / "gone.jpg", tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    failed = settled([Item("g", "gone.jpg", gone), Item("e", "empty.jpg", empty)], set(), images)
    assert failed is not None and [(i.item_id, f.reason) for i, f in failed] == [
        ("g", f"{gone}: file not found."),
        ("e", f"{empty}: {EMPTY_FILE}"),
    ]
    # A damaged file must be read to fail (and may be fixed); a good one must be embedded.
    bad = Item("b", "bad.jpg", tmp_path / "bad.jpg")
    assert settled([bad], set(), images) is None
    good = Item("ok", "ok.jpg", write_image(tmp_path / "ok.jpg"))
    assert settled([good], set(), images) is None
    # ... unless an earlier run read it and recorded it unreadable, and it is the same file.
    stamp = FileStamp.of(bad.raw)
    images.unreadable = {("bad.jpg", stamp): "not a readable image (as before)."}
    assert settled([bad], set(), images) == [
        (bad, Failed("not a readable image (as before).", stamp))
    ]
    assert settled([good], set(), images) is None
    bad.raw.write_bytes(b"not a jpeg either")  # rewritten: another size and mtime
    assert settled([bad], set(), images) is None


EMPTY_FILE = (
    "the file is empty (0 bytes), as a copy or download that did not finish leaves one. "
    "Copy it again, or remove it."
)


def test_timing_says_where_the_model_threads_time_went(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """To the first batch, in the model, then waiting: a slow reader shows as waits for
    inputs, a slow writer as waits for the writer and as the last writes (those after the
    model's last batch); the manifest records them."""
    import json

    from ducho_fast.runtime import pipeline

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    # One lane: several split the waits among them (test_lanes checks their sum). One
    # writer: more would be added while it sleeps (test_writers checks that).
    config["runtime"] = {"prefetch": 1, "workers": 1, "concurrent_batches": 1, "writers": 1}
    ducho_fast.export(config)
    real_prepare, real_collect = pipeline.prepare, pipeline.collect

    def slow_prepare(embedder: Any, batch: Any, *rest: Any) -> Any:
        time.sleep(0.2)
        return real_prepare(embedder, batch, *rest)

    def slow_collect(embedder: Any, batch: Any, ran: Any) -> Any:
        time.sleep(0.2)
        return real_collect(embedder, batch, ran)

    def timed(patch: str, slow: Any) -> Any:
        with monkeypatch.context() as m:
            m.setattr(pipeline, patch, slow)
            result = ducho_fast.extract(config, ["output.resume=false"]).runs[0].result
        assert result.written == 10 and result.timing is not None  # 5 batches of 2
        t = result.timing
        spent = t.first_batch + t.model + t.inputs + t.writer + t.last_writes
        assert t.model > 0 and spent <= result.seconds
        return t

    reading = timed("prepare", slow_prepare)
    assert reading.first_batch >= 0.2
    assert reading.inputs >= 0.4 > reading.writer  # 4 more batches, each read in 0.2 s
    assert reading.last_writes < 0.2
    writing = timed("collect", slow_collect)
    assert writing.writer >= 0.4 > writing.inputs  # 5 batches, each written in 0.2 s
    assert writing.last_writes >= 0.2  # the last batch at least, written after the model's end
    assert writing.writer_cpu < 0.5  # the writer waited (slept): no CPU used

    def busy_collect(embedder: Any, batch: Any, ran: Any) -> Any:
        end = time.thread_time() + 0.1
        while time.thread_time() < end:  # 0.1 s of the writer thread's own CPU per batch
            pass
        return real_collect(embedder, batch, ran)

    assert timed("collect", busy_collect).writer_cpu >= 0.5  # 5 batches
    writing = timed("collect", slow_collect)
    manifest = json.loads(
        (tmp_path / "out/torch/resnet18/avgpool/ducho-fast.manifest.json").read_text()
    )
    assert manifest["seconds_waiting_for_writer"] == round(writing.writer, 3)
    assert manifest["seconds_in_model"] == round(writing.model, 3)
    assert manifest["seconds_to_first_batch"] == round(writing.first_batch, 3)
    assert manifest["writer_cpu_seconds"] == round(writing.writer_cpu, 3)
    assert manifest["seconds_of_last_writes"] == round(writing.last_writes, 3) >= 0.2


def test_warm_up_is_how_much_longer_the_first_batch_ran_than_the_later_ones_mean() -> None:
    from ducho_fast.runtime.stages import warm_up

    assert warm_up(1.0, 1.0, 1) is None  # one batch: nothing to compare it with
    assert warm_up(1.0, 1.4, 5) == pytest.approx(0.9)  # 1.0 s against 0.1 s
    assert warm_up(0.05, 0.45, 5) == 0.0  # faster than the later ones (shorter texts)


def test_a_first_batch_that_runs_longer_than_the_later_ones_is_measured_and_said(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """A session's first run can do work the later ones reuse (on CUDA, cuDNN's search for
    each convolution's algorithm): how much longer each lane's first batch ran than its later
    ones, the lanes' mean, is in the timing, the manifest and the summary."""
    from typer.testing import CliRunner

    from ducho_fast.cli import app
    from ducho_fast.runtime import embedder as embedder_module

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    config["runtime"] = {"concurrent_batches": 2, "threads": 2}
    ducho_fast.export(config)
    real_launch = embedder_module.Embedder.launch
    lanes_seen: set[int] = set()

    def launch(self: Any, prepared: Any, lane: int = 0) -> Any:
        if lane not in lanes_seen:  # each lane's first batch
            lanes_seen.add(lane)
            time.sleep(0.8)
        return real_launch(self, prepared, lane)

    monkeypatch.setattr(embedder_module.Embedder, "launch", launch)
    t = ducho_fast.extract(config).runs[0].result.timing  # 5 batches of 2 on 2 lanes
    assert t is not None and t.lanes == 2 and lanes_seen == {0, 1}
    assert (
        t.warm_up is not None and 0.6 <= t.warm_up <= 1.5
    )  # 0.8 s, and the real first run's own (0.03-0.13 s here)
    manifest = json.loads(
        (tmp_path / "out/torch/resnet18/avgpool/ducho-fast.manifest.json").read_text()
    )
    assert manifest["seconds_first_batch_ran_longer"] == round(t.warm_up, 3)

    monkeypatch.setattr(embedder_module.Embedder, "launch", real_launch)
    quick = ducho_fast.extract(config, ["output.resume=false"]).runs[0].result.timing
    assert quick is not None and quick.warm_up is not None and quick.warm_up < 0.5
    # one batch: no later one to compare the first with, so how much longer it ran is unknown
    one_batch = ["output.resume=false", "visual.items.model.0.batch_size=16"]
    single = ducho_fast.extract(config, one_batch).runs[0].result.timing
    assert single is not None and single.warm_up is None
    manifest = json.loads(
        (tmp_path / "out/torch/resnet18/avgpool/ducho-fast.manifest.json").read_text()
    )
    assert "seconds_first_batch_ran_longer" in manifest
    assert manifest["seconds_first_batch_ran_longer"] is None

    path = tmp_path / "config.yml"
    path.write_text(json.dumps(config))
    lanes_seen.clear()
    monkeypatch.setattr(embedder_module.Embedder, "launch", launch)
    assert_said(
        CliRunner().invoke(app, ["extract", str(path), "--fresh", "--no-progress"]),
        r"\(first batch after \d+\.\ds, which ran (0\.[6-9]|1\.[0-4])s longer than the later "
        r"ones\)",
    )
    monkeypatch.setattr(embedder_module.Embedder, "launch", real_launch)
    once = ["extract", str(path), "--fresh", "--no-progress", "--set", one_batch[1]]
    assert_said(CliRunner().invoke(app, once), r"\(first batch after \d+\.\ds\); then waited")


def test_the_next_window_is_read_while_this_ones_batches_wait(
    tmp_path, store, minilm_dir, monkeypatch
) -> None:
    """Windows of 3 batches, a queue of 1, one batch at a time: while the model runs the
    first batch and the third waits for room, the readers tokenize the second window. Read
    one window after the other, they would wait for the model first."""
    from ducho_fast.runtime import batcher as batcher_module
    from ducho_fast.runtime import embedder as embedder_module

    rows = [f"t{i:03d}\ta lamp with {i} brightness levels" for i in range(24)]
    (tmp_path / "descriptions.tsv").write_text("item_id\tdescription\n" + "\n".join(rows) + "\n")
    model = {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "batch_size": 4,
    }
    config = textual_config(tmp_path, model, store)
    config["runtime"] = {"concurrent_batches": 1, "prefetch": 1, "sort_window": 3}
    ducho_fast.export(config)
    windows_read: list[str] = []  # the first text of each window tokenized
    real_tokenize, real_launch = batcher_module.Batcher.tokenize, embedder_module.Embedder.launch
    ahead: list[bool] = []

    def tokenize(self: Any, payloads: Any) -> Any:
        if payloads and isinstance(payloads[0], str):  # a window's texts, not a batch's tokens
            windows_read.append(payloads[0])
        return real_tokenize(self, payloads)

    def launch(self: Any, prepared: Any, lane: int = 0) -> Any:
        if not ahead:  # the first batch: wait (at most 10 s) for the second window's reading
            deadline = time.monotonic() + 10
            while len(windows_read) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            ahead.append(len(windows_read) >= 2)
        return real_launch(self, prepared, lane)

    monkeypatch.setattr(batcher_module.Batcher, "tokenize", tokenize)
    monkeypatch.setattr(embedder_module.Embedder, "launch", launch)
    report = ducho_fast.extract(config)
    assert report.runs[0].result.written == 24
    assert ahead == [True], windows_read
    assert len(windows_read) == 2


def test_image_windows_are_read_several_ahead_to_keep_the_workers_busy(
    tmp_path, store, resnet18_state_dict, monkeypatch
) -> None:
    """Images come in windows of one batch. With 2 workers and batches of 2, 8 items ahead
    per worker are all 6 windows: every image is decoded while the model holds its first
    batch (one window at a time, 4 of the 6 would be: the queued one, the one waiting for
    room, the one read ahead, and the first). The features are those of any other run."""
    from ducho_fast.data import sources
    from ducho_fast.runtime import embedder as embedder_module

    (tmp_path / "images").mkdir()
    for k in range(12):
        write_image(tmp_path / "images" / f"im{k:02d}.png", (20 + k, 16), seed=k)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    config["runtime"] = {"workers": 2, "prefetch": 1, "concurrent_batches": 1}
    ducho_fast.export(config)
    decoded: list[str] = []
    real_decode, real_launch = sources.ImageLoader.decode, embedder_module.Embedder.launch
    held: list[int] = []

    def decode(self: Any, item: Any) -> Any:
        out = real_decode(self, item)
        decoded.append(item.item_id)
        return out

    def launch(self: Any, prepared: Any, lane: int = 0) -> Any:
        if not held:  # the first batch: wait (at most 10 s) for every image's decoding
            deadline = time.monotonic() + 10
            while len(decoded) < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            held.append(len(decoded))
        return real_launch(self, prepared, lane)

    monkeypatch.setattr(sources.ImageLoader, "decode", decode)
    monkeypatch.setattr(embedder_module.Embedder, "launch", launch)
    report = ducho_fast.extract(config)
    assert report.runs[0].result.written == 12 and held == [12], decoded
    monkeypatch.undo()
    again = {**config, "runtime": {"workers": 1, "prefetch": 4}}
    again["visual"] = {"items": {**config["visual"]["items"], "output_path": "again"}}
    ducho_fast.extract(again)
    ours = sorted((tmp_path / "out").rglob("*.npy"))
    assert len(ours) == 12
    for file in ours:
        twin = tmp_path / "again" / file.relative_to(tmp_path / "out")
        assert twin.read_bytes() == file.read_bytes()


def test_how_many_windows_are_read_ahead() -> None:
    """Images: 8 items per worker, at least one window (on 2 CPUs with batches of 32: one, as
    before); texts and audio one window, whatever the workers."""
    from types import SimpleNamespace

    from ducho_fast.config.model import InputOptions
    from ducho_fast.data.sources import AudioLoader, ImageLoader, TextLoader
    from ducho_fast.runtime.pipeline import Pipeline

    image = ImageLoader({"resize": [8, 8]}, InputOptions())
    audio, text = AudioLoader({}, InputOptions()), TextLoader(clean=False)

    def ahead(loaders: list[Any], workers: int, window: int) -> int:
        pipeline = Pipeline.__new__(Pipeline)  # only what windows_ahead reads
        pipeline.members = [SimpleNamespace(loader=loader) for loader in loaders]  # type: ignore[misc]
        pipeline._opts = SimpleNamespace(workers=workers)  # type: ignore[assignment]
        pipeline._shared_window = window
        return pipeline.windows_ahead()

    assert ahead([image], 2, 32) == 1 and ahead([image], 16, 32) == 4
    assert ahead([image, image], 2, 2) == 8 and ahead([image], 1, 64) == 1
    assert ahead([text], 16, 2048) == 1 and ahead([text], 64, 4) == 1
    assert ahead([audio], 16, 8) == 1 and ahead([audio], 2, 1) == 1


def test_readers_take_cheap_items_in_slices_and_costly_ones_one_by_one() -> None:
    """A text window's thousands of rows go to the reader pool in a few slices, a batch of
    images one image per task; results keep the items' order, and an empty window (every
    item complete from an earlier run) sends nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from ducho_fast.runtime.pipeline import TASKS_PER_WORKER, map_in_slices

    tasks: list[int] = []

    class Counting(ThreadPoolExecutor):
        def map(self, fn, *iterables, **kwargs):
            parts = list(iterables[0])
            tasks.append(len(parts))
            return super().map(fn, parts, **kwargs)

    with Counting(2) as pool:
        texts = list(range(2048))
        assert map_in_slices(pool, lambda v: v * v, texts, 2) == [v * v for v in texts]
        assert tasks == [2 * TASKS_PER_WORKER]
        assert map_in_slices(pool, str, list(range(20)), 2) == [str(v) for v in range(20)]
        assert tasks[-1] == 20
        assert map_in_slices(pool, str, list(range(100)), 3) == [str(v) for v in range(100)]
        assert map_in_slices(pool, str, [], 2) == [] and tasks[-1] == 0


def test_a_smaller_last_batch_is_padded_where_the_session_pads_and_its_features_stay(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """On CUDA a new input shape re-runs cuDNN's search of every convolution: there the last,
    smaller batch of fixed-size images runs padded to the batch size (copies of its last
    image), and only its own rows are written. On the CPU nothing is padded."""
    from ducho_fast.runtime import embedder as embedder_module

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=4), store)
    ducho_fast.export(config)
    real_launch = embedder_module.Embedder.launch
    rows: list[list[int]] = []

    def launch(self: Any, prepared: Any, lane: int = 0) -> Any:
        rows.append([len(next(iter(feeds.values()))) for _, feeds in prepared.parts])
        return real_launch(self, prepared, lane)

    monkeypatch.setattr(embedder_module.Embedder, "launch", launch)
    ducho_fast.extract(config)  # on the CPU: 10 images in batches of 4, 4 and 2
    assert sorted(rows) == [[2], [4], [4]]
    folder = tmp_path / "out/torch/resnet18/avgpool"
    plain = {p.name: np.load(p) for p in folder.glob("*.npy")}
    assert len(plain) == 10

    rows.clear()
    monkeypatch.setattr(embedder_module, "pads_last_batch", lambda *_: True)  # as on CUDA
    report = ducho_fast.extract(config, ["output.resume=false"])
    assert report.failed == 0 and sorted(rows) == [[4], [4], [4]]
    again = {p.name: np.load(p) for p in folder.glob("*.npy")}
    assert sorted(again) == sorted(plain)  # the padding's copies wrote nothing
    for name, feature in plain.items():
        np.testing.assert_array_equal(again[name], feature)
