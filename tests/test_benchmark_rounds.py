"""The benchmarks' side-by-side timing: systems alternate within rounds, ratios are paired."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    return _benchmark("common")


def test_each_round_runs_every_system_once_in_a_rotated_order(common):
    calls: list[str] = []

    def system(name: str) -> Callable[[], str]:
        def run() -> str:
            calls.append(name)
            return name

        return run

    systems = {name: system(name) for name in "abc"}
    seconds, values = common.rounds(4, systems)
    assert calls == list("abcbcacababc")
    assert {k: len(v) for k, v in seconds.items()} == {"a": 4, "b": 4, "c": 4}
    assert values == {"a": "a", "b": "b", "c": "c"}


def test_ratios_are_taken_within_rounds_not_across_them(common):
    # Within the rounds "fast" ran 4x, 1.5x and 1.2x faster; the best of each would say 3x
    # (3 s / 1 s) and the ratio of the medians 2x (4 s / 2 s).
    seconds = {"fast": [1.0, 2.0, 10.0], "slow": [4.0, 3.0, 12.0]}
    assert common.paired(seconds, "fast", "slow") == {"median": 1.5, "min": 1.2, "max": 4.0}
    assert common.median_rates(100, seconds) == {"fast": 50.0, "slow": 25.0}


def test_the_json_line_keeps_the_median_and_the_range(common):
    ratios = {"x": {"median": 1.23456, "min": 1.0, "max": 1.5}}
    assert common.ratio_summary(ratios) == {
        "ratios": {"x": 1.235},
        "ratio_ranges": {"x": [1.0, 1.5]},
    }


def test_the_json_line_names_the_cpu_model(common, tmp_path, capsys, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU 9000\n\n")
    assert common.cpu_model(cpuinfo) == "Some CPU 9000"
    flags = "flags\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU 9000\n{flags}\n")
    assert common.cpu_model(cpuinfo) == "Some CPU 9000 (avx2, avx512f, avx512_vnni)"
    monkeypatch.setattr(common.platform, "processor", lambda: "")
    assert common.cpu_model(tmp_path / "missing") == "unknown"
    monkeypatch.setattr(common, "cpu_model", lambda: "Some CPU 9000")
    common.report([("a", 2.0, "")], {"n": 1})
    lines = capsys.readouterr().out.splitlines()
    assert "on Some CPU 9000" in lines
    assert json.loads(lines[-1]) == {"n": 1, "cpu_model": "Some CPU 9000"}


def test_efficiency_factors_multiply_to_each_rounds_efficiency(common):
    from types import SimpleNamespace

    from ducho_fast.runtime.pipeline import RunResult, Timing

    def report(seconds: float, model: float) -> SimpleNamespace:
        result = RunResult(seconds=seconds, timing=Timing(model=model))
        return SimpleNamespace(runs=[SimpleNamespace(result=result)])

    # One round: bare 8 s; extract 10 s, of which the pipeline 9.5 s and the model 9 s.
    factors = common.efficiency_factors([report(9.5, 9.0)], [10.0], [8.0])
    assert factors == {"bare_vs_model": 0.889, "model_busy": 0.947, "pipeline_share": 0.95}
    product = factors["bare_vs_model"] * factors["model_busy"] * factors["pipeline_share"]
    assert abs(product - 8.0 / 10.0) < 1e-3
    recorded: list[int] = []
    call = common.recorded(lambda: len(recorded), recorded)
    assert [call(), call()] == [0, 1] and recorded == [0, 1]


def test_the_warm_up_is_the_median_rounds(common):
    from types import SimpleNamespace

    from ducho_fast.runtime.pipeline import RunResult, Timing

    reports = [
        SimpleNamespace(runs=[SimpleNamespace(result=RunResult(timing=Timing(warm_up=w)))])
        for w in (1.3, 0.2, 1.1)
    ]
    assert common.warm_up(reports) == pytest.approx(1.1)
    assert common.said_warm_up(1.1) == "extract's first batch ran 1.10 s longer than its later ones"
    # a round whose lanes each ran one batch tells nothing: the others' median, None if none
    reports[0].runs[0].result.timing = Timing(warm_up=None)
    assert common.warm_up(reports) == pytest.approx((0.2 + 1.1) / 2)
    assert common.warm_up(reports[:1]) is None
    assert common.said_warm_up(None) == (
        "no lane of extract ran a second batch to tell how much longer its first ran"
    )


def test_cpu_factors_multiply_to_each_rounds_efficiency(common):
    # Round 1: bare 8 s wall, 16 CPU s (2 CPUs busy); extract 10 s wall, 19 CPU s: it did
    # 3 s of work beside the model and left the CPUs idle 1 s of 20. Round 2 likewise, slower.
    split = common.cpu_factors([10.0, 20.0], [19.0, 38.0], [8.0, 16.0], [16.0, 32.0], 100)
    assert split == {"work": 0.842, "use": 0.95, "bare_cpu_ms": 240.0, "extract_cpu_ms": 285.0}
    assert abs(split["work"] * split["use"] - 8.0 / 10.0) < 1e-3


def test_rounds_keep_each_systems_cpu_seconds_when_asked(common):
    import threading
    import time

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def two_threads() -> None:  # CPU time of threads other than the caller's counts too
        others = [threading.Thread(target=spin, args=(0.1,)) for _ in range(2)]
        for t in others:
            t.start()
        for t in others:
            t.join()

    cpu: dict[str, list[float]] = {}
    seconds, _ = common.rounds(2, {"busy": two_threads, "idle": lambda: time.sleep(0.2)}, cpu)
    assert len(cpu["busy"]) == len(cpu["idle"]) == 2
    assert all(c >= 0.18 for c in cpu["busy"]), cpu
    assert all(c < 0.05 for c in cpu["idle"]), cpu
    assert all(s >= 0.2 for s in seconds["idle"])


def test_a_temporary_work_folder_goes_when_the_benchmark_exits(tmp_path) -> None:
    import subprocess
    import sys

    given = tmp_path / "kept"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import common; from pathlib import Path; "
        "t = common.work_folder(None, 'ducho-bench-test-'); (t / 'f').write_text('x'); "
        "k = common.work_folder(Path(sys.argv[2]), 'unused-'); (k / 'f').write_text('x'); "
        "print(t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(COMMON.parent), str(given)],
        capture_output=True,
        text=True,
        check=True,
    )
    temporary = Path(out.stdout.strip())
    assert temporary.name.startswith("ducho-bench-test-") and not temporary.exists()
    assert (given / "f").read_text() == "x"  # a folder the user named is kept


def test_the_file_saving_cost_is_measured_in_the_work_folder_and_leaves_nothing(
    common, tmp_path, monkeypatch
) -> None:
    """It saves files as extract's writer does (its NpyFiles), in a scratch folder inside the
    work folder, then removes that folder."""
    from ducho_fast.outputs.atomic import NpyFiles

    (tmp_path / "features").mkdir()
    saved: list[Path] = []
    save = NpyFiles.save

    def recording(self, path, array):
        saved.append(Path(path))
        save(self, path, array)

    monkeypatch.setattr(NpyFiles, "save", recording)
    ms = common.file_create_ms(tmp_path, files=8)
    assert ms > 0
    assert len(saved) == 8 and all(p.parent.parent == tmp_path for p in saved)
    assert [p.name for p in tmp_path.iterdir()] == ["features"]  # its scratch folder is gone


@pytest.mark.parametrize("lanes", [1, 3])
def test_bare_sessions_run_each_batch_once_on_every_lane(common, monkeypatch, lanes):
    """The bare session runs extract's batches as extract runs them: ``lanes`` at once, each
    lane on its own thread taking the next batch, every batch once per call."""
    import threading
    import time
    from types import SimpleNamespace

    import numpy as np

    from ducho_fast.runtime import embedder

    ran: list[tuple[int, int, str]] = []

    class Fake:
        def __init__(self, artifact, options, *, lanes):
            assert options.spin_wait == "on"
            self.lanes = lanes

        def launch(self, prepared, lane=0):
            ((idx, feeds),) = prepared.parts
            assert idx == list(range(len(feeds["x"])))
            time.sleep(0.01)  # so that every lane gets batches
            ran.append((int(feeds["x"][0]), lane, threading.current_thread().name))

    monkeypatch.setattr(embedder, "Embedder", Fake)
    feeds = [{"x": np.full(4, k)} for k in range(12)]
    run = common.bare_sessions(SimpleNamespace(modality="textual"), feeds, lanes=lanes)
    assert [k for k, _, _ in ran] == [0]  # the warm-up
    ran.clear()
    run()
    assert sorted(k for k, _, _ in ran) == list(range(12))
    assert {lane for _, lane, _ in ran} == set(range(lanes))
    assert len({name for _, _, name in ran}) == lanes


def test_each_extract_round_writes_into_a_new_folder(common, tmp_path):
    calls: list[tuple[Path, list[str]]] = []
    config = tmp_path / "c.yml"

    def extract(config: Path, overrides: list[str]) -> int:
        calls.append((config, overrides))
        return len(calls)

    runs = common.NewFolders(extract, config, "a.b", "f")
    assert runs.last is None
    assert [runs(), runs()] == [1, 2]
    first, second = (overrides[0] for _, overrides in calls)
    assert [c for c, _ in calls] == [config, config]
    assert first.startswith("a.b=f_") and first.endswith("_1") and second.endswith("_2")
    assert first[: -len("_1")] == second[: -len("_2")]  # one name, numbered
    assert runs.last == second.removeprefix("a.b=")
    other = common.NewFolders(lambda c, o: None, config, "a.b", "f")
    other()
    assert other.last != first.removeprefix("a.b=")  # another run's folders are others


def _benchmark(name: str):
    """A benchmark script as a module; the folder it puts on ``sys.path`` is taken off again."""
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", COMMON.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def test_cuda_comparisons_need_torch_and_onnx_runtime_both_on_the_gpu(common, monkeypatch):
    import torch

    from ducho_fast import doctor

    common.check_device("cpu")  # nothing to check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(SystemExit, match=r"torch sees no CUDA device.*; ONNX Runtime runs no"):
        common.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as stopped:
        common.check_device("cuda")
    assert "torch" not in str(stopped.value) and "onnxruntime-gpu" in str(stopped.value)
    # onnxruntime-gpu installed, but its sessions fall back to the CPU (no usable GPU)
    monkeypatch.setattr(
        doctor.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPU"]
    )
    monkeypatch.setattr(doctor, "probe", lambda provider: "CPUExecutionProvider")
    with pytest.raises(SystemExit, match="ONNX Runtime runs no real CUDA session"):
        common.check_device("cuda")
    monkeypatch.setattr(doctor, "probe", lambda provider: provider)
    common.check_device("cuda")


def test_bare_sessions_run_on_the_benchmarks_device(common, monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    from ducho_fast.runtime import embedder

    made: list[tuple[Any, int]] = []

    class Fake:
        def __init__(self, artifact, options, *, lanes):
            made.append((options, lanes))
            self.lanes = lanes

        def launch(self, prepared, lane=0):
            return None

    monkeypatch.setattr(embedder, "Embedder", Fake)
    feeds = [{"x": np.zeros(2)}]
    common.bare_sessions(SimpleNamespace(modality="textual"), feeds, lanes=1)
    common.bare_sessions(SimpleNamespace(modality="textual"), feeds, device="cuda")
    (cpu, _), (cuda, lanes) = made
    assert cpu.device == "cpu" and cuda.device == "cuda" and lanes == 1
    # never a silent fallback, and session.run on host batches: no I/O binding
    assert not cuda.allow_fallback and cuda.io_binding == "off"


def test_benchmark_configs_run_extract_on_the_benchmarks_device(tmp_path):
    import yaml

    text, visual, audio = _benchmark("text"), _benchmark("visual"), _benchmark("audio")
    from ducho_fast.runtime import openvino

    # bf16 beside int8 where OpenVINO's CPU plugin runs it in bfloat16 here
    bf16 = ("bf16",) if openvino.unusable() is None else ()
    assert text.precisions("cpu") == ("fp32", "int8", *bf16)
    assert text.precisions("cuda") == ("fp32", "fp16")
    for device in ("cpu", "cuda"):
        path = text.write_config(tmp_path, tmp_path / "m", "fp32", 8, device)
        runtime = yaml.safe_load(path.read_text())["runtime"]
        assert runtime == {"device": device, "allow_fallback": False}
        config = visual.config_for(tmp_path, [{}], "out", 8, device=device)
        assert config["runtime"] == {"device": device, "allow_fallback": False}
        path, _ = audio.write_config(tmp_path, {"model_name": "HUBERT_BASE"}, 9, 8, device)
        written = yaml.safe_load(path.read_text())
        assert written["runtime"] == config["runtime"]
        assert written["audio"]["items"]["model"] == [
            {"model_name": "HUBERT_BASE", "output_layers": [9], "batch_size": 8}
        ]


def test_the_capacity_clock_charges_each_threads_cpu_to_its_part_of_extract():
    import threading
    import time

    capacity = _benchmark("capacity")
    assert [capacity.group_of(n) for n in ("ducho-window_0", "ducho-decode_3", "ducho-reader")] == [
        "tokenize"
    ] * 3
    assert capacity.group_of("ducho-lane-1") == "lanes"
    assert capacity.group_of(None) == "library"
    assert capacity.group_of("Thread-7") == "other"

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    clock = capacity.ThreadClock()  # sampled by hand here: a busy machine delays its own
    before = clock.by_group()
    spun, release = threading.Event(), threading.Event()

    def work() -> None:
        spin(0.3)
        spun.set()
        release.wait()

    writer = threading.Thread(target=work, name="ducho-writer")
    writer.start()
    spun.wait()
    clock.sample()  # while it lives
    release.set()
    writer.join()
    after = clock.by_group()  # it has ended: its last sample still counts
    assert after["writer"] - before["writer"] >= 0.25
    assert after["lanes"] - before["lanes"] < 0.1  # nothing of the writer charged elsewhere


def _features(folder: Path, rows: dict[str, np.ndarray]) -> Path:
    """A features folder as extract writes it: one .npy per item and the matrix."""
    (folder / "matrix").mkdir(parents=True)
    for name, row in rows.items():
        np.save(folder / f"{name}.npy", row.reshape(1, -1).astype(np.float32))
    np.save(folder / "matrix" / "m.npy", np.stack(list(rows.values())).astype(np.float32))
    return folder


def test_scale_runs_must_write_the_same_features_as_one_process(tmp_path):
    scale = _benchmark("scale")
    rng = np.random.default_rng(0)
    rows = {str(i): rng.normal(size=8) for i in range(3)}
    local = _features(tmp_path / "local", rows)
    assert scale.compare(local, _features(tmp_path / "same", rows), 3, "cpu") == "identical"

    # One last-bit difference: refused on the CPU, where shards write the same bytes...
    nudged = {**rows, "1": np.nextafter(rows["1"].astype(np.float32), np.float32(9))}
    other = _features(tmp_path / "nudged", nudged)
    with pytest.raises(SystemExit, match="different files"):
        scale.compare(local, other, 3, "cpu")
    # ...allowed on CUDA, where each process may choose its own convolution algorithms,
    said = scale.compare(local, other, 3, "cuda")
    assert said.startswith("min cosine ") and 0.9999 <= float(said.split()[-1]) <= 1.0
    # but not a feature that is not the same.
    wrong = _features(tmp_path / "wrong", {**rows, "2": -rows["2"]})
    with pytest.raises(SystemExit, match="min cosine"):
        scale.compare(local, wrong, 3, "cuda")
    missing = _features(tmp_path / "missing", {k: rows[k] for k in ("0", "1")})
    with pytest.raises(SystemExit, match="different files"):
        scale.compare(local, missing, 3, "cuda")
    with pytest.raises(SystemExit, match=r"holds 4 \.npy files, not 5"):
        scale.compare(local, local, 4, "cpu")


def test_scale_takes_shard_counts_of_two_or_more():
    scale = _benchmark("scale")
    assert scale.parse_counts("2") == [2]
    assert scale.parse_counts("2,4") == [2, 4]
    for bad in ("1", "2,x", ""):
        with pytest.raises(SystemExit, match="--shards"):
            scale.parse_counts(bad)


def test_embed_benchmark_compares_features_exactly_on_the_cpu_and_by_cosine_on_cuda():
    embed = _benchmark("embed")
    a = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    nudged = a.copy()
    nudged[1, 3] = np.nextafter(nudged[1, 3], np.float32(9))
    assert embed.agree("cpu", a, a.copy()) == (True, "identical")
    assert embed.agree("cpu", a, nudged) == (False, "DIFFERENT")
    same, how = embed.agree("cuda", a, nudged)
    assert same and how.startswith("min cosine ")
    wrong = a.copy()
    wrong[2] = -wrong[2]
    assert embed.agree("cuda", a, wrong)[0] is False


def test_audio_clips_vary_as_asked_and_features_compare_clip_by_clip(tmp_path):
    import soundfile as sf

    audio = _benchmark("audio")
    paths = audio.write_clips(tmp_path, 8, (0.5, 1.5), seed=0)
    infos = [sf.info(str(p)) for p in paths]
    assert [p.suffix for p in paths] == [".wav", ".flac"] * 4
    assert [i.samplerate for i in infos] == [16000, 22050, 44100, 48000] * 2
    assert [i.channels for i in infos] == [1, 1, 2, 2] * 2
    assert all(0.5 <= i.frames / i.samplerate <= 1.5 for i in infos)
    assert len({round(i.frames / i.samplerate, 3) for i in infos}) == 8
    assert audio.write_clips(tmp_path, 2, (0.5, 1.5), seed=0) == paths[:2]  # none left over
    assert sorted(tmp_path.iterdir()) == paths[:2]
    a, b = np.ones((1, 3, 4)), np.arange(12.0).reshape(1, 3, 4)
    assert audio.least_cosine([a, a], [a, a]) == pytest.approx(1.0)
    cosine = float(b.sum() / (np.sqrt(12) * np.linalg.norm(b)))
    assert audio.least_cosine([a, a], [a, b]) == pytest.approx(cosine)  # the lesser of the two
    assert audio.least_cosine([a, a], [a, np.ones((1, 4, 4))]) == -1.0  # a frame more
    assert audio.least_cosine([a], [np.ones((1, 4, 3))]) == -1.0  # as many values


def test_visual_bf16_is_refused_off_the_cpu_and_skipped_for_a_refused_model(
    common, tmp_path, monkeypatch
):
    from ducho_fast import api
    from ducho_fast.errors import ParityError
    from ducho_fast.runtime import openvino

    visual = _benchmark("visual")
    with pytest.raises(SystemExit, match="CPU only"):
        common.check_bf16("cuda")
    monkeypatch.setattr(openvino, "unusable", lambda: "no plugin here")
    with pytest.raises(SystemExit, match="no plugin here"):
        common.check_bf16("cpu")
    exported: list[dict[str, Any]] = []

    def refuse(config: Path) -> None:
        import yaml

        exported.append(yaml.safe_load(config.read_text()))
        raise ParityError("below its bound")

    monkeypatch.setattr(api, "export", refuse)
    spec = {"entry": {"model_name": "resnet50"}}
    assert visual.bf16_systems(tmp_path, "resnet50", spec, 8, [], []) is None
    (model,) = exported[0]["visual"]["items"]["model"]
    assert model["precision"] == "bf16" and model["model_name"] == "resnet50"
