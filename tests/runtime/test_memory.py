"""runtime.memory_limit: the memory a process may take, the limit checked, and batches that run
out of it run in halves, losing no item."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.bench import bench
from ducho_fast.config.model import RuntimeOptions
from ducho_fast.config.options import limit_value
from ducho_fast.errors import ConfigError
from ducho_fast.runtime import memory
from ducho_fast.runtime.batches import Batch, infer, launch
from ducho_fast.runtime.embedder import Embedder
from ducho_fast.runtime.memory import MemorySplits
from tests.conftest import npy_bytes, resnet18_entry, visual_config

ARENA_FULL = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. "
    "Name:'/conv1/Conv' Status Message: /onnxruntime_src/onnxruntime/core/framework/"
    "bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, "
    "onnxruntime::Stream*) Available memory of 0 is smaller than requested bytes of 963379200"
)


class Tight:
    """An embedder whose model runs out of memory on batches of more than ``fits`` items, and
    fails on the item ``"bad"`` for another reason: the Embedder's own code around a model
    stand-in."""

    name = "tight"
    run_prepared = Embedder.run_prepared
    ran_out_of_memory = Embedder.ran_out_of_memory
    _say_out_of_memory = Embedder._say_out_of_memory

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.runs: list[int] = []
        self.memory_splits = MemorySplits()
        self.info = SimpleNamespace(memory_limit=2**30)

    def _run_whole(self, payloads: list[Any]) -> list[dict[str, np.ndarray]]:
        self.runs.append(len(payloads))
        if len(payloads) > self.fits:
            raise RuntimeError(ARENA_FULL)
        if "bad" in payloads:
            raise ValueError("not a number")
        return [{"x": np.array([float(p)])} for p in payloads]

    def launch(self, prepared: Any, lane: int = 0) -> Any:
        return self._run_whole(prepared)


def values(outputs: list[Any]) -> list[Any]:
    return [o if isinstance(o, str) else float(o["x"][0]) for o in outputs]


def test_a_batch_that_runs_out_of_memory_runs_in_halves_and_later_ones_skip_the_attempt(
    caplog,
) -> None:
    tight = Tight(fits=5)
    items = list(range(20))
    with caplog.at_level(logging.WARNING, "ducho_fast"):
        first = infer(tight, Batch([], items))  # type: ignore[arg-type]
    assert values(first) == items  # every item, in order
    assert tight.runs == [20, 10, 5, 5, 5, 5]  # 10 failed: its twin goes straight to halves
    assert (tight.memory_splits.too_big, tight.memory_splits.largest_part) == (10, 5)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("tight: a batch of 20 items ran out of memory within ")
    assert said.endswith("; batches this big now run in parts.")
    assert "(1.0 GiB)" in said and "Available memory of 0 is smaller than requested" in said
    assert "bfc_arena.cc" not in said

    tight.runs.clear()
    assert values(infer(tight, Batch([], items[:12]))) == items[:12]  # type: ignore[arg-type]
    assert tight.runs == [6, 3, 3, 3, 3]  # 12 is at least 10: halves at once; 6 is tried
    assert tight.memory_splits.too_big == 6
    assert values(infer(tight, Batch([], items[:4]))) == items[:4]  # type: ignore[arg-type]
    assert tight.runs[-1] == 4


def test_a_bad_item_in_a_part_fails_alone_and_a_single_item_too_big_says_why() -> None:
    tight = Tight(fits=4)
    out = infer(tight, Batch([], [1, 2, "bad", 4, 5, 6, 7, 8]))  # type: ignore[arg-type]
    assert values(out)[:2] == [1, 2] and values(out)[3:] == [4, 5, 6, 7, 8]
    assert "the model failed on this item: ValueError: not a number" in out[2]

    tight = Tight(fits=0)
    out = infer(tight, Batch([], [1, 2, 3]))  # type: ignore[arg-type]
    assert all("the model failed on this item" in o and "Available memory" in o for o in out)
    assert tight.memory_splits.largest_part == 0


def test_a_prepared_batch_that_runs_out_of_memory_goes_to_halves_without_a_second_try() -> None:
    tight = Tight(fits=3)
    batch = Batch([], [1, 2, 3, 4, 5, 6], prepared=[1, 2, 3, 4, 5, 6])  # type: ignore[arg-type]
    assert values(launch(tight, batch)) == [1, 2, 3, 4, 5, 6]  # type: ignore[arg-type]
    assert tight.runs == [6, 3, 3]

    # A batch of one item that runs out of memory (another lane's batch held it) fails
    # alone: later batches are not cut to single items for it.
    tight = Tight(fits=0)
    out = launch(tight, Batch([], [1], prepared=[1]))  # type: ignore[arg-type]
    assert "Available memory" in out[0]  # type: ignore[index]
    assert not tight.memory_splits.any


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        ("off", None),
        (False, None),
        ("8GB", 8 * 10**9),
        ("8 GiB", 8 * 2**30),
        ("1.5gib", int(1.5 * 2**30)),
        ("512MiB", 512 * 2**20),
        ("64MiB", 64 * 2**20),
    ],
)
def test_memory_limit_values(value: Any, expected: Any) -> None:
    assert limit_value(value, "c.yml") == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (8, r"c\.yml: key 'runtime\.memory_limit' is 8; use auto, off, or a size with its unit"),
        ("8", r"is '8'; use auto, off, or a size with its unit: 8GB, 8GiB"),
        (0, r"is 0; use auto, off"),
        (True, r"is True; use auto, off"),
        ("8TB", r"is '8TB'; use auto, off"),
        ("on", r"is 'on'; use auto, off"),
        ("-1GB", r"is '-1GB'; use auto, off"),
        ("60MB", r"is '60MB', under 64MiB: a model's activations for one item need more"),
    ],
)
def test_bad_memory_limits_name_the_key_and_the_forms(value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        limit_value(value, "c.yml")


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


MEMINFO = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"


@pytest.mark.parametrize(
    ("cgroup", "membership", "expected"),
    [
        ({}, "", 20000000 * 1024),  # no cgroups: MemAvailable
        (  # v2: the job's cgroup has 1 GB left; the slice above it 3 GB
            {
                "cgroup.controllers": "memory",
                "batch.slice/memory.max": "8000000000",
                "batch.slice/memory.current": "5000000000",
                "batch.slice/job/memory.max": "2000000000\n",
                "batch.slice/job/memory.current": "1000000000\n",
            },
            "0::/batch.slice/job\n",
            1000000000,
        ),
        (  # v2 without limits: MemAvailable
            {"cgroup.controllers": "", "memory.max": "max", "memory.current": "5"},
            "0::/\n",
            20000000 * 1024,
        ),
        (  # v1: the memory controller's hierarchy; its "no limit" is a huge number
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "memory/slurm/memory.limit_in_bytes": "4000000000",
                "memory/slurm/memory.usage_in_bytes": "1500000000",
            },
            "4:memory:/slurm\n3:cpu,cpuacct:/other\n",
            2500000000,
        ),
        (  # v2: the page cache of files read (its inactive part) is taken back: free
            {
                "cgroup.controllers": "",
                "memory.max": "16000000000",
                "memory.current": "15000000000",
                "memory.stat": "anon 3000000000\nfile 12000000000\ninactive_file 11000000000\n",
            },
            "0::/\n",
            12000000000,
        ),
        (  # v1: the same, from total_inactive_file
            {
                "memory/memory.limit_in_bytes": "4000000000",
                "memory/memory.usage_in_bytes": "3000000000",
                "memory/memory.stat": "cache 2000000000\ntotal_inactive_file 1500000000\n",
            },
            "4:memory:/\n",
            2500000000,
        ),
        (  # over its limit already: nothing left
            {"cgroup.controllers": "", "memory.max": "100", "memory.current": "200"},
            "0::/\n",
            0,
        ),
    ],
)
def test_available_memory_is_the_least_the_system_and_each_cgroup_above_leave(
    tmp_path: Path, cgroup: dict[str, str], membership: str, expected: int
) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    write(root, cgroup)
    write(tmp_path, {"meminfo": MEMINFO, "self-cgroup": membership})
    found = memory.available_memory(tmp_path / "meminfo", root, tmp_path / "self-cgroup")
    assert found == expected


def test_available_memory_is_unknown_without_proc_or_cgroups(tmp_path: Path) -> None:
    assert memory.available_memory(tmp_path / "none", tmp_path, tmp_path / "none") is None
    assert memory.auto_limit(8 * 2**30) == 6 * 2**30
    assert memory.auto_limit(2**20) == memory.AUTO_FLOOR


@pytest.mark.slow
def test_a_run_under_a_tight_limit_splits_its_batches_and_writes_the_same_features(
    tmp_path, store, image_dir, resnet18_state_dict, caplog
) -> None:
    """ResNet18 at 448 x 448 in batches of 10 needs more than 64 MiB for its activations:
    under that limit ONNX Runtime's arena refuses, the batches run in parts, and the files
    are those of a run without a limit, byte for byte."""
    (tmp_path / "images").symlink_to(image_dir)
    model = resnet18_entry(resnet18_state_dict, batch_size=10, reshape=[448, 448])
    config = visual_config(tmp_path, model, store)
    artifact = ducho_fast.export(config)[0].artifact.path
    free = ducho_fast.extract({**config, "runtime": {"memory_limit": "off"}})
    assert free.runs[0].result.written == 10 and not free.warnings
    expected = npy_bytes(tmp_path / "out")

    (tmp_path / "tight").symlink_to(image_dir)
    # One batch at a time: two single images at once may not fit in 64 MiB (the lanes' own
    # splitting is tested above, with a stand-in model).
    tight_config = {**config, "runtime": {"memory_limit": "64MiB", "concurrent_batches": 1}}
    tight_config["visual"]["items"] = {**config["visual"]["items"], "output_path": "tight_out"}
    tight_config["visual"]["items"]["input_path"] = "tight"
    with caplog.at_level(logging.WARNING, "ducho_fast"):
        tight = ducho_fast.extract(tight_config)
    assert tight.runs[0].result.written == 10 and tight.failed == 0
    assert npy_bytes(tmp_path / "tight_out") == expected
    (warning,) = tight.warnings
    said = re.fullmatch(
        r"visual\.items\.model\.0: batches of (\d+) items or more ran out of memory within "
        r"runtime\.memory_limit \(64 MiB\), and ran in parts of at most (\d+) items\. Set "
        r"batch_size: \2 for this model, which saves the attempts that failed, or raise "
        r"runtime\.memory_limit where the machine has the memory\.",
        warning,
    )
    assert said and 1 <= int(said[2]) < int(said[1]) <= 10, warning
    assert any("resnet18" in r.getMessage() for r in caplog.records)

    # bench times the session alone on the parts that fit, as many at once as extract runs.
    (benched,) = bench(tight_config, items=10, repeats=1).runs
    assert benched.items == 10 and benched.session_rate > 0

    # The embedding API runs its calls' batches in parts too.
    images = sorted(image_dir.iterdir())
    tight_api = ducho_fast.load(artifact, RuntimeOptions(memory_limit="64MiB"))
    free_api = ducho_fast.load(artifact, RuntimeOptions(memory_limit="off"))
    assert np.array_equal(tight_api.embed(images), free_api.embed(images))
    assert tight_api.memory_splits.any and not free_api.memory_splits.any


def test_the_shared_arena_is_registered_once_per_limit(monkeypatch) -> None:
    registered: list[int] = []
    monkeypatch.setattr(
        memory.ort,
        "create_and_register_allocator",
        lambda info, cfg: registered.append(cfg.max_mem),
    )
    monkeypatch.setattr(memory, "_REGISTERED", [])
    assert memory.use_limited_arena("off") is None
    assert memory.use_limited_arena("100MiB") == 100 * 2**20
    assert memory.use_limited_arena("100MiB") == 100 * 2**20
    assert memory.use_limited_arena("200MiB") == 200 * 2**20
    assert registered == [100 * 2**20, 200 * 2**20]
    monkeypatch.setattr(memory, "_AUTO", [])
    monkeypatch.setattr(memory, "available_memory", lambda: 4 * 2**30)
    assert memory.use_limited_arena("auto") == 3 * 2**30
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * 2**30)
    assert memory.use_limited_arena("auto") == 3 * 2**30  # worked out once a process
