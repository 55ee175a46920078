"""Several writer threads (``runtime.writers``): the same files as one, every item counted
once, bad items and a failing disk handled as with one writer."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.runtime.pipeline import CUDA_WRITERS, writer_count
from ducho_fast.runtime.stages import DONE, Writers
from tests.conftest import resnet18_entry, visual_config


def test_writer_count_is_the_setting_or_several_on_cuda_only() -> None:
    assert writer_count(0, ["CPUExecutionProvider"]) == 1
    assert writer_count(0, ["CUDAExecutionProvider"]) == CUDA_WRITERS > 1
    assert writer_count(0, ["CPUExecutionProvider", "CUDAExecutionProvider"]) == CUDA_WRITERS
    assert writer_count(3, ["CPUExecutionProvider"]) == 3
    assert writer_count(1, ["CUDAExecutionProvider"]) == 1


def test_a_failed_writer_stops_the_lanes_and_the_others_write_what_is_queued() -> None:
    writes: queue.Queue[Any] = queue.Queue()
    taken: list[tuple[str, Any]] = []
    first = threading.Event()

    def drain(source: queue.Queue[Any], _: Any, stop: Any) -> None:
        while (entry := source.get()) is not DONE:
            if entry == "bad":
                first.set()
                raise OSError("disk gone")
            time.sleep(0.01)
            taken.append((threading.current_thread().name, entry))

    writers = Writers(drain, writes, None)
    writers.start(3)
    assert [t.name for t in writers.threads] == [f"ducho-writer-{k}" for k in range(3)]
    assert writers.is_alive()
    writes.put("bad")
    first.wait(5)
    for k in range(6):
        writes.put(k)
    deadline = time.monotonic() + 5
    while writers.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not writers.is_alive()  # one of them failed: the lanes stop putting
    writers.end()
    writers.wait()
    assert sorted(entry for _, entry in taken) == list(range(6))  # the survivors wrote them
    failed = [t.name for t in writers.threads if t.error is not None]
    assert len(failed) == 1 and failed[0] not in {name for name, _ in taken}
    with pytest.raises(OSError, match="disk gone"):
        writers.reraise()


def test_one_writer_keeps_its_name_and_end_marks_one_per_writer() -> None:
    writes: queue.Queue[Any] = queue.Queue()
    ended: list[str] = []

    def drain(source: queue.Queue[Any], _: Any, stop: Any) -> None:
        while source.get() is not DONE:
            pass
        ended.append(threading.current_thread().name)

    alone = Writers(drain, writes, None)
    alone.start(1)
    assert [t.name for t in alone.threads] == ["ducho-writer"]
    alone.end()
    alone.wait()
    several = Writers(drain, writes, None)
    several.start(4)
    several.end()
    several.wait()
    assert len(ended) == 5 and writes.empty()  # each took one end mark
    never = Writers(drain, writes, None)  # a run that failed before its writers started
    assert not never.is_alive()
    never.end()
    never.wait()
    never.reraise()


@pytest.mark.slow
def test_several_writers_write_the_same_files_at_once(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """The same bytes as one writer; writes really overlap; every item counted and ticked
    once; the writers' CPU time is their sum."""
    from contextlib import contextmanager

    from ducho_fast.runtime import pipeline

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    ducho_fast.export(config)
    folder = tmp_path / "out/torch/resnet18/avgpool"
    one = ducho_fast.extract(config, ["runtime.writers=1"]).runs[0].result
    assert one.written == 10
    alone = {p.name: p.read_bytes() for p in folder.glob("*.npy")}

    real = pipeline.write_checked
    active, most, names = [0], [0], set()
    lock = threading.Lock()

    def slow(write: Any, item: Any, out: Any) -> str | None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            names.add(threading.current_thread().name)
        time.sleep(0.05)  # a slow file system
        end = time.thread_time() + 0.03
        while time.thread_time() < end:  # and some of each writer's own CPU
            pass
        with lock:
            active[0] -= 1
        return real(write, item, out)

    ticks: list[int] = []

    @contextmanager
    def progress(label: str, total: int):
        yield ticks.append

    monkeypatch.setattr(pipeline, "write_checked", slow)
    result = (
        ducho_fast.extract(config, ["runtime.writers=3", "output.resume=false"], progress=progress)
        .runs[0]
        .result
    )
    assert result.written == 10 and not result.errors and sum(ticks) == 10
    assert {p.name: p.read_bytes() for p in folder.glob("*.npy")} == alone
    assert most[0] >= 2 and names <= {f"ducho-writer-{k}" for k in range(3)}
    assert result.timing is not None and result.timing.writer_cpu >= 0.3  # 10 x 0.03 s


@pytest.mark.slow
def test_several_writers_record_bad_items_in_order_and_stop_on_a_full_disk(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    import errno

    from ducho_fast.errors import OutputError
    from ducho_fast.outputs.atomic import NpyFiles
    from tests.outputs.test_ducho import refusing

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=2), store)
    config["runtime"] = {"writers": 4}
    ducho_fast.export(config)
    names = {"B002.npy": errno.EINVAL, "B007.npy": errno.EINVAL, "B009.npy": errno.EINVAL}
    with monkeypatch.context() as m:
        m.setattr(NpyFiles, "save", refusing(names))
        run = ducho_fast.extract(config).runs[0]
    assert run.result.written == 7
    assert [e.item_id for e in run.result.errors] == ["B002", "B007", "B009"]
    folder = tmp_path / "out/torch/resnet18/avgpool"
    assert len(list(folder.glob("*.npy"))) == 7

    def disk_full(self: NpyFiles, path: Path, array: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NpyFiles, "save", disk_full)
    with pytest.raises(OutputError, match=r"cannot write .*\.npy: No space left on device"):
        ducho_fast.extract(config, ["output.resume=false"])
