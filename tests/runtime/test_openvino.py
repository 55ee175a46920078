"""precision: bf16, run by OpenVINO's CPU plugin for ONNX Runtime in bfloat16.

The logic (which artifacts go to OpenVINO, what happens where it cannot run them in bfloat16)
is tested everywhere; the real bf16 runs skip where this CPU has no bfloat16 math or the
plugin is not installed, as the CUDA tests skip without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import ducho_fast
from ducho_fast.artifact import slug_for
from ducho_fast.config.model import RuntimeOptions
from ducho_fast.errors import DeviceError, ExportError
from ducho_fast.exporters import precision as precision_module
from ducho_fast.model_runs import precision_advice
from ducho_fast.runtime import embedder as embedder_module
from ducho_fast.runtime import openvino, session
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.session import CPU, CUDA, for_artifact, make_session
from tests.conftest import npy_bytes, textual_config, two_job_config
from tests.exporters.test_precision import _minilm, family_config

PROBE = Path(str(resources.files("ducho_fast.runtime").joinpath("probe.onnx")))
REASON = openvino.unusable()
needs_bf16 = pytest.mark.skipif(REASON is not None, reason=f"no bf16 here: {REASON}")
BF16 = {"precision": "bf16", "modality": "textual"}


@pytest.mark.parametrize(
    ("device", "precision", "runs_on"),
    [
        ("cpu", "bf16", "openvino"),
        ("auto", "bf16", "openvino"),  # no GPU in this build: auto is the CPU
        ("cuda", "bf16", "cuda"),  # its graph is fp32: on a GPU it runs as any fp32 graph
        ("cpu", "fp32", "cpu"),
        ("cpu", "int8", "cpu"),
    ],
)
def test_bf16_artifacts_run_on_openvino_wherever_they_would_run_on_the_cpu(
    device: str, precision: str, runs_on: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: [CPU])
    options = for_artifact(RuntimeOptions(device=device), {**BF16, "precision": precision})
    assert options.device == runs_on
    if runs_on == "openvino":  # one batch at a time; ORT's threads never spin beside it
        assert session.batch_lanes(options) == 1
        assert not session.spins(options, "textual", readers=False)


def test_where_bf16_cannot_run_its_fp32_graph_runs_on_the_cpu_provider_if_allowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    why = "this Xeon has no bfloat16 math"
    monkeypatch.setattr(session, "unusable", lambda: why)
    options = RuntimeOptions(device="openvino", allow_fallback=False)
    with pytest.raises(DeviceError, match=rf"precision is bf16, but {why}.*allow_fallback: true"):
        make_session(PROBE, options)
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        probe, info = make_session(PROBE, RuntimeOptions(device="openvino"))
    assert info.provider == CPU and info.note == "fp32: no bf16 here"
    assert probe.get_providers() == [CPU]
    assert any(why in r.getMessage() and "running it so" in r.getMessage() for r in caplog.records)


def test_why_bf16_cannot_run_names_the_install_or_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openvino, "_REGISTERED", {})
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # not installed
    assert openvino.cpu_devices() == []
    assert "pip install 'ducho-fast[openvino]'" in str(openvino.unusable())
    no_bf16 = SimpleNamespace(
        ep_metadata={"FULL_DEVICE_NAME": "AMD EPYC 7B13", "OPTIMIZATION_CAPABILITIES": "FP32 INT8"}
    )
    monkeypatch.setattr(openvino, "cpu_devices", lambda: [no_bf16])
    assert openvino.unusable() == (
        "AMD EPYC 7B13 has no bfloat16 math (AMX-BF16 or AVX512-BF16, Intel Xeon from "
        "Sapphire Rapids on)"
    )
    with_bf16 = SimpleNamespace(ep_metadata={"OPTIMIZATION_CAPABILITIES": "BF16 FP32 FP16 INT8"})
    monkeypatch.setattr(openvino, "cpu_devices", lambda: [with_bf16])
    assert openvino.unusable() is None


@pytest.mark.slow
def test_bf16_is_exported_only_where_it_can_run_so(
    tmp_path: Path, store: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "unusable", lambda: "this CPU has no bfloat16 math")
    config = textual_config(tmp_path, _minilm(minilm_dir, "bf16"), store / "refused")
    with pytest.raises(
        ExportError,
        match=r"^'textual.items.model.0.precision' \(.*\): precision bf16 runs on OpenVINO's "
        r"CPU plugin.*this CPU has no bfloat16 math\. .*precision: fp32",
    ):
        ducho_fast.export(config)
    assert not list((store / "refused").glob("sentence_transformers-*"))  # nothing kept


@pytest.mark.slow
def test_extract_runs_a_bf16_artifact_on_the_session_made_for_it(
    tmp_path: Path,
    minilm_dir: Path,
    texts_tsv: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Everywhere: a bf16 artifact (the fp32 one under the bf16 slug, as export writes it
    where OpenVINO runs it) extracted where it cannot run in bfloat16. The session made ahead
    of the run must be the one its embedder takes (OpenVINO's: no spinning, one lane), and
    the fp32 graph runs on the CPU provider instead, said."""
    shutil.copyfile(texts_tsv, tmp_path / "descriptions.tsv")
    store = tmp_path / "store"  # its own: the session's store must not hold this bf16 artifact
    fp32 = textual_config(tmp_path, _minilm(minilm_dir, "fp32"), store, output_path="fp32")
    (exported,) = ducho_fast.export(fp32)
    bf16 = textual_config(tmp_path, _minilm(minilm_dir, "bf16"), store, output_path="bf16")
    target = store / slug_for(ducho_fast.api.as_config(bf16).jobs[0].models[0])
    shutil.copytree(exported.artifact.path, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "precision": "bf16"}))
    monkeypatch.setattr(session, "unusable", lambda: "this CPU has no bfloat16 math")
    ducho_fast.extract(fp32)
    made_by_embedder = []  # sessions the embedder made itself, not taking the one made ahead
    real = embedder_module.make_session

    def counted(*args: Any, **kwargs: Any) -> Any:
        made_by_embedder.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedder_module, "make_session", counted)
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        report = ducho_fast.extract(bf16)
    assert report.failed == 0 and report.runs[0].provider == CPU and not made_by_embedder
    assert any("has no bfloat16 math" in r.getMessage() for r in caplog.records)
    ours = {f.name: np.load(f) for f in (tmp_path / "bf16").rglob("*.npy")}
    theirs = {f.name: np.load(f) for f in (tmp_path / "fp32").rglob("*.npy")}
    assert ours.keys() == theirs.keys() and len(ours) > 1
    for name, vector in ours.items():
        np.testing.assert_allclose(vector, theirs[name], atol=1e-6)


def test_a_bf16_artifact_on_a_gpu_is_told_what_suits_the_gpu() -> None:
    assert "precision: fp16" in (precision_advice("bf16", CUDA) or "")
    assert precision_advice("bf16", openvino.OPENVINO) is None


@pytest.mark.slow
@needs_bf16
def test_bf16_minilm_runs_in_bfloat16_on_openvino_within_its_bound(
    tmp_path: Path, minilm_dir: Path, texts_tsv: Path
) -> None:
    shutil.copyfile(texts_tsv, tmp_path / "descriptions.tsv")
    store = tmp_path / "store"  # its own: tests that glob the session's store for MiniLM's
    vectors = {}
    for precision in ("fp32", "bf16"):
        model = _minilm(minilm_dir, precision)
        config = textual_config(tmp_path, model, store, output_path=f"out_{precision}")
        (result,) = ducho_fast.export(config)
        manifest = result.artifact.manifest
        parity = manifest["parity"]
        assert manifest["precision"] == parity["precision"] == precision and parity["passed"]
        report = ducho_fast.extract(config)
        assert report.failed == 0 and not report.warnings
        folder = next((tmp_path / f"out_{precision}").rglob("*.npy")).parent
        vectors[precision] = np.stack([np.load(f).ravel() for f in sorted(folder.glob("*.npy"))])
        if precision == "bf16":
            assert parity["provider"] == report.runs[0].provider == openvino.OPENVINO
            assert parity["bounds"]["min_cosine"] == 0.999
            layer = parity["layers"]["1"]
            # bfloat16 keeps 8 bits of mantissa: were it fp32 after all, 1e-6 or so
            assert layer["min_cosine"] >= 0.999 and layer["max_rel_diff"] > 1e-4
            embedder = ducho_fast.load(result.artifact.path)
            assert "bf16, on OpenVINOExecutionProvider" in repr(embedder)
            assert embedder.info.lanes == 1 and embedder.info.threads == cpu_quota()
            _, info = make_session(
                result.artifact.model_path, RuntimeOptions(device="openvino"), lanes=2
            )
            assert (info.provider, info.lanes, info.threads) == (openvino.OPENVINO, 1, cpu_quota())
    cos = (vectors["bf16"] * vectors["fp32"]).sum(1)  # unit vectors
    assert len(cos) > 1 and cos.min() >= 0.999
    assert np.abs(vectors["bf16"] - vectors["fp32"]).max() > 1e-4  # really bfloat16


def test_doctor_says_whether_bf16_runs_here(monkeypatch: pytest.MonkeyPatch) -> None:
    from ducho_fast import doctor

    def unusable_is(why: str | None) -> None:  # doctor's word and bf16_offer's alike
        for module in (doctor, openvino):
            monkeypatch.setattr(module, "unusable", lambda: why)

    unusable_is("this CPU has no bfloat16 math")
    monkeypatch.setattr(openvino, "cpu_bf16_flag", lambda cpuinfo=None: None)
    line = "precision bf16 (OpenVINO's CPU plugin, bfloat16 math): "
    assert line + "not here: this CPU has no bfloat16 math" in doctor.report().lines
    unusable_is(None)
    assert line + "runs here" in doctor.report().lines
    unusable_is("the plugin is not installed: pip install")
    monkeypatch.setattr(openvino, "plugin_installed", lambda: False)
    monkeypatch.setattr(openvino, "cpu_bf16_flag", lambda cpuinfo=None: "avx512_bf16")
    monkeypatch.setattr(doctor, "cpu_bf16_flag", lambda: "avx512_bf16")
    assert (
        line + "not here: the plugin is not installed: pip install (this CPU lists avx512_bf16: it "
        "would run with the plugin)"
    ) in doctor.report().lines
    monkeypatch.setattr(openvino, "plugin_installed", lambda: True)  # installed, does not load
    assert line + "not here: the plugin is not installed: pip install" in doctor.report().lines


def _bf16_jobs(data: Path, store: Path, resnet18: Path, tiny_bert: Path) -> dict[str, Any]:
    """``two_job_config``'s visual and textual jobs, both models exported in bf16."""
    config = two_job_config(data, store, resnet18, tiny_bert)
    for job in ("visual", "textual"):
        config[job]["items"]["model"][0]["precision"] = "bf16"
    return config


@pytest.mark.slow
@needs_bf16
def test_bf16_shards_and_ray_make_the_files_of_one_run(
    tmp_path: Path, resnet18_state_dict: Path, tiny_bert_dir: Path
) -> None:
    """The scale-out contract holds for bf16 artifacts too: every item is embedded in the batch
    a single run puts it in, by sessions made anew in each task or actor, and OpenVINO's
    bfloat16 results for a batch do not depend on the session that ran it."""
    store = tmp_path / "store"  # its own: bf16 artifacts of models other tests glob for
    one = _bf16_jobs(tmp_path / "one", store, resnet18_state_dict, tiny_bert_dir)
    for result in ducho_fast.export(one):
        parity = result.artifact.manifest["parity"]
        assert parity["precision"] == "bf16" and parity["provider"] == openvino.OPENVINO
    report = ducho_fast.extract(one)
    assert [r.provider for r in report.runs] == [openvino.OPENVINO] * 2 and report.failed == 2
    per_item = {k: v for k, v in npy_bytes(tmp_path / "one").items() if "matrix" not in k}
    split = _bf16_jobs(tmp_path / "split", store, resnet18_state_dict, tiny_bert_dir)
    for index in range(2):
        ducho_fast.extract(split, shard=f"{index}/2")
    assert npy_bytes(tmp_path / "split") == per_item
    if importlib.util.find_spec("ray") is None:
        return
    import ray

    from ducho_fast.runtime.raydata import RayOptions

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = _bf16_jobs(tmp_path / "ray", store, resnet18_state_dict, tiny_bert_dir)
        report = ducho_fast.extract(on_ray, engine="ray", ray=RayOptions(actors=1))
    finally:
        ray.shutdown()
    assert [r.provider for r in report.runs] == [f"ray: {openvino.OPENVINO}"] * 2
    assert npy_bytes(tmp_path / "ray") == npy_bytes(tmp_path / "one")


@pytest.mark.slow
@needs_bf16
@pytest.mark.parametrize("family", ["clip", "hubert"])
def test_bf16_of_the_two_towers_and_audio_runs_in_bfloat16_within_its_bound(
    tmp_path: Path, family: str, request: pytest.FixtureRequest
) -> None:
    """CLIP's two towers and a HuBERT audio encoder (tiny, random weights), whose graphs hold
    ops MiniLM's does not (convolutions, the image tower's patches): parity checked as they
    run on the plugin, in bfloat16."""
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    config = family_config(family, model_dir, tmp_path, tmp_path / "store", "bf16")
    results = ducho_fast.export(config)
    assert len(results) == (2 if family == "clip" else 1)
    for result in results:
        parity = result.artifact.manifest["parity"]
        assert parity["precision"] == "bf16" and parity["provider"] == openvino.OPENVINO
        (layer,) = parity["layers"].values()
        assert parity["passed"] and layer["min_cosine"] >= 0.999 and layer["max_rel_diff"] > 1e-4


def test_bf16_sessions_ask_for_bfloat16_on_their_threads_unpinned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenVINO pins a latency session's threads to the first cores by default: sessions of
    several processes (Ray actors, shards on one machine) would share the same cores."""
    device = SimpleNamespace(ep_metadata={"OPTIMIZATION_CAPABILITIES": "FP32 BF16"})
    monkeypatch.setattr(openvino, "cpu_devices", lambda: [device])
    asked: list[tuple[list[Any], dict[str, str]]] = []
    opts = SimpleNamespace(add_provider_for_devices=lambda d, o: asked.append((d, o)))
    openvino.add_bf16_provider(opts, 3)
    ((devices, options),) = asked
    assert devices == [device]
    assert json.loads(options["load_config"])["CPU"] == {
        "INFERENCE_PRECISION_HINT": "bf16",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": "3",
        "ENABLE_CPU_PINNING": "NO",
    }


def test_a_memory_limit_set_in_the_config_is_said_not_to_bound_bf16_sessions() -> None:
    for unset in ("auto", "off"):
        assert session.memory_limit_advice(RuntimeOptions(memory_limit=unset)) is None
    advice = session.memory_limit_advice(RuntimeOptions(memory_limit="8GB")) or ""
    assert advice.startswith("runtime.memory_limit (8GB) does not bound a bf16 artifact's")
    assert "a smaller batch_size bounds it" in advice


@needs_bf16
def test_a_bf16_session_made_under_a_memory_limit_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(session, "_ADVISED", set())
    with caplog.at_level(logging.WARNING, logger="ducho_fast"):
        for limit in ("auto", "8GB", "8GB"):  # two models, or two embed sessions: said once
            _, info = make_session(PROBE, RuntimeOptions(device="openvino", memory_limit=limit))
            assert info.provider == openvino.OPENVINO and info.memory_limit is None
    said = [r.message for r in caplog.records if "memory_limit" in r.message]
    assert said == [session.memory_limit_advice(RuntimeOptions(memory_limit="8GB"))]


def test_cpu_bf16_flag_reads_the_cpus_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert openvino.cpu_bf16_flag(cpuinfo) == "avx512_bf16"
    cpuinfo.write_text("flags\t\t: fpu avx512_bf16 amx_bf16\nflags\t\t: fpu\n")
    assert openvino.cpu_bf16_flag(cpuinfo) == "amx_bf16"
    cpuinfo.write_text("vmx flags\t: amx_bf16\nflags\t\t: fpu avx2 amx_tile\nbugs\t: amx_bf16\n")
    assert openvino.cpu_bf16_flag(cpuinfo) is None  # only the flags line counts
    assert openvino.cpu_bf16_flag(tmp_path / "none") is None  # no /proc/cpuinfo (macOS)


def test_bf16_is_offered_where_it_runs_or_where_the_plugin_would_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu amx_bf16\n")
    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: fpu avx2\n")
    assert openvino.plugin_installed() or not openvino.cpu_devices()  # a plugin that loads is one
    monkeypatch.setattr(openvino, "unusable", lambda: None)
    assert openvino.bf16_offer(plain) == "runs"  # OpenVINO's own word decides where it loads
    monkeypatch.setattr(openvino, "unusable", lambda: "not installed")
    monkeypatch.setattr(openvino, "plugin_installed", lambda: False)
    assert [openvino.bf16_offer(amx), openvino.bf16_offer(plain)] == ["install", ""]
    monkeypatch.setattr(openvino, "plugin_installed", lambda: True)  # yet it does not run
    assert openvino.bf16_offer(amx) == ""
