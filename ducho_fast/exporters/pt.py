"""PyTorch / torchvision visual models, truncated at torch.fx nodes as Ducho does.

Models come from a torchvision name (weights ``default``, ``none`` or a local state dict), a
local state dict with an ``architecture``, a TorchScript file, or a full pickled module (only
with ``trust: true``). The graph takes uint8 NHWC and does ToTensor + Normalize inside.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.errors import ExportError, did_you_mean
from ducho_fast.exporters.base import Built, Exporter, build_with_kwargs, image_output
from ducho_fast.exporters.compat import import_torch, import_torchvision
from ducho_fast.exporters.layers import check_layers, layers_command, torch_layer_names

torch = import_torch()
_Module: Any = torch.nn.Module  # torch is typed as Any here (imported lazily)
torchvision = import_torchvision()
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

TORCHSCRIPT_LAYER = "output"


class VisualGraph(_Module):
    """uint8 NHWC in; ToTensor, then Ducho's zscore/minmax, then the truncated model."""

    def __init__(self, body: Any, keys: list[str], scaling: str | None, mean: Any, std: Any):
        super().__init__()
        self.body = body
        self.keys = keys
        self.scaling = scaling
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: Any) -> tuple[Any, ...]:
        x = pixels.permute(0, 3, 1, 2).float() / 255.0
        if self.scaling == "zscore":
            x = (x - self.mean) / self.std
        elif self.scaling == "minmax":
            # Ducho's MinMaxNormalize: per image, over all channels.
            low = x.amin(dim=(1, 2, 3), keepdim=True)
            high = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - low) / (high - low)
        out = self.body(x)
        if isinstance(out, dict):
            return tuple(out[k] for k in self.keys)
        return (out,)


class TorchExporter(Exporter):
    reference_name = "PyTorch eager (torchvision ToTensor/Normalize, create_feature_extractor)"

    def build(self, spec: ModelSpec) -> Built:
        model, source = load_model(spec)
        model.eval()
        layers = [str(x) for x in spec.output_layers]
        body, keys = _truncate(model, layers, spec)
        module = VisualGraph(body, keys, spec.preprocessing, spec.mean, spec.std).eval()
        width, height = spec.reshape or (224, 224)
        example = (torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8),)
        with torch.no_grad():
            shapes = [tuple(o.shape[1:]) for o in module(*example)]
        return Built(
            module=module,
            example=example,
            input_names=["pixels"],
            dynamic_axes={"pixels": {0: "batch", 1: "height", 2: "width"}},
            outputs=[
                image_output(f"out{i}", layer, s)
                for i, (layer, s) in enumerate(zip(layers, shapes, strict=True))
            ],
            inputs=[
                {
                    "name": "pixels",
                    "dtype": "uint8",
                    "layout": "NHWC",
                    "shape": ["batch", "height", "width", 3],
                }
            ],
            preprocessing=_preprocessing(spec),
            source=source,
            reference=module,
        )

    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        width, height = spec.reshape or (224, 224)
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(3)]
        ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
        images.append(ramp.astype(np.uint8))
        if spec.reshape is None:
            images.append(rng.integers(0, 256, (height + 32, width - 32, 3), dtype=np.uint8))
        return images

    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        graph: VisualGraph = built.reference
        x = TF.to_tensor(np.array(payload, copy=True))
        if graph.scaling == "zscore":
            x = TF.normalize(x, graph.mean.view(3).tolist(), graph.std.view(3).tolist())
        elif graph.scaling == "minmax":
            x = (x - x.min()) / (x.max() - x.min())
        out = graph.body(x[None])
        values = [out[k] for k in graph.keys] if isinstance(out, dict) else [out]
        return {
            o["layer"]: np.squeeze(v.numpy()) for o, v in zip(built.outputs, values, strict=True)
        }


def _preprocessing(spec: ModelSpec) -> dict[str, Any]:
    return {
        "resize": list(spec.reshape) if spec.reshape else None,
        "interpolation": "bicubic",
        "color": "RGB",
        "scaling": spec.preprocessing or "unit",  # unit = ToTensor's x / 255
        "mean": list(spec.mean) if spec.preprocessing == "zscore" else None,
        "std": list(spec.std) if spec.preprocessing == "zscore" else None,
        "in_graph": ["cast", "scale", "normalize", "transpose"],
    }


def layers_hint(spec: ModelSpec) -> str:
    """The ``ducho-fast layers`` command that lists this entry's layers, with what loading
    it takes (architecture, its arguments, trust) and the model file's full path."""
    return layers_command(
        "torch",
        str(spec.local_path or spec.model_name),
        architecture=spec.architecture,
        architecture_kwargs=spec.architecture_kwargs,
        trust=spec.trust,
    )


def _truncate(model: Any, layers: list[str], spec: ModelSpec) -> tuple[Any, list[str]]:
    hint = layers_hint(spec)
    if isinstance(model, torch.jit.ScriptModule):
        check_layers(
            layers, [TORCHSCRIPT_LAYER], model=spec.model_name, backend="torch", command=hint
        )
        return model, [TORCHSCRIPT_LAYER]
    names = torch_layer_names(model)
    check_layers(layers, names, model=spec.model_name, backend="torch", command=hint)
    keys = [f"out{i}" for i in range(len(layers))]
    body = create_feature_extractor(model, return_nodes=dict(zip(layers, keys, strict=True)))
    return body, keys


# -- loading ------------------------------------------------------------------------------


def load_model(spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """The eager source model and what the manifest records about where it came from."""
    path = spec.local_path
    if path is not None and path.is_file():
        return _from_file(spec, path)
    if path is not None and path.is_dir():
        raise ExportError(
            f"'{spec.key_path}.model_name' {path} is a folder; torch models are files."
        )
    return _from_torchvision(spec)


def _from_torchvision(spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    name = (spec.architecture or spec.model_name).lower()
    builder = _torchvision_builder(name, spec)
    kwargs = spec.architecture_kwargs
    weights = spec.weights or "default"
    if spec.weights_path is not None:
        model = build_with_kwargs(builder, spec, name, {"weights": None, **kwargs})
        load_state_dict(model, spec.weights_path, f"'{spec.key_path}.weights'")
        return model, _source(name, str(spec.weights_path), spec.weights_path)
    if weights.lower() == "none":
        model = build_with_kwargs(builder, spec, name, {"weights": None, **kwargs})
        return model, _source(name, "none", None)
    try:
        chosen = "DEFAULT" if weights.lower() == "default" else weights
        model = build_with_kwargs(builder, spec, name, {"weights": chosen, **kwargs})
    except (OSError, RuntimeError, ValueError) as e:
        raise ExportError(
            f"'{spec.key_path}': could not get the pretrained weights '{weights}' for {name} "
            f"({type(e).__name__}: {e}). Without network, use weights: none or a local "
            "state-dict file (weights: path/to/file.pth)."
        ) from e
    return model, _source(name, weights, None)


def _torchvision_builder(name: str, spec: ModelSpec) -> Any:
    names = torchvision.models.list_models()
    if name not in names:
        raise ExportError(
            f"'{spec.key_path}.model_name' '{spec.model_name}' is neither a torchvision model "
            f"nor an existing file (looked under dataset_path and the working directory)."
            f"{did_you_mean(name, names)}"
        )
    return torchvision.models.get_model_builder(name)


def _from_file(spec: ModelSpec, path: Path) -> tuple[Any, dict[str, Any]]:
    check_torch_file(path, f"'{spec.key_path}.model_name'")
    if spec.architecture:
        model = build_architecture(spec)
        load_state_dict(model, path, f"'{spec.key_path}.model_name'")
        return model, _source(spec.architecture, str(path), path)
    try:
        return torch.jit.load(str(path), map_location="cpu"), _source(
            "torchscript", str(path), path
        )
    except RuntimeError:
        pass  # not TorchScript
    return _pickled_module(spec, path), _source("pickled module", str(path), path)


def _pickled_module(spec: ModelSpec, path: Path) -> Any:
    try:
        obj = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if not spec.trust:
            raise ExportError(
                f"'{spec.key_path}': {path} is a pickled Python object (a full torch.save "
                "module); loading it runs code from the file. Set trust: true for this model "
                "if you trust the file, or save a state dict (with architecture:) or TorchScript."
            ) from e
        obj = _torch_load(path, weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj
    raise ExportError(
        f"'{spec.key_path}': {path} holds a state dict, not a model. Add "
        "architecture: <torchvision name or package.module:callable> to say what to load it into."
    )


def build_architecture(spec: ModelSpec) -> Any:
    """A torchvision builder by name, or a ``package.module:callable`` (needs ``trust``)."""
    arch = spec.architecture or ""
    if ":" not in arch:
        builder = _torchvision_builder(arch.lower(), spec)
        kwargs = {"weights": None, **spec.architecture_kwargs}
        return build_with_kwargs(builder, spec, arch, kwargs)
    if not spec.trust:
        raise ExportError(
            f"'{spec.key_path}.architecture' '{arch}' calls Python code named by the config. "
            "Set trust: true for this model if you trust it."
        )
    module_name, _, attr = arch.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"'{spec.key_path}.architecture': cannot find '{arch}' ({e}).") from e
    # The config's own code, building a bare architecture: whatever it raises is the config's.
    kwargs = dict(spec.architecture_kwargs)
    return build_with_kwargs(target, spec, arch, kwargs, refused=(Exception,))


# What a file torch saved starts with: a zip archive (torch.save since 1.6, TorchScript) or
# a pickle (the legacy format).
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def check_torch_file(path: Path, key: str) -> None:
    """Raise, naming ``key``, where ``path`` cannot be a file torch saved: torch itself
    fails on such files with whatever its unpickler meets (KeyError, EOFError, ...)."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ExportError(f"{key} {path} cannot be read ({e.strerror or e}).") from e
    if not head.startswith(TORCH_FILE_STARTS):
        found = "it is empty" if not head else "its first bytes are those of another format"
        raise ExportError(
            f"{key} {path} is not a file torch saved (a state dict, a module or TorchScript): "
            f"{found}."
        )


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    """``torch.load`` on the CPU. A damaged file is an ExportError; with ``weights_only``,
    an UnpicklingError (objects other than tensors) is the caller's to explain."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as e:  # the unpickler's KeyError, EOFError, a zip's errors, ...
        if weights_only and isinstance(e, pickle.UnpicklingError):
            raise
        raise ExportError(
            f"{path} cannot be read by torch ({type(e).__name__}: {e}); it is damaged or "
            "not a torch file."
        ) from e


def load_state_dict(model: Any, path: Path, key: str = "the weights file") -> None:
    """Load a state dict file into ``model``; ``key`` names the file in errors."""
    check_torch_file(path, key)
    try:
        state = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ExportError(f"{path} is not a plain state dict (it holds pickled objects).") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[:4]
        raise ExportError(
            f"the weights in {path} do not fit {type(model).__name__}: " + " ".join(first)
        ) from e


def _source(architecture: str, weights: str, path: Path | None) -> dict[str, Any]:
    from ducho_fast.artifact import sha256_file

    return {
        "framework": f"torch {torch.__version__}, torchvision {torchvision.__version__}",
        "architecture": architecture,
        "weights": weights,
        "weights_sha256": sha256_file(path) if path is not None else None,
    }
