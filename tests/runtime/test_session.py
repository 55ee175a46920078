from __future__ import annotations

import logging
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from ducho_fast.config.model import InputOptions, RuntimeOptions
from ducho_fast.errors import DeviceError
from ducho_fast.runtime import cpu
from ducho_fast.runtime.binding import IOBinder
from ducho_fast.runtime.session import CPU, CUDA, make_session, requested_providers, spins

PROBE = Path(str(resources.files("ducho_fast.runtime").joinpath("probe.onnx")))
HAS_CUDA = CUDA in ort.get_available_providers()


def test_cpu_session_threads_follow_the_quota(monkeypatch) -> None:
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 1.5)
    assert cpu.cpu_quota() == 1
    assert cpu.cpu_quota_report() == "1 (affinity mask 4 CPUs, a cgroup quota of 1.5 CPUs)"
    _, info = make_session(PROBE, RuntimeOptions(device="cpu"))
    assert info.provider == "CPUExecutionProvider" and info.threads == 1


def cgroups(tmp_path: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    """A fake ``/sys/fs/cgroup`` holding ``files`` and a fake ``/proc/self/cgroup``."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "membership").write_text(membership)
    return root, tmp_path / "membership"


@pytest.mark.parametrize(
    ("files", "membership", "limit"),
    [
        # cgroup v2 in a container with its own namespace (Docker, Kubernetes): the root's.
        ({"cgroup.controllers": "cpu", "cpu.max": "250000 100000\n"}, "0::/\n", 2.5),
        ({"cgroup.controllers": "cpu", "cpu.max": "max 100000\n"}, "0::/\n", None),
        # v2 on a host: the process's own cgroup, and the tightest of its parents.
        (
            {
                "cgroup.controllers": "cpu",
                "batch.slice/cpu.max": "300000 100000",
                "batch.slice/job-7.scope/cpu.max": "max 100000",
            },
            "0::/batch.slice/job-7.scope\n",
            3.0,
        ),
        (
            {
                "cgroup.controllers": "cpu",
                "a/cpu.max": "200000 100000",
                "a/b/cpu.max": "50000 100000",
            },
            "0::/a/b\n",
            0.5,
        ),
        # a path not under the mount (the host's names, the container's own mount): the root.
        ({"cgroup.controllers": "", "cpu.max": "100000 100000"}, "0::/docker/abc\n", 1.0),
        (
            {"cgroup.controllers": "", "cpu.max": "100000 100000", "../up/cpu.max": "1 100000"},
            "0::/../up\n",
            1.0,
        ),
        # cgroup v1, the cpu controller's hierarchy (alone, or joint with cpuacct).
        (
            {"cpu/cpu.cfs_quota_us": "150000", "cpu/cpu.cfs_period_us": "100000"},
            "3:cpu:/\n",
            1.5,
        ),
        (
            {
                "cpu,cpuacct/cpu.cfs_quota_us": "-1",
                "cpu,cpuacct/cpu.cfs_period_us": "100000",
                "cpu,cpuacct/slurm/cpu.cfs_quota_us": "400000",
                "cpu,cpuacct/slurm/cpu.cfs_period_us": "100000",
                "cpu,cpuacct/slurm/job/cpu.cfs_quota_us": "-1",
                "cpu,cpuacct/slurm/job/cpu.cfs_period_us": "100000",
            },
            "5:memory:/slurm/job\n4:cpu,cpuacct:/slurm/job\n0::/\n",
            4.0,
        ),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "3:cpu:/\n", None),
        # no cgroups at all, or files that cannot be read as numbers
        ({}, "", None),
        ({"cgroup.controllers": "", "cpu.max": "garbage"}, "0::/\n", None),
    ],
)
def test_the_cgroup_quota_is_the_tightest_above_the_process(
    tmp_path: Path, files: dict[str, str], membership: str, limit: float | None
) -> None:
    root, proc = cgroups(tmp_path, files, membership)
    assert cpu.cgroup_cpu_limit(root, proc) == limit


def test_explicit_threads_win() -> None:
    _, info = make_session(PROBE, RuntimeOptions(device="cpu", threads=2))
    assert info.threads == 2


def test_more_threads_than_cpus_are_pointed_out_once(monkeypatch, caplog) -> None:
    """A config written for a bigger machine: 3 threads on 2 CPUs ran a text model 1.8x
    slower, 64 35x, and nothing said why."""
    from ducho_fast.runtime import session

    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(session, "_ADVISED", set())
    for threads in (0, 1, 2):
        assert session.threads_advice(RuntimeOptions(device="cpu", threads=threads)) is None
    assert session.threads_advice(RuntimeOptions(device="cuda", threads=64)) is None
    # OpenVINO's threads (a bf16 artifact) do not slow so: not pointed out
    assert session.threads_advice(RuntimeOptions(device="openvino", threads=64)) is None
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        for _ in range(3):  # three models, or three embed sessions: said once
            _, info = make_session(PROBE, RuntimeOptions(device="cpu", threads=3))
    assert info.threads == 3  # as asked: pointed out, not changed
    assert [r.getMessage() for r in caplog.records] == [
        "runtime.threads is 3, more than the CPUs this process may use, 2 (affinity mask 2 "
        "CPUs, no cgroup CPU quota): ONNX Runtime's threads then wait on each other (a text "
        "model ran 1.8x slower at 3 threads on 2 CPUs, 35x at 64). Set runtime.threads to 0 "
        "(the CPUs there are), or no more than those."
    ]


def test_providers_asked_for() -> None:
    assert requested_providers("cpu") == ["CPUExecutionProvider"]
    # fp32 computes in fp32 on CUDA too: TF32 (ONNX Runtime's default there) is off
    assert requested_providers("cuda:1")[0] == (CUDA, {"use_tf32": "0", "device_id": "1"})
    options = {"cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": 2**30}
    assert requested_providers("cuda", options)[0] == (
        CUDA,
        {
            "use_tf32": "0",
            "cudnn_conv_algo_search": "HEURISTIC",
            "gpu_mem_limit": "1073741824",
            "device_id": "0",
        },
    )


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour where CUDA does not really run")
def test_cuda_requested_but_not_active(caplog, capfd, recwarn) -> None:
    with pytest.raises(DeviceError, match=r"CUDA is not really active.*allow_fallback: true"):
        make_session(PROBE, RuntimeOptions(device="cuda", allow_fallback=False))
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        _, info = make_session(PROBE, RuntimeOptions(device="cuda", allow_fallback=True))
    assert info.provider == "CPUExecutionProvider" and "Falling back to CPU" in caplog.text
    # only ours: not ONNX Runtime's own log line and warning before it
    assert "onnxruntime" not in capfd.readouterr().err
    assert not [w for w in recwarn if "CUDAExecutionProvider" in str(w.message)]


@pytest.mark.gpu
def test_cuda_session_really_runs_on_cuda() -> None:
    from ducho_fast.doctor import cuda_runs

    if not cuda_runs():
        pytest.skip("no real CUDAExecutionProvider session on this machine")
    _, info = make_session(PROBE, RuntimeOptions(device="cuda", allow_fallback=False))
    assert info.provider == CUDA


def test_io_binding_logic_on_cpu_same_outputs_buffers_kept_per_shape() -> None:
    session, _ = make_session(PROBE, RuntimeOptions(device="cpu"))
    binder = IOBinder(session, "cpu")
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    shapes = [(2, *_probe_shape(session)), (3, *_probe_shape(session)), (2, *_probe_shape(session))]
    for shape in shapes:
        feeds = {name: rng.standard_normal(shape).astype(np.float32)}
        for ours, plain in zip(
            binder.run_feeds(outputs, feeds), session.run(outputs, feeds), strict=True
        ):
            np.testing.assert_array_equal(ours, plain)
    assert binder.allocations == 2  # the third batch reused the first one's buffer


def test_staged_batches_overlap_across_threads_and_buffers_come_back() -> None:
    """The pipeline's use: stage on a reader thread, run on the model's, fetch on the writer's;
    pinned host buffers (a stand-in for cudaHostRegister) are what the device copies from."""
    import threading

    session, _ = make_session(PROBE, RuntimeOptions(device="cpu"))
    pinned: list[np.ndarray] = []

    def pin(array: np.ndarray) -> bool:
        pinned.append(array)
        return True

    binder = IOBinder(session, "cpu", pin=pin)
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(1)
    shape = (2, *_probe_shape(session))
    feeds = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(5)]
    staged: list[Any] = []
    reader = threading.Thread(target=lambda: staged.extend(binder.stage(f) for f in feeds[:3]))
    reader.start()
    reader.join()
    assert binder.allocations == 3  # three batches in flight at once: three buffers
    assert [slot.host is not None for s in staged for _, slot in s.slots.values()] == [True] * 3
    ran = [binder.run(outputs, s) for s in staged]  # each run gives its buffers back
    fetched: list[list[np.ndarray]] = []
    writer = threading.Thread(target=lambda: fetched.extend(binder.fetch(r) for r in ran))
    writer.start()
    writer.join()
    fetched += [binder.run_feeds(outputs, f) for f in feeds[3:]]
    assert binder.allocations == 3 and len(pinned) == 3  # batches 4 and 5 reused them
    for ours, f in zip(fetched, feeds, strict=True):
        for a, b in zip(ours, session.run(outputs, f), strict=True):
            np.testing.assert_array_equal(a, b)


def test_unpinnable_host_memory_is_copied_from_the_batch() -> None:
    session, _ = make_session(PROBE, RuntimeOptions(device="cpu"))
    binder = IOBinder(session, "cpu", pin=lambda array: False)
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    feeds = {name: np.ones((1, *_probe_shape(session)), np.float32)}
    staged = binder.stage(feeds)
    assert all(slot.host is None for _, slot in staged.slots.values())
    ours = binder.fetch(binder.run(outputs, staged))
    for a, b in zip(ours, session.run(outputs, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_convolutions_are_tuned_by_heuristics_where_input_shapes_vary() -> None:
    from ducho_fast.runtime.session import for_artifact, shapes_vary

    fixed = [
        {"modality": "visual", "preprocessing": {"resize": [224, 224]}},
        {"modality": "visual", "preprocessing": {"resize_shortest_edge": 256, "crop": [224, 224]}},
    ]
    varying = [
        {"modality": "visual", "preprocessing": {"resize_shortest_edge": 256}},  # aspect kept
        {"modality": "visual", "preprocessing": {}},  # images as they come
        {"modality": "audio", "preprocessing": {"sample_rate": 16000}},
        {"modality": "textual", "preprocessing": {}},  # one length per bucket
    ]
    assert [shapes_vary(m) for m in fixed] == [False, False]
    assert all(shapes_vary(m) for m in varying)
    options = RuntimeOptions(device="cuda", cuda_options={"gpu_mem_limit": 2**30})
    assert for_artifact(options, fixed[0]) is options  # ONNX Runtime's EXHAUSTIVE: tuned once
    tuned = for_artifact(options, varying[2])
    assert tuned.cuda_options == {"gpu_mem_limit": 2**30, "cudnn_conv_algo_search": "HEURISTIC"}
    assert requested_providers("cuda", tuned.cuda_options)[0][1]["cudnn_conv_algo_search"] == (
        "HEURISTIC"
    )
    chosen = RuntimeOptions(device="cuda", cuda_options={"cudnn_conv_algo_search": "EXHAUSTIVE"})
    assert for_artifact(chosen, varying[2]) is chosen  # the config's choice stands


def test_a_smaller_batch_is_padded_only_where_cuda_would_search_a_new_shape() -> None:
    """ONNX Runtime keys cuDNN's exhaustive search by the whole input shape: a run's last,
    smaller batch of fixed-size images would search every convolution again."""
    from ducho_fast.runtime.session import CPU, CUDA, pads_last_batch

    fixed = {"modality": "visual", "preprocessing": {"resize": [224, 224]}}
    cuda = RuntimeOptions(device="cuda")
    assert pads_last_batch(cuda, fixed, CUDA)  # ONNX Runtime's default: EXHAUSTIVE
    exhaustive = RuntimeOptions(
        device="cuda", cuda_options={"cudnn_conv_algo_search": "EXHAUSTIVE"}
    )
    assert pads_last_batch(exhaustive, fixed, CUDA)
    for algo in ("HEURISTIC", "DEFAULT"):  # no search: nothing to save
        chosen = RuntimeOptions(device="cuda", cuda_options={"cudnn_conv_algo_search": algo})
        assert not pads_last_batch(chosen, fixed, CUDA)
    assert not pads_last_batch(cuda, fixed, CPU)  # fallen back, or asked for: no cuDNN
    for varying in (
        {"modality": "visual", "preprocessing": {"resize_shortest_edge": 256}},
        {"modality": "audio", "preprocessing": {"sample_rate": 16000}},
        {"modality": "textual", "preprocessing": {}},
    ):
        assert not pads_last_batch(cuda, varying, CUDA)  # a new shape each batch anyway


def test_a_session_made_ahead_serves_only_the_options_it_was_made_with() -> None:
    from ducho_fast.runtime.session import PendingSession

    options = RuntimeOptions(device="cpu")
    pending = PendingSession(PROBE, options, spinning=True)
    assert pending.serves(PROBE, spinning=True)
    assert pending.serves(PROBE, spinning=True, options=RuntimeOptions(device="cpu"))
    other = RuntimeOptions(device="cpu", cuda_options={"cudnn_conv_algo_search": "HEURISTIC"})
    assert not pending.serves(PROBE, spinning=True, options=other)
    pending.result()


def test_the_cuda_runtime_already_loaded_is_tried_first(tmp_path, monkeypatch) -> None:
    from ducho_fast.runtime import binding

    wheel = "/venv/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12"
    maps = tmp_path / "maps"
    maps.write_text(
        f"7f00-7f10 r-xp 00000000 08:01 12 {wheel}\n"
        f"7f10-7f20 r--p 00010000 08:01 12 {wheel}\n"  # one library, several mappings
        "7f20-7f30 rw-p 00000000 00:00 0\n"  # anonymous memory: no path
        "7f30-7f40 r-xp 00000000 08:01 9 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    )
    found = {"cudart": "libcudart.so.11.0"}
    monkeypatch.setattr(binding.ctypes.util, "find_library", lambda name: found.get(name))
    sonames = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    assert binding.cuda_runtime_candidates(maps) == [wheel, "libcudart.so.11.0", *sonames]
    found.clear()  # none known to the loader's cache, none loaded
    assert binding.cuda_runtime_candidates(tmp_path / "missing") == sonames


def test_cuda_pinning_takes_the_first_runtime_that_loads(tmp_path, monkeypatch, caplog) -> None:
    from ducho_fast.runtime import binding

    tried: list[str] = []

    class Runtime:
        def __init__(self, path: str) -> None:
            tried.append(path)
            if path != "libcudart.so.12":
                raise OSError(f"{path}: cannot open shared object file")
            self.cudaHostRegister = lambda ptr, size, flags: 0
            self.cudaHostUnregister = lambda ptr: 0

    monkeypatch.setattr(binding.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(binding.ctypes, "CDLL", Runtime)
    pin = binding.cuda_pinning(tmp_path / "missing")
    assert tried == ["libcudart.so.13", "libcudart.so.12"] and pin is not None
    assert pin(np.ones(4, np.float32))
    monkeypatch.setattr(binding, "CUDA_RUNTIMES", ("libcudart.so.13",))
    with caplog.at_level(logging.INFO, logger="ducho_fast"):
        assert binding.cuda_pinning(tmp_path / "missing") is None
    assert "copied unpinned" in caplog.text


def test_pinned_memory_is_unregistered_when_its_array_goes() -> None:
    import gc

    from ducho_fast.runtime.binding import _pinner

    registered: list[tuple[int, int]] = []
    unregistered: list[int] = []
    status = {"register": 0}

    def register(ptr: int, size: int, flags: int) -> int:
        registered.append((ptr, size))
        return status["register"]

    def unregister(ptr: int) -> int:
        unregistered.append(ptr)
        return 0

    pin = _pinner(register, unregister)
    array = np.empty((2, 8), np.float32)
    address = array.ctypes.data
    assert pin(array) and registered == [(address, 64)] and unregistered == []
    del array
    gc.collect()
    assert unregistered == [address]
    status["register"] = 1  # cudaErrorInvalidValue: not pinned, nothing to unregister later
    other = np.empty(4, np.float32)
    assert not pin(other)
    assert not pin(np.empty(0, np.float32)) and len(registered) == 2  # nothing to pin
    del other
    gc.collect()
    assert unregistered == [address]


@pytest.mark.parametrize(
    ("spin_wait", "alone", "text_readers", "image_readers"),
    [("auto", True, True, False), ("on", True, True, True), ("off", False, False, False)],
)
def test_spin_wait_by_modality_and_readers(
    spin_wait: str, alone: bool, text_readers: bool, image_readers: bool
) -> None:
    """auto: no spinning only where readers decode images or audio beside the session."""
    options = RuntimeOptions(spin_wait=spin_wait)
    for modality in ("textual", "visual", "audio"):
        assert spins(options, modality, readers=False) is alone
    assert spins(options, "textual", readers=True) is text_readers
    assert spins(options, "visual", readers=True) is image_readers
    assert spins(options, "audio", readers=True) is image_readers
    # On CUDA the CPU threads run only shape ops: auto never spins there; on and off hold.
    cuda = RuntimeOptions(spin_wait=spin_wait, device="cuda:0")
    for modality in ("textual", "visual", "audio"):
        for readers in (False, True):
            assert spins(cuda, modality, readers=readers) is (spin_wait == "on")


def test_spinning_reaches_the_session() -> None:
    key = "session.intra_op.allow_spinning"
    spinning, _ = make_session(PROBE, RuntimeOptions(device="cpu"), spinning=True)
    with pytest.raises(Exception):  # noqa: B017 (unset: ORT's default, spinning; unset keys raise)
        spinning.get_session_options().get_session_config_entry(key)
    quiet, _ = make_session(PROBE, RuntimeOptions(device="cpu"), spinning=False)
    assert quiet.get_session_options().get_session_config_entry(key) == "0"


@pytest.mark.parametrize("key", ["io_binding", "spin_wait"])
def test_switches_take_yaml_on_and_off(tmp_path: Path, key: str) -> None:
    """YAML 1.1 reads a bare on/off as true/false; the switches take them as the words."""
    import yaml

    from ducho_fast.config import load_config
    from ducho_fast.errors import ConfigError
    from tests.conftest import textual_config

    raw = textual_config(tmp_path, {"model_name": "some/model"}, tmp_path / "store")
    for text, word in [("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto")]:
        raw["runtime"] = yaml.safe_load(f"{key}: {text}")
        assert getattr(load_config(raw).runtime, key) == word
    raw["runtime"] = {key: "sometimes"}
    with pytest.raises(ConfigError, match=rf"runtime.{key}' is 'sometimes'; allowed: 'auto'"):
        load_config(raw)


def test_embedder_io_binding_switch(tmp_path: Path) -> None:
    from ducho_fast.runtime.embedder import _make_binder

    session, info = make_session(PROBE, RuntimeOptions(device="cpu"))
    assert _make_binder(session, info, RuntimeOptions(device="cpu")) is None  # auto: CUDA only
    forced = _make_binder(session, info, RuntimeOptions(device="cpu", io_binding="on"))
    assert forced is not None and forced.device == "cpu"
    assert _make_binder(session, info, RuntimeOptions(io_binding="off")) is None


def test_unknown_cuda_option_is_a_config_error(tmp_path: Path) -> None:
    from ducho_fast.config import load_config
    from ducho_fast.errors import ConfigError
    from tests.conftest import textual_config

    raw = textual_config(tmp_path, {"model_name": "some/model"}, tmp_path / "store")
    raw["runtime"] = {"cuda_options": {"conv_search": "x"}}
    with pytest.raises(ConfigError, match=r"cuda_options.conv_search.*cudnn_conv_algo_search"):
        load_config(raw)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cudnn_conv_algo_search", "FAST", r"'FAST'; allowed: EXHAUSTIVE, HEURISTIC, DEFAULT\.$"),
        ("cudnn_conv_algo_search", "heuristic", r"Did you mean 'HEURISTIC'\?"),
        ("arena_extend_strategy", "kSameAsRequest", r"Did you mean 'kSameAsRequested'\?"),
        ("gpu_mem_limit", "8GB", r"in bytes, e\.g\. 8589934592 for 8 GiB"),
        ("gpu_mem_limit", -3, r"' is -3; give the limit in bytes"),
        ("gpu_mem_limit", True, r"in bytes"),
        ("use_tf32", "maybe", r"' is 'maybe'; allowed: true or false \(1 or 0\)"),
        ("tunable_op_enable", 2, r"allowed: true or false"),
        ("do_copy_in_default_stream", 1.0, r"allowed: true or false"),
    ],
)
def test_a_cuda_option_value_onnxruntime_would_refuse_is_a_config_error(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    # Refused where the config is read, so a GPU job's config fails on the machine it was
    # written on rather than when the session is made on the GPU node.
    from ducho_fast.config import load_config
    from ducho_fast.errors import ConfigError
    from tests.conftest import textual_config

    raw = textual_config(tmp_path, {"model_name": "some/model"}, tmp_path / "store")
    raw["runtime"] = {"cuda_options": {key: value}}
    with pytest.raises(ConfigError, match=rf"runtime\.cuda_options\.{key}.*{message}"):
        load_config(raw)


def test_cuda_option_values_onnxruntime_takes_are_passed_on_as_its_strings(
    tmp_path: Path,
) -> None:
    from ducho_fast.config import load_config
    from tests.conftest import textual_config

    options = {
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": 2**33,
        "cudnn_conv_use_max_workspace": True,
        "do_copy_in_default_stream": "false",
        "tunable_op_enable": 0,
        "tunable_op_tuning_enable": "1",
        "use_tf32": True,  # the config's choice wins over ducho-fast's default
    }
    raw = textual_config(tmp_path, {"model_name": "some/model"}, tmp_path / "store")
    raw["runtime"] = {"cuda_options": options}
    runtime = load_config(raw).runtime
    (cuda, passed), cpu = requested_providers("cuda", runtime.cuda_options)
    assert (cuda, cpu) == (CUDA, CPU)
    assert passed == {
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": "8589934592",
        "cudnn_conv_use_max_workspace": "True",
        "do_copy_in_default_stream": "false",
        "tunable_op_enable": "0",
        "tunable_op_tuning_enable": "1",
        "use_tf32": "True",
        "device_id": "0",
    }


def _probe_shape(session: ort.InferenceSession) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else 4 for d in session.get_inputs()[0].shape[1:])


@pytest.mark.gpu
def test_io_binding_on_cuda_matches_plain_run() -> None:
    from ducho_fast.doctor import cuda_runs

    if not cuda_runs():
        pytest.skip("no real CUDAExecutionProvider session on this machine")
    session, _ = make_session(PROBE, RuntimeOptions(device="cuda", allow_fallback=False))
    binder = IOBinder(session, "cuda", 0)
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    feeds = {name: np.ones((2, *_probe_shape(session)), np.float32)}
    for ours, plain in zip(
        binder.run_feeds(outputs, feeds), session.run(outputs, feeds), strict=True
    ):
        np.testing.assert_allclose(ours, plain, rtol=1e-6)


def test_pending_session_is_created_in_a_background_thread(monkeypatch) -> None:
    from ducho_fast.runtime import session as session_module
    from ducho_fast.runtime.session import PendingSession

    threads: list[str] = []
    real = session_module.make_session

    def recording(model: Path, options: Any, *, spinning: bool, lanes: int = 1) -> Any:
        threads.append(threading.current_thread().name)
        return real(model, options, spinning=spinning, lanes=lanes)

    monkeypatch.setattr(session_module, "make_session", recording)
    pending = PendingSession(PROBE, RuntimeOptions(device="cpu"), spinning=False)
    made, info = pending.result()
    assert threads == ["ducho-session"] and info.provider == "CPUExecutionProvider"
    assert pending.result()[0] is made  # created once, however often it is asked for
    assert (
        made.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        == "0"
    )


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour where CUDA does not really run")
def test_pending_session_raises_its_error_when_waited_for() -> None:
    from ducho_fast.runtime.session import PendingSession

    pending = PendingSession(
        PROBE, RuntimeOptions(device="cuda", allow_fallback=False), spinning=True
    )
    with pytest.raises(DeviceError, match=r"CUDA is not really active"):
        pending.result()


def test_the_interpreter_waits_for_a_pending_session_before_it_exits(tmp_path) -> None:
    """A run stopped by a bad config right after its session began must not exit while ONNX
    Runtime is still creating it: that aborted the process ('terminate called without an
    active exception') instead of exiting with the error. The session thread is waited for."""
    import subprocess
    import sys

    marker = tmp_path / "created"
    script = f"""
import time
from pathlib import Path
from ducho_fast.config.model import RuntimeOptions
from ducho_fast.runtime import session

real = session.make_session

def slow(model, options, *, spinning, lanes=1):
    time.sleep(0.5)
    made = real(model, options, spinning=spinning, lanes=lanes)
    Path({str(marker)!r}).write_text("done")
    return made

session.make_session = slow
session.PendingSession(Path({str(PROBE)!r}), RuntimeOptions(device="cpu"), spinning=True)
raise SystemExit(1)  # the run's error, at once
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert marker.read_text() == "done"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (RuntimeOptions(device="gpu"), r"'runtime\.device' is 'gpu'; allowed: auto, cpu, cuda"),
        (RuntimeOptions(spin_wait="yes"), r"'runtime\.spin_wait' is 'yes'; allowed: 'auto'"),
        (RuntimeOptions(on_error="ignore"), r"'runtime\.on_error' is 'ignore'; allowed: 'skip'"),
        (RuntimeOptions(prefetch=0), r"'runtime\.prefetch' must be >= 1"),
        (
            RuntimeOptions(cuda_options={"cudnn_conv_algo_search": "heuristic"}),
            r"cuda_options\.cudnn_conv_algo_search' is 'heuristic'.*Did you mean 'HEURISTIC'",
        ),
        ({"devcie": "cpu"}, r"unknown key 'runtime\.devcie'\. Did you mean 'device'\?"),
        ({"threads": "2"}, r"'runtime\.threads' must be an integer, found a string '2'"),
    ],
)
def test_options_given_in_code_are_checked_as_a_config_is(given: Any, message: str) -> None:
    # ducho_fast.load and RayEmbedder take options in code; before, a bad value went through
    # unchecked (a misspelt spin_wait silently meant off, a CUDA value failed on the GPU node).
    from ducho_fast.artifact import Artifact
    from ducho_fast.config.options import runtime_options
    from ducho_fast.errors import ConfigError
    from ducho_fast.runtime.embedder import Embedder

    with pytest.raises(ConfigError, match=rf"^RuntimeOptions: .*{message}"):
        runtime_options(given)
    if isinstance(given, RuntimeOptions):  # the embedder refuses them before making a session
        with pytest.raises(ConfigError, match=message):
            Embedder(Artifact(Path("no-artifact"), {}), given)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"jpeg_decode": "fast"}, r"'input\.jpeg_decode' is 'fast'; allowed: 'full', 'reduced'"),
        ({"jpeg_decod": "reduced"}, r"unknown key 'input\.jpeg_decod'\. Did you mean"),
        (InputOptions(max_image_pixels=0), r"'input\.max_image_pixels' must be >= 1"),
    ],
)
def test_input_options_given_in_code_are_checked_as_a_config_is(given: Any, message: str) -> None:
    from ducho_fast.artifact import Artifact
    from ducho_fast.config.options import input_options
    from ducho_fast.errors import ConfigError
    from ducho_fast.runtime.embedder import Embedder

    with pytest.raises(ConfigError, match=rf"^InputOptions: .*{message}"):
        input_options(given)
    with pytest.raises(ConfigError, match=message):  # before making a session
        Embedder(Artifact(Path("no-artifact"), {}), input_options=given)
    assert input_options(None) == InputOptions()
    assert input_options({"jpeg_decode": "reduced"}) == InputOptions(jpeg_decode="reduced")


def test_options_given_in_code_take_yaml_switch_words_and_bools() -> None:
    from ducho_fast.config.options import runtime_options

    assert runtime_options(None) == RuntimeOptions()
    options = runtime_options(RuntimeOptions(spin_wait=True, io_binding=False))  # type: ignore[arg-type]
    assert (options.spin_wait, options.io_binding) == ("on", "off")
    assert spins(options, "visual", readers=True)  # True meant off before
    assert runtime_options({"device": "cpu", "threads": 1}) == RuntimeOptions("cpu", threads=1)
