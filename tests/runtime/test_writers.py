"""Several writer threads (``runtime.writers``): the same files as one, every item counted
once, bad items and a failing disk handled as with one writer."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.runtime import stages
from ducho_fast.runtime.pipeline import AUTO_WRITERS, writer_plan
from ducho_fast.runtime.stages import DONE, GROW_SPACING, Writers
from tests.conftest import resnet18_entry, visual_config


def test_writer_plan_is_the_setting_or_one_that_may_grow() -> None:
    assert writer_plan(0) == (1, AUTO_WRITERS) and AUTO_WRITERS > 1
    assert writer_plan(3) == (3, 3)
    assert writer_plan(1) == (1, 1)


class Clock:
    """Wall and CPU seconds, moved by hand."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def now(self) -> float:
        return self.wall

    def used(self) -> float:
        return self.cpu

    def tick(self, wall: float, cpus_busy: float) -> None:
        self.wall += wall
        self.cpu += wall * cpus_busy


def idle_drain(source: queue.Queue[Any], _: Any, stop: Any) -> None:
    while source.get() is not DONE:
        pass


def test_writers_grow_one_at_a_time_while_cpus_are_idle_up_to_the_most() -> None:
    writes: queue.Queue[Any] = queue.Queue()
    clock = Clock()
    writers = Writers(idle_drain, writes, None, cpus=4, wall=clock.now, cpu_time=clock.used)
    writers.start(1, 3)
    assert [t.name for t in writers.threads] == ["ducho-writer-0"]  # may grow: numbered
    clock.tick(GROW_SPACING / 2, cpus_busy=3.5)
    assert not writers.grow()  # too soon after the start
    clock.tick(2 * GROW_SPACING, cpus_busy=3.5)
    assert not writers.grow()  # 3.5 of 4 CPUs busy: another writer would take the model's
    clock.tick(2 * GROW_SPACING, cpus_busy=2.9)
    assert writers.grow()  # a CPU idle since the last look
    assert not writers.grow()  # no time has passed since
    clock.tick(2 * GROW_SPACING, cpus_busy=0.5)
    assert writers.grow()
    clock.tick(2 * GROW_SPACING, cpus_busy=0.5)
    assert not writers.grow()  # at the most
    assert [t.name for t in writers.threads] == [f"ducho-writer-{k}" for k in range(3)]
    assert writers.added == 2 and writers.is_alive()
    writers.end()
    writers.wait()
    assert writes.empty() and not writers.is_alive()  # each took its end mark


def test_no_writer_is_added_after_the_end_marks() -> None:
    """One added then would wait for an end mark that never comes."""
    writes: queue.Queue[Any] = queue.Queue()
    clock = Clock()
    writers = Writers(idle_drain, writes, None, cpus=4, wall=clock.now, cpu_time=clock.used)
    writers.start(1, 3)
    writers.end()
    clock.tick(2 * GROW_SPACING, cpus_busy=0.0)
    assert not writers.grow() and len(writers.threads) == 1
    writers.wait()


def test_on_one_cpu_a_writer_is_added_while_it_is_mostly_idle() -> None:
    """A job with one CPU writing to NFS: its writer waits, and the CPU is mostly idle."""
    writes: queue.Queue[Any] = queue.Queue()
    clock = Clock()
    writers = Writers(idle_drain, writes, None, cpus=1, wall=clock.now, cpu_time=clock.used)
    writers.start(1, 8)
    clock.tick(2 * GROW_SPACING, cpus_busy=0.8)
    assert not writers.grow()
    clock.tick(2 * GROW_SPACING, cpus_busy=0.3)
    assert writers.grow()
    writers.end()
    writers.wait()


def test_writers_of_a_set_count_never_grow() -> None:
    writes: queue.Queue[Any] = queue.Queue()
    clock = Clock()
    writers = Writers(idle_drain, writes, None, cpus=64, wall=clock.now, cpu_time=clock.used)
    writers.start(2)
    clock.tick(1.0, cpus_busy=0.0)
    assert not writers.grow() and len(writers.threads) == 2
    writers.end()
    writers.wait()


@pytest.mark.parametrize(("count", "most", "expected"), [(1, 8, 5), (1, 3, 3), (2, 2, 2)])
def test_writers_are_added_at_the_end_for_the_batches_left(count, most, expected) -> None:
    """The model done, more batches queued than writers (a slow file system, or a run too
    short to fill the queue): writers are added up to one a batch, within the most, whatever
    the CPUs did (the model no longer needs them); a set count stays as it is."""
    release = threading.Event()
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def slow_drain(source: queue.Queue[Any], _: Any, stop: Any) -> None:
        while (entry := source.get()) is not DONE:
            release.wait()
            with lock:
                taken.append((threading.current_thread().name, entry))

    writes: queue.Queue[Any] = queue.Queue()
    clock = Clock()  # the CPUs all busy: grow() would add none
    writers = Writers(slow_drain, writes, None, cpus=2, wall=clock.now, cpu_time=clock.used)
    writers.start(count, most)
    for k in range(6):
        writes.put(k)
    while writes.qsize() > 6 - count:  # each writer has taken a batch and waits in it
        time.sleep(0.001)
    clock.tick(1.0, cpus_busy=2.0)
    assert not writers.grow()
    writers.end()
    assert len(writers.threads) == expected and writers.added == expected - count
    assert not writers.grow()  # none after the end
    release.set()
    writers.wait()
    assert sorted(k for _, k in taken) == list(range(6))
    assert len({name for name, _ in taken}) == expected  # each writer took a batch


def test_busy_decoder_processes_count_as_busy_cpus(monkeypatch) -> None:
    """By default the CPU time read is the family's: child processes (decoder processes,
    ``runtime.readers: processes``) keeping both CPUs busy leave none idle for a writer,
    though this process itself only sleeps."""
    from ducho_fast.runtime import cpu

    def run(children_busy: float) -> bool:
        start = time.perf_counter()
        monkeypatch.setattr(
            cpu,
            "running_children_cpu_time",
            lambda *_: (time.perf_counter() - start) * children_busy,
        )
        writers = Writers(idle_drain, queue.Queue(), None, cpus=2)
        writers.start(1, 2)
        time.sleep(3 * GROW_SPACING)
        grew = writers.grow()
        writers.end()
        writers.wait()
        return grew

    assert run(children_busy=0.0)
    assert not run(children_busy=2.0)


@pytest.mark.slow
def test_a_lane_that_finds_the_writers_behind_adds_one(
    tmp_path, store, image_dir, resnet18_state_dict, monkeypatch
) -> None:
    """Through a real run: a writer slower than the model (a slow file system: it sleeps,
    leaving the CPUs idle) gets help; the files are the same as one writer's, and the
    summary says how many wrote them."""
    from ducho_fast.runtime import pipeline

    (tmp_path / "images").symlink_to(image_dir)
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict, batch_size=1), store)
    config["runtime"] = {"prefetch": 1}
    ducho_fast.export(config)
    folder = tmp_path / "out/torch/resnet18/avgpool"
    one = ducho_fast.extract(config, ["runtime.writers=1"]).runs[0].result
    assert one.timing is not None and (one.timing.writers, one.timing.writers_added) == (1, 0)
    alone = {p.name: p.read_bytes() for p in folder.glob("*.npy")}

    monkeypatch.setattr(stages, "GROW_SPACING", 0.0)
    monkeypatch.setattr(pipeline, "cpu_quota", lambda: 64)  # CPUs to spare
    real = pipeline.write_checked
    names: set[str] = set()

    def slow(write: Any, item: Any, out: Any) -> str | None:
        names.add(threading.current_thread().name)
        time.sleep(0.1)
        return real(write, item, out)

    monkeypatch.setattr(pipeline, "write_checked", slow)
    report = ducho_fast.extract(config, ["output.resume=false"])
    result = report.runs[0].result
    assert result.written == 10 and not result.errors
    assert result.timing is not None and result.timing.writers_added >= 1
    assert result.timing.writers == 1 + result.timing.writers_added <= AUTO_WRITERS
    assert len(names) >= 2  # the added writers took batches
    assert {p.name: p.read_bytes() for p in folder.glob("*.npy")} == alone


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


def test_the_summary_says_how_many_writers_wrote_and_how_many_were_added(capsys) -> None:
    from ducho_fast.console import _print_timing, _writers_in_words
    from ducho_fast.runtime.pipeline import RunResult
    from ducho_fast.runtime.stages import Timing

    timing = Timing(first_batch=0.1, model=1.0, writer=0.5, writer_cpu=0.2)
    _print_timing(RunResult(written=8, seconds=2.0, timing=timing))
    grown = Timing(first_batch=0.1, model=1.0, writer=0.5, writer_cpu=0.2, writers=3)
    _print_timing(RunResult(written=8, seconds=2.0, timing=replace(grown, writers_added=2)))
    _print_timing(RunResult(written=8, seconds=2.0, timing=grown))
    for last in (0.09, 0.4):  # the writes after the last batch, where they took a while
        _print_timing(RunResult(written=8, seconds=2.0, timing=replace(timing, last_writes=last)))
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].endswith("0.5s for the writer; the writer used 0.2s of CPU")
    assert lines[4].endswith(
        "0.5s for the writer, then 0.4s for the last writes; the writer used 0.2s of CPU"
    )
    assert lines[0].endswith("0.5s for the writer; the writer used 0.2s of CPU")
    assert lines[1].endswith(
        "; the 3 writer threads (2 added as they fell behind) used 0.2s of CPU"
    )
    assert lines[2].endswith("; the 3 writer threads used 0.2s of CPU")
    # bench names extract's writers in the same words
    assert _writers_in_words("its", 3, 2) == "its 3 writer threads (2 added as they fell behind)"
    assert _writers_in_words("its", 1, 0) == "the writer"
