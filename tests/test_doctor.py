"""``ducho-fast doctor``'s account of why CUDA does not run: the libraries the CUDA provider
needs and the dynamic loader does not find, and where NVIDIA's pip packages hold them. The
slow GPU-install test runs it against a real onnxruntime-gpu on this GPU-less machine."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from ducho_fast import doctor

# ldd of onnxruntime-gpu 1.31.1's CUDA provider on a machine without CUDA or a driver
LDD = """\
\tlinux-vdso.so.1 (0x00007f5841254000)
\tlibcublasLt.so.13 => not found
\tlibcublas.so.13 => not found
\tlibcurand.so.10 => not found
\tlibcuda.so.1 => not found
\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f5840e00000)
\tlibcublas.so.13 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f5841256000)
"""


def test_ldd_not_found_lines_name_the_missing_libraries_once():
    assert doctor.not_found(LDD) == [
        "libcublasLt.so.13",
        "libcublas.so.13",
        "libcurand.so.10",
        "libcuda.so.1",
    ]
    assert doctor.not_found("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n") == []


def test_a_library_that_loads_has_nothing_missing_and_a_missing_file_says_nothing():
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    loadable = sorted(capi.glob("onnxruntime_pybind11_state*.so"))[0]
    assert doctor.missing_libraries(loadable) == []
    assert doctor.missing_libraries(capi / "no-such-library.so") is None


def _site(tmp_path: Path, files: list[str]) -> Path:
    root = tmp_path / "site-packages"
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def test_nvidia_pip_package_folders_are_found_whatever_their_layout(tmp_path):
    root = _site(
        tmp_path,
        [
            "nvidia/cublas/lib/libcublas.so.13",
            "nvidia/cublas/lib/libcublasLt.so.13",
            "nvidia/cu13/lib/libcurand.so.10",
            "nvidia/cudnn/lib/libcudnn.so.9",
            "torch/lib/libcurand.so.10",  # not NVIDIA's package: not offered
        ],
    )
    wanted = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10"]
    assert doctor.folders_holding(wanted, [root, tmp_path / "nowhere"]) == {
        root / "nvidia/cu13/lib": {"libcurand.so.10"},
        root / "nvidia/cublas/lib": {"libcublas.so.13", "libcublasLt.so.13"},
    }
    assert doctor.folders_holding([], [root]) == {}


@pytest.fixture
def provider(tmp_path, monkeypatch):
    """A CUDA provider whose ldd says what ``missing`` holds."""
    library = tmp_path / "libonnxruntime_providers_cuda.so"
    missing: list[str] = []
    monkeypatch.setattr(doctor, "cuda_provider_library", lambda: library)
    monkeypatch.setattr(doctor, "missing_libraries", lambda path: list(missing))
    monkeypatch.setattr(doctor, "site_roots", lambda: [])
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(doctor.ort, "get_available_providers", lambda: listed)
    return missing


def test_cuda_toolkit_libraries_in_pip_packages_get_the_exact_library_path(
    provider, tmp_path, monkeypatch
):
    provider += ["libcublas.so.13", "libcurand.so.10"]
    root = _site(
        tmp_path, ["nvidia/cublas/lib/libcublas.so.13", "nvidia/curand/lib/libcurand.so.10"]
    )
    monkeypatch.setattr(doctor, "site_roots", lambda: [root])
    said = doctor.why_no_cuda()
    assert said.startswith(
        "libonnxruntime_providers_cuda.so needs libcublas.so.13, libcurand.so.10, which the "
        "dynamic loader does not find."
    )
    folders = f"{root}/nvidia/cublas/lib:{root}/nvidia/curand/lib"
    assert f"export LD_LIBRARY_PATH={folders}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" in said
    assert "Install the CUDA" not in said and "driver" not in said


def test_libraries_installed_nowhere_and_a_missing_driver_are_each_named(provider):
    provider += ["libcublas.so.13", "libcuda.so.1"]
    said = doctor.why_no_cuda()
    assert "libcuda.so.1 is the NVIDIA driver's" in said and "--gpus all" in said
    assert "Install the CUDA and cuDNN versions" in said
    assert "(not installed: libcublas.so.13;" in said  # the driver is not a CUDA package
    assert "LD_LIBRARY_PATH" not in said


def test_only_the_driver_missing_asks_for_the_driver_alone(provider):
    provider.append("libcuda.so.1")
    said = doctor.why_no_cuda()
    assert "libcuda.so.1 is the NVIDIA driver's" in said
    assert "Install the CUDA" not in said and "LD_LIBRARY_PATH" not in said


def test_libraries_that_all_load_point_at_the_gpu_itself(provider):
    said = doctor.why_no_cuda()
    assert "no GPU is usable here" in said and "nvidia-smi" in said and "--gpus all" in said


def test_an_onnxruntime_without_cuda_is_told_to_install_onnxruntime_gpu(monkeypatch):
    monkeypatch.setattr(doctor.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(doctor, "missing_libraries", lambda path: pytest.fail("no ldd needed"))
    said = doctor.why_no_cuda()
    assert "has no CUDAExecutionProvider; install onnxruntime-gpu" in said


# The fixture lists CUDA among this CPU build's providers, which ONNX Runtime then warns of.
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_extract_asked_for_cuda_says_why_it_does_not_run(monkeypatch, provider):
    """The runtime's own error carries the same account, for a batch job's log."""
    from ducho_fast.config.model import RuntimeOptions
    from ducho_fast.errors import DeviceError
    from ducho_fast.runtime import session

    provider.append("libcublas.so.13")
    probe = Path(session.__file__).parent / "probe.onnx"
    with pytest.raises(DeviceError) as raised:
        session.make_session(probe, RuntimeOptions(device="cuda", allow_fallback=False))
    said = " ".join(str(raised.value).split())
    assert "CUDA is not really active. libonnxruntime_providers_cuda.so needs libcublas" in said
    assert said.endswith("Set runtime.allow_fallback: true to run on CPU.")


def test_without_ldd_or_a_provider_file_the_account_stays_general(provider, monkeypatch):
    monkeypatch.setattr(doctor, "missing_libraries", lambda path: None)  # ldd could not tell
    said = doctor.why_no_cuda()
    assert "CUDA or cuDNN libraries are missing, or no GPU is usable" in said
    assert "libraries load" not in said
    monkeypatch.setattr(doctor, "cuda_provider_library", lambda: None)
    assert doctor.why_no_cuda() == said


def test_input_formats_say_what_this_pillow_and_libsndfile_decode(monkeypatch) -> None:
    """Each format named is one a file of the listed suffixes may need: AVIF (Pillow 11.2's
    wheels), MP3 and Opus (libsndfile 1.1 and 1.0.29) are not everywhere."""
    import soundfile
    from PIL import features

    from ducho_fast.data.audio import audio as audio_module
    from ducho_fast.data.visual import images as image_module
    from ducho_fast.doctor import media_formats

    images, audio = media_formats()
    assert images.startswith("image formats (Pillow ") and "AVIF yes" in images
    assert images.endswith(f", HEIC/HEIF yes (pi-heif {metadata.version('pi-heif')})")
    assert audio == (
        f"audio formats (libsndfile {soundfile.__libsndfile_version__}): MP3 yes, Opus yes, "
        f"M4A/AAC yes (av {metadata.version('av')})"
    )
    monkeypatch.setattr(features, "check", lambda feature: feature == "webp")
    monkeypatch.setattr(soundfile, "available_subtypes", lambda kind: {"VORBIS": "Vorbis"})
    monkeypatch.setattr(image_module, "heif_plugin", lambda: None)
    monkeypatch.setattr(audio_module, "pyav_found", lambda: False)
    images, audio = media_formats()
    assert images.endswith(
        "): AVIF no, JPEG 2000 no, WebP yes, HEIC/HEIF no (pip install 'ducho-fast[heif]' "
        "(pi-heif, a libheif plugin for Pillow))"
    )
    assert audio.endswith(
        "): MP3 yes, Opus no, M4A/AAC no (pip install 'ducho-fast[m4a]' (PyAV: FFmpeg's "
        "decoders in a wheel))"
    )
