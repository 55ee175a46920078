from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import ducho_fast
from ducho_fast.artifact import load_artifact, slug_for
from ducho_fast.config import load_config
from ducho_fast.errors import ArtifactError, ExportError, ParityError
from ducho_fast.outputs.lock import lock_file, unlock_file, write_holder
from tests.conftest import REPO, assert_artifact_files, resnet18_entry, visual_config

pytestmark = pytest.mark.slow


def export_one(data: Path, model: dict[str, Any], store: Path, **kw: Any) -> Any:
    (result,) = ducho_fast.export(visual_config(data, model, store), **kw)
    return result


def test_torchvision_name_with_state_dict_several_layers(
    tmp_path, store, resnet18_state_dict
) -> None:
    result = export_one(
        tmp_path,
        resnet18_entry(resnet18_state_dict, output_layers=["avgpool", "layer4", "fc"]),
        store,
    )
    manifest = result.artifact.manifest
    assert manifest["parity"]["passed"]
    assert set(manifest["parity"]["layers"]) == {"avgpool", "layer4", "fc"}
    for layer in manifest["parity"]["layers"].values():
        assert layer["min_cosine"] >= 0.9999 and layer["max_rel_diff"] <= 1e-4
    dims = {o["layer"]: o["dim"] for o in manifest["outputs"]}
    assert dims == {"avgpool": 512, "layer4": 512 * 2 * 2, "fc": 1000}
    assert manifest["inputs"][0] == {
        "name": "pixels",
        "dtype": "uint8",
        "layout": "NHWC",
        "shape": ["batch", "height", "width", 3],
    }
    assert manifest["source"]["weights_sha256"]
    assert_artifact_files(result.artifact.path)


def test_export_is_reused_until_something_changes(tmp_path, resnet18_state_dict) -> None:
    store = tmp_path / "store"  # its own: the shared one may hold these exports already
    first = export_one(tmp_path, resnet18_entry(resnet18_state_dict), store)
    again = export_one(tmp_path, resnet18_entry(resnet18_state_dict), store)
    assert again.reused and again.artifact.path == first.artifact.path
    other = export_one(tmp_path, resnet18_entry(resnet18_state_dict, preprocessing="minmax"), store)
    assert not other.reused and other.artifact.path != first.artifact.path
    forced = export_one(tmp_path, resnet18_entry(resnet18_state_dict), store, force=True)
    assert not forced.reused and forced.artifact.path == first.artifact.path
    assert load_artifact(forced.artifact.path).manifest["parity"]["passed"]
    assert not list(store.glob(".building-*")) and not list(store.glob(".exporting-*"))


@pytest.mark.parametrize("preprocessing", [None, "minmax"])
def test_parity_for_each_ducho_scaling(tmp_path, store, resnet18_state_dict, preprocessing) -> None:
    result = export_one(
        tmp_path, resnet18_entry(resnet18_state_dict, preprocessing=preprocessing), store
    )
    assert result.artifact.manifest["preprocessing"]["scaling"] == (preprocessing or "unit")
    assert result.artifact.manifest["parity"]["passed"]


def test_without_reshape_graph_takes_any_size(tmp_path, store, resnet18_state_dict) -> None:
    model = {k: v for k, v in resnet18_entry(resnet18_state_dict).items() if k != "reshape"}
    manifest = export_one(tmp_path, model, store).artifact.manifest
    assert manifest["parity"]["samples"] == 5  # includes a second image size
    assert manifest["preprocessing"]["resize"] is None


def test_local_state_dict_with_architecture(tmp_path, store, resnet18_state_dict) -> None:
    model = {
        "model_name": str(resnet18_state_dict),
        "architecture": "resnet18",
        "output_layers": "avgpool",
        "reshape": [64, 64],
    }
    result = export_one(tmp_path, model, store)
    assert result.artifact.manifest["source"]["architecture"] == "resnet18"


def test_efficientnet_lite0_real_weights(tmp_path, store, effnet_weights) -> None:
    model = {
        "model_name": str(effnet_weights),
        "architecture": "efficientnet_lite_pytorch:EfficientNet.from_name",
        "architecture_kwargs": {"model_name": "efficientnet-lite0"},
        "trust": True,
        "output_layers": ["_avg_pooling"],
        "reshape": [224, 224],
        "preprocessing": "zscore",
    }
    manifest = export_one(tmp_path, model, store).artifact.manifest
    assert manifest["parity"]["passed"] and manifest["outputs"][0]["dim"] == 1280


def test_module_callable_architecture_needs_trust(tmp_path, store, effnet_weights) -> None:
    model = {
        "model_name": str(effnet_weights),
        "architecture": "efficientnet_lite_pytorch:EfficientNet.from_name",
        "architecture_kwargs": {"model_name": "efficientnet-lite0"},
        "output_layers": ["_avg_pooling"],
    }
    with pytest.raises(
        ExportError, match=r"calls Python code named by the config. Set trust: true"
    ):
        export_one(tmp_path, model, store)


def test_torchscript_file(tmp_path, store) -> None:
    import torch

    from ducho_fast.exporters.compat import import_torchvision

    torch.manual_seed(1)
    scripted = torch.jit.script(import_torchvision().models.resnet18(weights=None).eval())
    path = tmp_path / "resnet_ts.pt"
    scripted.save(str(path))
    result = export_one(
        tmp_path, {"model_name": str(path), "output_layers": ["output"], "reshape": [64, 64]}, store
    )
    assert result.artifact.manifest["parity"]["passed"]
    with pytest.raises(ExportError, match=r"has no layer 'avgpool'"):
        export_one(
            tmp_path,
            {"model_name": str(path), "output_layers": ["avgpool"], "reshape": [64, 64]},
            store,
        )


def test_pickled_module_needs_trust(tmp_path, store) -> None:
    import torch

    from ducho_fast.exporters.compat import import_torchvision

    torch.manual_seed(2)
    path = tmp_path / "full_model.pt"
    torch.save(import_torchvision().models.resnet18(weights=None), path)
    model = {"model_name": str(path), "output_layers": ["avgpool"], "reshape": [64, 64]}
    with pytest.raises(ExportError, match=r"pickled Python object .* Set trust: true"):
        export_one(tmp_path, model, store)
    assert export_one(tmp_path, {**model, "trust": True}, store).artifact.manifest["parity"][
        "passed"
    ]


def test_state_dict_without_architecture_says_what_to_add(
    tmp_path, store, resnet18_state_dict
) -> None:
    model = {"model_name": str(resnet18_state_dict), "output_layers": ["avgpool"]}
    with pytest.raises(ExportError, match=r"holds a state dict, not a model. Add architecture:"):
        export_one(tmp_path, model, store)


def test_unknown_layer_suggests_and_points_to_layers_command(
    tmp_path, store, resnet18_state_dict
) -> None:
    with pytest.raises(
        ExportError,
        match=r"(?s)no layer 'avgpol'\. Did you mean 'avgpool'.*ducho-fast layers torch resnet18",
    ):
        export_one(tmp_path, resnet18_entry(resnet18_state_dict, output_layers=["avgpol"]), store)


def test_a_state_dict_entrys_layer_hint_names_a_layers_command_that_works(
    tmp_path, store, resnet18_state_dict
) -> None:
    """The hint carries what loading the entry takes (architecture, its arguments, trust):
    without them, the command it named failed on a state dict."""
    import re
    import shlex

    from typer.testing import CliRunner

    from ducho_fast.cli import app

    model = {
        "model_name": str(resnet18_state_dict),
        "architecture": "torchvision.models:resnet18",
        "architecture_kwargs": {"num_classes": 1000},
        "trust": True,
        "output_layers": ["avgpol"],
        "reshape": [64, 64],
    }
    with pytest.raises(ExportError, match=r"Did you mean 'avgpool'") as caught:
        export_one(tmp_path, model, store)
    found = re.search(r"Hint: run `(.+)` to list its layers", str(caught.value))
    assert found is not None, caught.value
    words = shlex.split(found.group(1))
    assert words[:4] == ["ducho-fast", "layers", "torch", str(resnet18_state_dict)]
    assert words[4:] == [
        "--architecture",
        "torchvision.models:resnet18",
        "--architecture-kwargs",
        '{"num_classes": 1000}',
        "--trust",
    ]
    listed = CliRunner().invoke(app, words[1:])
    assert listed.exit_code == 0, listed.output
    assert "avgpool" in listed.output.split() and "layer4" in listed.output.split()


@pytest.mark.parametrize(
    "entry",
    [
        {"model_name": "resnet18", "weights": "none"},
        {"model_name": "STATE", "architecture": "resnet18"},
        {"model_name": "STATE", "architecture": "torchvision.models:resnet18", "trust": True},
    ],
    ids=["torchvision", "state dict", "module:callable"],
)
def test_architecture_kwargs_the_builder_does_not_take_are_named(
    tmp_path, store, resnet18_state_dict, entry
) -> None:
    model = {
        **entry,
        "model_name": str(resnet18_state_dict) if entry["model_name"] == "STATE" else "resnet18",
        "architecture_kwargs": {"num_class": 3},
        "output_layers": ["avgpool"],
        "reshape": [64, 64],
    }
    with pytest.raises(
        ExportError,
        match=r"cannot be built with architecture_kwargs \{'num_class': 3\} \(.*unexpected "
        r"keyword argument 'num_class'\)\. Check 'visual\.items\.model\.0\.architecture_kwargs'",
    ):
        export_one(tmp_path, model, store)


def test_whatever_a_configs_architecture_raises_is_named_as_its_arguments_fault(
    tmp_path, store, resnet18_state_dict, monkeypatch
) -> None:
    """A package.module:callable is the config's own code: a value it rejects (here a
    ValueError, as efficientnet_lite_pytorch raises for an unknown variant) stops export
    with the key named. Any argument name reaches it, ``name`` included."""
    import types

    from ducho_fast.exporters.compat import import_torchvision

    def build(name: str, **kwargs: Any) -> Any:
        if name != "resnet18":
            raise ValueError(f"name should be one of: resnet18 (not {name!r})")
        return import_torchvision().models.resnet18(weights=None, **kwargs)

    monkeypatch.setitem(sys.modules, "my_arch", types.SimpleNamespace(build=build))
    model = {
        "model_name": str(resnet18_state_dict),
        "architecture": "my_arch:build",
        "trust": True,
        "output_layers": ["avgpool"],
        "reshape": [64, 64],
    }
    with pytest.raises(
        ExportError,
        match=r"my_arch:build cannot be built with architecture_kwargs \{'name': 'resnet19'\} "
        r"\(ValueError: name should be one of: resnet18 \(not 'resnet19'\)\)\. Check "
        r"'visual\.items\.model\.0\.architecture_kwargs'",
    ):
        export_one(tmp_path, {**model, "architecture_kwargs": {"name": "resnet19"}}, store)
    built = export_one(tmp_path, {**model, "architecture_kwargs": {"name": "resnet18"}}, store)
    assert built.artifact.manifest["parity"]["passed"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, not a model", r"is not a file torch saved .*: its first bytes are those of"),
        (b"", r"is not a file torch saved .*: it is empty"),
        (bytes(64), r"is not a file torch saved"),
        (b"PK\x03\x04" + bytes(range(256)), r"cannot be read by torch \(RuntimeError: "),
        (b"\x80\x02}q\x00(X", r"cannot be read by torch \(\w+: "),  # struct.error
    ],
    ids=["text", "empty", "zeros", "broken zip", "broken pickle"],
)
@pytest.mark.parametrize(
    "where", ["model_name", "model_name, trusted", "model_name, architecture", "weights"]
)
def test_a_file_torch_cannot_read_is_an_export_error(
    tmp_path, store, content: bytes, message: str, where: str
) -> None:
    """torch.load meets such files with whatever its unpickler trips on (KeyError, EOFError,
    ...), which were tracebacks; the key holding the file is named."""
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    model: dict[str, Any] = {"output_layers": ["avgpool"], "reshape": [64, 64]}
    key = "model_name"
    if where == "weights":
        model |= {"model_name": "resnet18", "weights": str(path)}
        key = "weights"
    else:
        model |= {"model_name": str(path), "trust": where.endswith("trusted")}
        if where.endswith("architecture"):
            model["architecture"] = "resnet18"
    named = rf"'visual\.items\.model\.0\.{key}' .*{message}"
    pattern = message if "cannot be read" in message else named
    with pytest.raises(ExportError, match=pattern):
        export_one(tmp_path, model, store)


def test_an_unreadable_model_file_is_an_export_error(tmp_path, store, monkeypatch) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(b"PK\x03\x04")
    opened = Path.open

    def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    model = {"model_name": str(path), "output_layers": ["avgpool"], "reshape": [64, 64]}
    with pytest.raises(
        ExportError,
        match=r"'visual\.items\.model\.0\.model_name' .* cannot be read \(Permission denied\)",
    ):
        export_one(tmp_path, model, store)


def test_unknown_model_name(tmp_path, store) -> None:
    with pytest.raises(
        ExportError,
        match=r"neither a torchvision model nor an existing file.*Did you mean 'resnet50'",
    ):
        export_one(tmp_path, {"model_name": "resnet5O", "output_layers": ["avgpool"]}, store)


def test_default_weights_use_the_hub_path(
    tmp_path, store, monkeypatch, resnet18_state_dict
) -> None:
    """The download boundary is mocked; everything from torchvision's weights API on is real."""
    import torch
    import torchvision.models._api as api

    calls = []

    def fake_download(url: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(url)
        return torch.load(resnet18_state_dict, weights_only=True)

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_download)
    result = export_one(
        tmp_path,
        {"model_name": "ResNet18", "output_layers": ["avgpool"], "reshape": [64, 64]},
        store,
    )
    assert calls and "resnet18" in calls[0]
    assert result.artifact.manifest["source"]["weights"] == "default"


def test_offline_default_weights_give_a_clear_error(tmp_path, store, monkeypatch) -> None:
    import torchvision.models._api as api

    def offline(url: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError("network is unreachable")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(
        ExportError, match=r"could not get the pretrained weights.*use weights: none"
    ):
        export_one(tmp_path, {"model_name": "resnet34", "output_layers": ["avgpool"]}, store)


def test_parity_failure_is_a_typed_error_listing_each_layer(
    tmp_path, store, resnet18_state_dict
) -> None:
    from ducho_fast.exporters.base import export_with
    from ducho_fast.exporters.pt import TorchExporter

    class Drifting(TorchExporter):
        def reference(self, built: Any, payload: Any) -> dict[str, np.ndarray]:
            return {k: v * 1.01 for k, v in super().reference(built, payload).items()}

    spec = load_config(
        visual_config(
            tmp_path, resnet18_entry(resnet18_state_dict, output_layers=["avgpool", "fc"]), store
        )
    ).models()[0]
    with pytest.raises(
        ParityError, match=r"(?s)disagrees with .*avgpool: max \|onnx - ref\|.*fc: max"
    ):
        export_with(Drifting(), spec, tmp_path / "other-store", force=True)
    assert not [p for p in (tmp_path / "other-store").iterdir() if not p.name.startswith(".")]


class ResourceExhaustedError(Exception):
    """As TensorFlow's, which is no RuntimeError."""


TORCH_NO_MEMORY = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 4096000000 bytes. Error code 12"
)
TF_NO_MEMORY = ResourceExhaustedError(
    "{{function_node __wrapped__Conv2D}} OOM when allocating tensor with shape[2,32,4000,4000]"
    "\nHint: If you want to see a list of allocated tensors when OOM happens, add "
    "report_tensor_allocations_upon_oom to RunOptions."
)


@pytest.mark.parametrize(
    ("stage", "error", "said"),
    [
        ("build", TORCH_NO_MEMORY, r"RuntimeError: .*can't allocate memory.*"),
        ("samples", TORCH_NO_MEMORY, r"RuntimeError: .*can't allocate memory.*"),
        ("build", TF_NO_MEMORY, r"ResourceExhaustedError: .*OOM when allocating.*4000\]"),
        ("build", MemoryError(), r"MemoryError"),
    ],
)
def test_memory_running_out_names_the_model_and_its_size(
    tmp_path, store, resnet18_state_dict, stage, error, said
) -> None:
    """torch's allocator failing (a reshape too large for the machine) was a traceback."""
    from ducho_fast.exporters.base import export_with
    from ducho_fast.exporters.pt import TorchExporter

    def no_memory(*args: Any) -> Any:
        raise error

    exporter = TorchExporter()
    setattr(exporter, stage, no_memory)
    spec = load_config(
        visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    ).models()[0]
    with pytest.raises(
        ExportError,
        match=r"visual\.items\.model\.0 \(.*\): the export ran out of memory at reshape "
        rf"\[64, 64\] \({said}\)\. Exporting .*check that reshape",
    ):
        export_with(exporter, spec, tmp_path / "other-store", force=True)
    assert not [p for p in (tmp_path / "other-store").iterdir() if not p.name.startswith(".")]


def test_other_runtime_errors_of_an_export_stay_as_they_are(
    tmp_path, store, resnet18_state_dict
) -> None:
    from ducho_fast.exporters.base import export_with
    from ducho_fast.exporters.pt import TorchExporter

    def broken(*args: Any) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    exporter = TorchExporter()
    exporter.build = broken  # type: ignore[assignment,method-assign]
    spec = load_config(
        visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    ).models()[0]
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        export_with(exporter, spec, tmp_path / "other-store", force=True)


def test_exports_of_one_model_at_once_build_it_once(tmp_path, resnet18_state_dict) -> None:
    """The tasks of a job array that each run ``export`` first: one builds the artifact, the
    others wait for it and reuse it, instead of replacing it under the extracts running."""
    store = tmp_path / "store"
    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    lock = store / f".exporting-{slug_for(load_config(config).models()[0])}.lock"
    store.mkdir()
    held = lock_file(lock)  # an export under way
    assert held is not None
    write_holder(held, "the test's export")
    tasks = [
        subprocess.Popen(
            [sys.executable, "-m", "ducho_fast", "export", str(path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for _ in range(2)
    ]
    try:
        for task in tasks:
            waiting = "is being exported by another process now (the test's export); waiting"
            assert waiting in read_until(task, waiting)
    finally:
        unlock_file(held, lock)
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    said = sorted(out.decode().split(": ", 1)[1].split(" ->")[0] for out, _ in outputs)
    assert said[0].startswith("exported in ") and said[1] == "reused", said
    assert not lock.exists()
    assert ducho_fast.export(config)[0].reused


def read_until(task: subprocess.Popen[bytes], text: str, seconds: float = 120) -> str:
    """What ``task`` wrote to stderr up to ``text`` (or its end, or ``seconds``)."""
    assert task.stderr is not None
    seen = b""
    deadline = time.monotonic() + seconds
    while text.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([task.stderr], [], [], 0.5)
        if ready:
            chunk = os.read(task.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_an_unwritable_store_is_named_before_the_export(tmp_path, resnet18_state_dict) -> None:
    (tmp_path / "store").write_text("a file where the store goes")
    with pytest.raises(
        ArtifactError, match=r"cannot write to the model store .*store \(key 'store'\)"
    ):
        export_one(tmp_path, resnet18_entry(resnet18_state_dict), tmp_path / "store")
