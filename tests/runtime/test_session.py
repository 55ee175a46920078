from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import onnxruntime as ort
import pytest

from ducho_fast.config.model import RuntimeOptions
from ducho_fast.errors import DeviceError
from ducho_fast.runtime import cpu
from ducho_fast.runtime.session import CUDA, make_session, requested_providers

PROBE = Path(str(resources.files("ducho_fast.runtime").joinpath("probe.onnx")))
HAS_CUDA = CUDA in ort.get_available_providers()


def test_cpu_session_threads_follow_the_quota(monkeypatch) -> None:
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    monkeypatch.setattr(cpu, "_cgroup_limit", lambda: 1.5)
    assert cpu.cpu_quota() == 1
    _, info = make_session(PROBE, RuntimeOptions(device="cpu"))
    assert info.provider == "CPUExecutionProvider" and info.threads == 1


def test_explicit_threads_win() -> None:
    _, info = make_session(PROBE, RuntimeOptions(device="cpu", threads=2))
    assert info.threads == 2


def test_providers_asked_for() -> None:
    assert requested_providers("cpu") == ["CPUExecutionProvider"]
    assert requested_providers("cuda:1")[0] == (CUDA, {"device_id": 1})


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour where CUDA does not really run")
def test_cuda_requested_but_not_active(caplog) -> None:
    with pytest.raises(DeviceError, match=r"CUDA is not really active.*allow_fallback: true"):
        make_session(PROBE, RuntimeOptions(device="cuda", allow_fallback=False))
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        _, info = make_session(PROBE, RuntimeOptions(device="cuda", allow_fallback=True))
    assert info.provider == "CPUExecutionProvider" and "Falling back to CPU" in caplog.text


@pytest.mark.gpu
def test_cuda_session_really_runs_on_cuda() -> None:
    from ducho_fast.doctor import probe

    if probe(CUDA) != CUDA:
        pytest.skip("no real CUDAExecutionProvider session on this machine")
    _, info = make_session(PROBE, RuntimeOptions(device="cuda", allow_fallback=False))
    assert info.provider == CUDA
