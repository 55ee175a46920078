"""Concurrent batches (``runtime.concurrent_batches``): lanes, their sessions and threads, the
same files whatever the lanes, failures in input order, a failing lane stopping the run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.config.model import RuntimeOptions
from ducho_fast.errors import DeviceError
from ducho_fast.runtime.session import batch_lanes, lanes_advice
from tests.conftest import audio_config, npy_bytes, textual_config, write_tone


@pytest.mark.parametrize(
    ("options", "lanes"),
    [
        (RuntimeOptions(device="cpu", threads=2), 2),  # one per thread
        (RuntimeOptions(device="cpu", threads=4), 4),
        (RuntimeOptions(device="cpu", threads=6), 3),  # the threads shared out evenly
        (RuntimeOptions(device="cpu", threads=16), 4),  # at most AUTO_MAX_LANES
        (RuntimeOptions(device="cpu", threads=5), 1),
        (RuntimeOptions(device="cpu", threads=16, concurrent_batches=8), 8),
        (RuntimeOptions(device="cpu", threads=4, concurrent_batches=2), 2),
        (RuntimeOptions(device="cpu", threads=3, concurrent_batches=8), 3),
        (RuntimeOptions(device="cpu", threads=4, io_binding="on"), 1),
        (RuntimeOptions(device="cuda", threads=4, concurrent_batches=2), 1),
        (RuntimeOptions(device="cuda:1", threads=4), 1),
    ],
)
def test_batch_lanes(options: RuntimeOptions, lanes: int) -> None:
    assert batch_lanes(options) == lanes


def test_batches_that_leave_threads_idle_are_pointed_out() -> None:
    advice = lanes_advice(RuntimeOptions(device="cpu", threads=6, concurrent_batches=4))
    assert advice == (
        "runtime.concurrent_batches is 4: 4 batches at once on 6 threads, 1 thread each, so 2 "
        "stay idle. Choose a number of batches that divides the threads, or 0 (automatic)."
    )
    assert "so 1 stays idle" in str(
        lanes_advice(RuntimeOptions(device="cpu", threads=7, concurrent_batches=2))
    )
    for fine in (
        RuntimeOptions(device="cpu", threads=6, concurrent_batches=3),
        RuntimeOptions(device="cpu", threads=6),  # automatic: always divides
        RuntimeOptions(device="cpu", threads=5, concurrent_batches=9),  # 5 lanes of one
        RuntimeOptions(device="cuda", threads=6, concurrent_batches=4),  # one batch at a time
    ):
        assert lanes_advice(fine) is None


def test_extract_warns_when_its_batches_leave_threads_idle(tmp_path, store, minilm_dir) -> None:
    (tmp_path / "descriptions.tsv").write_text("item_id\tdescription\nt1\ta lamp\n")
    config = _minilm_config(minilm_dir, tmp_path, store)
    ducho_fast.export(config)
    config["runtime"] = {"threads": 3, "concurrent_batches": 2}
    report = ducho_fast.extract(config)
    assert report.runs[0].result.written == 1
    assert report.warnings == [
        "runtime.concurrent_batches is 2: 2 batches at once on 3 threads, 1 thread each, so 1 "
        "stays idle. Choose a number of batches that divides the threads, or 0 (automatic)."
    ]
    config["runtime"] = {"threads": 3, "concurrent_batches": 3}
    assert ducho_fast.extract(config).warnings == []


def test_lanes_of_one_thread_share_a_session_and_wider_lanes_get_one_each(
    tmp_path, store, minilm_dir
) -> None:
    from ducho_fast.runtime.embedder import Embedder

    artifact = ducho_fast.export(_minilm_config(minilm_dir, tmp_path, store))[0].artifact
    shared = Embedder(artifact, RuntimeOptions(device="cpu", threads=3), lanes=3)
    sessions = shared._made().sessions
    assert shared.lanes == 3 and shared.info.threads == 1
    assert len(sessions) == 3 and all(s is sessions[0] for s in sessions)
    assert sessions[0].get_session_options().intra_op_num_threads == 1
    own = Embedder(artifact, RuntimeOptions(device="cpu", threads=4), lanes=2)
    first, second = own._made().sessions
    assert own.lanes == 2 and own.info.threads == 2 and first is not second
    assert [s.get_session_options().intra_op_num_threads for s in (first, second)] == [2, 2]
    alone = Embedder(artifact, RuntimeOptions(device="cpu", threads=4))
    assert alone.lanes == 1 and alone.info.threads == 4


def _minilm_config(minilm_dir: Path, data: Path, store: Path) -> Any:
    model = {
        "model_name": str(minilm_dir),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "batch_size": 4,
    }
    return textual_config(data, model, store)


@pytest.mark.slow
def test_concurrent_batches_write_the_same_files_and_list_failures_in_input_order(
    tmp_path, store, minilm_dir, monkeypatch
) -> None:
    """Three lanes of one thread each against one batch at a time: the same bytes in every
    file, and the failures, which lanes finish out of order (the first batch is slowed down
    here), listed in input order as a run of one lane lists them."""
    from ducho_fast.runtime import embedder as embedder_module
    from ducho_fast.runtime import pipeline

    rows = [f"t{i:03d}\t{'a warm wool sweater ' * (1 + i % 7)}" for i in range(40)]
    for i in (3, 17, 30):  # the only texts of 3 tokens, which the model fails on below
        rows[i] = f"t{i:03d}\tBAD"
    (tmp_path / "descriptions.tsv").write_text("item_id\tdescription\n" + "\n".join(rows) + "\n")
    config = _minilm_config(minilm_dir, tmp_path, store)
    ducho_fast.export(config)
    real_embedder_launch, real_launch = embedder_module.Embedder.launch, pipeline.launch
    lanes_seen: set[tuple[str, int]] = set()

    def failing(self: Any, prepared: Any, lane: int = 0) -> Any:
        if 3 in prepared.lengths:  # the batch fails; run item by item, "BAD" fails alone
            raise RuntimeError("the model cannot take this text")
        return real_embedder_launch(self, prepared, lane)

    def launch(embedder: Any, batch: Any, lane: int = 0) -> Any:
        if any(item.item_id == "t003" for item in batch.items):
            time.sleep(0.5)  # the batch of t003 finishes after those of t017 and t030
        lanes_seen.add((threading.current_thread().name, lane))
        return real_launch(embedder, batch, lane)

    monkeypatch.setattr(embedder_module.Embedder, "launch", failing)
    monkeypatch.setattr(pipeline, "launch", launch)
    results = {}
    for lanes in (1, 3):
        # Windows of one batch, so the bad texts land in three batches (0, 4 and 7).
        config["runtime"] = {"threads": lanes, "concurrent_batches": lanes, "sort_window": 1}
        config["textual"]["items"]["output_path"] = f"out{lanes}"
        lanes_seen.clear()
        run = _extract_within(config).runs[0].result
        results[lanes] = (npy_bytes(tmp_path / f"out{lanes}"), run.errors)
        assert {lane for _, lane in lanes_seen} == set(range(lanes))
        assert len({name for name, _ in lanes_seen}) == lanes  # each lane its own thread
        t = run.timing  # the lanes' mean waits and model time
        assert t is not None and t.first_batch > 0 and t.model > 0 and t.lanes == lanes
        (manifest,) = (tmp_path / f"out{lanes}").rglob("ducho-fast.manifest.json")
        assert json.loads(manifest.read_text())["concurrent_batches"] == lanes
        assert t.first_batch + t.model + t.inputs + t.writer <= run.seconds
    (files_one, errors_one), (files_three, errors_three) = results[1], results[3]
    assert len(files_one) == 37 and files_three == files_one
    assert [e.item_id for e in errors_three] == ["t003", "t017", "t030"]
    assert [(e.item_id, e.reason) for e in errors_three] == [
        (e.item_id, e.reason) for e in errors_one
    ]


def test_failures_are_listed_in_input_order_when_texts_run_by_length(
    tmp_path, store, minilm_dir, monkeypatch
) -> None:
    """One lane, one window of 40 texts batched shortest first: the long bad text (t002)
    runs after the short one (t020), and is still listed first."""
    from ducho_fast.runtime import embedder as embedder_module

    rows = [f"t{i:03d}\t{'a warm wool sweater ' * (1 + i % 7)}" for i in range(40)]
    rows[2] = "t002\t" + "BAD " * 11  # 13 tokens, a length no other text has
    rows[20] = "t020\tBAD"  # 3 tokens
    (tmp_path / "descriptions.tsv").write_text("item_id\tdescription\n" + "\n".join(rows) + "\n")
    config = _minilm_config(minilm_dir, tmp_path, store)
    config["runtime"] = {"threads": 1, "concurrent_batches": 1}
    ducho_fast.export(config)
    real_launch = embedder_module.Embedder.launch
    order: list[int] = []

    def failing(self: Any, prepared: Any, lane: int = 0) -> Any:
        bad = {3, 13} & set(prepared.lengths)
        if bad:  # the batch fails; run item by item, each bad text fails alone
            order.extend(sorted(bad))
            raise RuntimeError("the model cannot take this text")
        return real_launch(self, prepared, lane)

    monkeypatch.setattr(embedder_module.Embedder, "launch", failing)
    run = _extract_within(config).runs[0].result
    assert order[0] == 3  # the short text's batch ran first
    assert [e.item_id for e in run.errors] == ["t002", "t020"]
    assert run.written == 38


def test_a_failing_lane_stops_the_run_with_its_error(
    tmp_path, store, minilm_dir, monkeypatch
) -> None:
    """A lane other than the pipeline's own thread raises: the run stops with that error
    (nothing hangs waiting for it), and the items it wrote before stay written."""
    from ducho_fast.runtime import embedder as embedder_module

    rows = [f"t{i:03d}\ta lamp with {i} brightness levels" for i in range(64)]
    (tmp_path / "descriptions.tsv").write_text("item_id\tdescription\n" + "\n".join(rows) + "\n")
    config = _minilm_config(minilm_dir, tmp_path, store)
    config["runtime"] = {"threads": 2, "concurrent_batches": 2, "sort_window": 1}
    ducho_fast.export(config)
    real_launch = embedder_module.Embedder.launch
    calls = []

    def launch(self: Any, prepared: Any, lane: int = 0) -> Any:
        calls.append(lane)
        if lane == 1 and len(calls) > 4:
            raise DeviceError("the device went away")
        return real_launch(self, prepared, lane)

    monkeypatch.setattr(embedder_module.Embedder, "launch", launch)
    with pytest.raises(DeviceError, match="the device went away"):
        _extract_within(config)
    written = list((tmp_path / "out").rglob("t*.npy"))
    assert 0 < len(written) < 64
    for path in written:
        assert np.load(path).shape == (1, 384)


def _extract_within(config: dict[str, Any], seconds: float = 120) -> Any:
    """``ducho_fast.extract(config)``, failing the test if it has not ended in ``seconds``
    (lanes that wait for each other would hang the suite)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(ducho_fast.extract(config))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"extract still ran after {seconds} s: lanes hang"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_clean_up_runs_every_step_through_one_ctrl_c_and_raises_it_after() -> None:
    from ducho_fast.runtime.stages import finish

    done: list[str] = []
    tries = [0]

    def interrupted_once() -> None:
        tries[0] += 1
        if tries[0] == 1:
            raise KeyboardInterrupt
        done.append("a")

    with pytest.raises(KeyboardInterrupt):
        finish(interrupted_once, lambda: done.append("b"))
    assert done == ["a", "b"]

    def interrupted_always() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is not held back
        finish(interrupted_always, lambda: done.append("c"))
    assert done == ["a", "b"]
    tries[0] = 0
    with pytest.raises(KeyboardInterrupt):  # a clean-up for a Ctrl-C already on its way
        try:
            raise KeyboardInterrupt
        finally:
            finish(interrupted_once, lambda: done.append("d"))
    assert done == ["a", "b"]  # its first interruption is the second Ctrl-C: raised at once


def test_clips_of_other_lengths_are_batches_of_their_own_that_the_lanes_share_out(
    tmp_path, store, tiny_wav2vec2_dir, monkeypatch
) -> None:
    """Six clips, four lengths, in one window of batch_size 8: each length is a batch of its
    own (it runs alone anyway: clips are never padded together), so both lanes run them,
    where the whole window ran as one batch on one lane. The files are those of one lane."""
    from ducho_fast.runtime import pipeline

    seconds = [0.5, 0.7, 0.5, 0.9, 1.1, 0.7]
    (tmp_path / "audio").mkdir()
    for i, length in enumerate(seconds):
        write_tone(tmp_path / "audio" / f"c{i}.wav", seconds=length, freq=200.0 + 50 * i)
    model = {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers", "batch_size": 8}
    config = audio_config(tmp_path, model, store)
    ducho_fast.export(config)
    real_launch = pipeline.launch
    launched: list[tuple[int, list[str]]] = []

    def launch(embedder: Any, batch: Any, lane: int = 0) -> Any:
        launched.append((lane, [item.item_id for item in batch.items]))
        time.sleep(0.2)  # each batch outlasts the reading of the next: no lane finds none
        return real_launch(embedder, batch, lane)

    monkeypatch.setattr(pipeline, "launch", launch)
    files = {}
    for lanes in (1, 2):
        config["runtime"] = {"threads": lanes, "concurrent_batches": lanes}
        config["audio"]["items"]["output_path"] = f"out{lanes}"
        launched.clear()
        assert _extract_within(config).runs[0].result.written == 6
        files[lanes] = npy_bytes(tmp_path / f"out{lanes}")
        assert sorted(ids for _, ids in launched) == [["c0", "c2"], ["c1", "c5"], ["c3"], ["c4"]]
        assert {lane for lane, _ in launched} == set(range(lanes))
    assert len(files[1]) == 6 and files[2] == files[1]
