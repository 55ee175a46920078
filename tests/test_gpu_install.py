"""The GPU install path, as Dockerfile.cuda runs it, in a fresh virtual environment.

No Docker engine runs here, so the image's own install command (docker/install.sh) is run in a
venv: onnxruntime-gpu must come without onnxruntime, and `ducho-fast doctor` (the image's health
check) must fail when CUDA is required but does not really run, as on this GPU-less machine.
Needs the package index (pip downloads about 260 MB).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _run(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What Dockerfile.cuda copies into the image (its build context, less the rest)."""
    target = tmp_path_factory.mktemp("context")
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, target / name)
    for name in ("ducho_fast", "docker"):
        shutil.copytree(REPO / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(scope="module")
def gpu_venv(tmp_path_factory: pytest.TempPathFactory, context: Path) -> Path:
    venv = tmp_path_factory.mktemp("gpu-venv") / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    proc = _install(context, python)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def _install(context: Path, python: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(python)}
    return _run("sh", "docker/install.sh", ".", env=env, cwd=context)


def _packages(venv: Path) -> set[str]:
    listed = _run(venv / "bin" / "python", "-m", "pip", "list", "--format=freeze").stdout
    return {line.split("==")[0].lower() for line in listed.splitlines()}


def test_gpu_extra_installs_only_onnxruntime_gpu(gpu_venv: Path) -> None:
    packages = _packages(gpu_venv)
    assert "onnxruntime-gpu" in packages and "onnxruntime" not in packages
    assert "torch" not in packages  # the extract image needs no framework


def test_doctor_health_check_fails_when_cuda_required_but_inactive(gpu_venv: Path) -> None:
    doctor = gpu_venv / "bin" / "ducho-fast"
    env = {k: v for k, v in os.environ.items() if k != "DUCHO_FAST_REQUIRE_CUDA"}
    plain = _run(doctor, "doctor", env=env)
    assert plain.returncode == 0, plain.stderr
    assert "onnxruntime-gpu" in plain.stdout and "CUDAExecutionProvider" in plain.stdout
    # As in the image (DUCHO_FAST_REQUIRE_CUDA=1): CUDA is listed, but a real session falls
    # back to the CPU here (no GPU, no CUDA libraries), and the check says so.
    required = _run(doctor, "doctor", env={**env, "DUCHO_FAST_REQUIRE_CUDA": "1"})
    assert required.returncode == 1
    assert "CUDA session really runs on: CPUExecutionProvider" in required.stdout
    assert "no CUDA session really runs" in required.stderr and "--gpus all" in required.stderr
    # ldd of the real CUDA provider names what is missing here: the driver, and CUDA's own
    # libraries, which no package of this venv holds.
    said = " ".join(required.stderr.split())
    assert "libcuda.so.1 is the NVIDIA driver's" in said
    assert "needs libcublas" in said and "(not installed: libcublas" in said


def test_install_script_refuses_both_onnxruntime_packages(gpu_venv: Path, context: Path) -> None:
    python = gpu_venv / "bin" / "python"
    assert _run(python, "-m", "pip", "install", "--no-deps", "onnxruntime").returncode == 0
    try:
        doctor = _run(gpu_venv / "bin" / "ducho-fast", "doctor")
        assert doctor.returncode == 1 and "both installed" in doctor.stderr
        again = _install(context, python)
        assert again.returncode == 1
        assert "onnxruntime was installed beside onnxruntime-gpu" in again.stderr
    finally:
        _run(python, "-m", "pip", "uninstall", "-y", "onnxruntime")


def test_dockerfile_uses_the_tested_install_and_health_check() -> None:
    """What the image does is what the tests above run (the image itself cannot be built here;
    `make lint` runs hadolint on it)."""
    lines = [" ".join(line.split()) for line in (REPO / "Dockerfile.cuda").read_text().splitlines()]
    assert any(line.startswith("RUN ") and "sh docker/install.sh ." in line for line in lines)
    assert 'CMD ["ducho-fast", "doctor"]' in lines
    assert "DUCHO_FAST_REQUIRE_CUDA=1" in " ".join(lines)
    assert 'ENTRYPOINT ["ducho-fast"]' in lines
    user = [line for line in lines if line.startswith("USER ")]
    assert user and not user[-1].startswith(("USER root", "USER 0"))
    # The base image's CUDA major is the one the pinned onnxruntime-gpu is built for.
    pin = (REPO / "docker" / "constraints-gpu.txt").read_text()
    assert "onnxruntime-gpu==1.31." in pin and "CUDA 13" in pin
    assert any(line.startswith("ARG BASE=nvidia/cuda:13.") for line in lines)
