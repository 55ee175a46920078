"""PyTorch audio models: torchaudio pipeline bundles by Ducho's names, and custom models.

``model_name`` is a bundle of ``torchaudio.pipelines`` (``WAV2VEC2_BASE``, ``HUBERT_BASE``,
``WAVLM_BASE`` …; weights ``default`` downloads them, ``none`` is random, a file is a state
dict), or a local file: TorchScript, a state dict with ``architecture``, or a pickled module
(``trust``). The graph takes mono float32 waveforms at the model's rate.

Layers follow Ducho v1: an integer N is the last tensor of ``extract_features(waveform,
num_layers=N)``, the output of transformer layer N. Modules without ``extract_features`` take
torch.fx layer names as visual models do, or ``output`` (the forward result; its first element
when it returns a tuple). Outputs keep the time axis unless ``pooling`` is set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.errors import ExportError, did_you_mean
from ducho_fast.exporters.audio_common import audio_samples, pool_frames, waveform_built
from ducho_fast.exporters.base import Built, Exporter, build_with_kwargs
from ducho_fast.exporters.compat import import_torch, import_torchaudio
from ducho_fast.exporters.layers import check_layers, torch_layer_names
from ducho_fast.exporters.pt import (
    TORCHSCRIPT_LAYER,
    create_feature_extractor,
    layers_hint,
    load_model,
    load_state_dict,
)

torch = import_torch()
_Module: Any = torch.nn.Module
DEFAULT_RATE = 16000
OUTPUT = "output"
LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm, as torchaudio's bundles normalize


class TorchAudioGraph(_Module):
    """Waveforms in; per-item layer norm when the bundle asks for it; the chosen layers out."""

    def __init__(
        self, body: Any, layers: list[str | int], normalize: bool, pooling: str | None
    ) -> None:
        super().__init__()
        self.body = body
        self.layers = layers
        self.normalize = normalize
        self.pooling = pooling

    def forward(self, waveform: Any) -> tuple[Any, ...]:
        x = waveform
        if self.normalize:
            # torchaudio normalizes over the whole batch tensor; Ducho runs one clip at a time,
            # so per clip is what its outputs are.
            # (layer_norm with a dynamic length does not export, so written out.)
            mean = x.mean(dim=1, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
            x = (x - mean) / torch.sqrt(var + LAYER_NORM_EPS)
        return tuple(pool_frames(v, self.pooling) for v in self._layers(x))

    def _layers(self, x: Any) -> list[Any]:
        if all(isinstance(layer, int) for layer in self.layers):
            deepest = max(int(layer) for layer in self.layers)
            features, _ = self.body.extract_features(x, num_layers=deepest)
            return [features[int(layer) - 1] for layer in self.layers]
        out = self.body(x)
        if isinstance(out, dict):
            return [out[str(layer)] for layer in self.layers]
        return [out[0] if isinstance(out, tuple | list) else out]


class TorchAudioExporter(Exporter):
    reference_name = "PyTorch eager, one clip at a time (Ducho v1: extract_features(num_layers=N))"

    def build(self, spec: ModelSpec) -> Built:
        model, rate, normalize, source = load_audio_model(spec)
        model.eval()
        layers = _layers(spec, model)
        body = model
        if not all(isinstance(x, int) for x in layers) and layers != [OUTPUT]:
            body = create_feature_extractor(model, return_nodes={str(x): str(x) for x in layers})
        module = TorchAudioGraph(body, layers, normalize, spec.pooling).eval()
        return waveform_built(
            module,
            layers,
            spec,
            rate=rate,
            min_samples=_receptive_field(model),
            normalize="layer norm per item (in the graph)" if normalize else None,
            source=source,
            reference=(model, layers, normalize, spec.pooling),
        )

    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        return audio_samples(int(built.preprocessing["sample_rate"]))

    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        """Ducho's call, per layer: extract_features(x, num_layers=N), the last tensor."""
        model, layers, normalize, pooling = built.reference
        graph: TorchAudioGraph = built.module
        x = torch.from_numpy(np.asarray(payload, dtype=np.float32))[None]
        if normalize:
            x = torch.nn.functional.layer_norm(x, x.shape)  # what the bundle's wrapper does
        if all(isinstance(layer, int) for layer in layers):
            values = [model.extract_features(x, num_layers=n)[0][-1] for n in layers]
        else:
            values = graph._layers(x)
        result = {}
        for spec, value in zip(built.outputs, values, strict=True):
            item = value[0]
            if item.dim() == 2 and pooling == "mean":
                item = item.mean(dim=0)
            elif item.dim() == 2 and pooling == "max":
                item = item.amax(dim=0)
            result[spec["layer"]] = item.numpy()
        return result


def _layers(spec: ModelSpec, model: Any) -> list[str | int]:
    wanted: list[str | int] = []
    for label in spec.layer_labels():
        number = str(label).lstrip("-")
        wanted.append(int(label) if number.isascii() and number.isdigit() else str(label))
    numeric = [x for x in wanted if isinstance(x, int)]
    if numeric and len(numeric) != len(wanted):
        raise ExportError(
            f"'{spec.key_path}.output_layers' mixes layer numbers and names "
            f"({wanted!r}); list one kind per model entry."
        )
    if numeric:
        depth = _depth(model)
        if depth is None:
            raise ExportError(
                f"'{spec.key_path}.output_layers' {numeric!r}: {type(model).__name__} has no "
                "extract_features(num_layers=N), so layers are module names here. Run "
                f"`{layers_hint(spec)}`."
            )
        check_layers(
            [str(x) for x in numeric],
            [str(n) for n in range(1, depth + 1)],
            model=spec.model_name,
            backend="torch",
            command=layers_hint(spec),
        )
        return wanted
    names = (
        [TORCHSCRIPT_LAYER]
        if isinstance(model, torch.jit.ScriptModule)
        else [OUTPUT, *torch_layer_names(model)]
    )
    check_layers(
        [str(x) for x in wanted],
        names,
        model=spec.model_name,
        backend="torch",
        command=layers_hint(spec),
    )
    if OUTPUT in wanted and len(wanted) > 1:
        raise ExportError(
            f"'{spec.key_path}.output_layers': '{OUTPUT}' (the forward result) cannot be listed "
            "with module names; give it its own model entry."
        )
    return wanted


def _depth(model: Any) -> int | None:
    if not callable(getattr(model, "extract_features", None)):
        return None
    layers = getattr(getattr(getattr(model, "encoder", None), "transformer", None), "layers", None)
    return len(layers) if layers is not None else None


def _receptive_field(model: Any) -> int:
    extractor = getattr(model, "feature_extractor", None)
    blocks = getattr(extractor, "conv_layers", None)
    if blocks is None:
        return 1
    size, jump = 1, 1
    for block in blocks:
        kernel, stride = block.kernel_size, block.stride
        size += (kernel - 1) * jump
        jump *= stride
    return int(size)


# -- loading ------------------------------------------------------------------------------


def bundle_names() -> list[str]:
    torchaudio = import_torchaudio()
    impl = torchaudio.pipelines.Wav2Vec2Bundle
    return sorted(
        name
        for name in dir(torchaudio.pipelines)
        if isinstance(getattr(torchaudio.pipelines, name), impl)
    )


def bundle_layer_names(name: str) -> list[str]:
    """Layer numbers of a bundle, from its parameters (nothing is downloaded)."""
    names = bundle_names()
    if name not in names:
        raise ExportError(
            f"'{name}' is not a torchaudio pipeline bundle.{did_you_mean(name, names)} "
            f"Bundles: {', '.join(names)}."
        )
    bundle = getattr(import_torchaudio().pipelines, name)
    return [str(n) for n in range(1, int(bundle._params["encoder_num_layers"]) + 1)]


def load_audio_model(spec: ModelSpec) -> tuple[Any, int, bool, dict[str, Any]]:
    """The eager model, its sample rate, whether it normalizes waveforms, and its source."""
    path = spec.local_path
    if path is not None and path.is_file():
        model, source = load_model(spec)
        return model, spec.sample_rate or DEFAULT_RATE, False, source
    torchaudio = import_torchaudio()
    names = bundle_names()
    if spec.model_name not in names:
        raise ExportError(
            f"'{spec.key_path}.model_name' '{spec.model_name}' is neither a torchaudio pipeline "
            f"bundle nor an existing file.{did_you_mean(spec.model_name, names)} Bundles: "
            f"{', '.join(names)}."
        )
    bundle = getattr(torchaudio.pipelines, spec.model_name)
    rate = int(bundle.sample_rate)
    if spec.sample_rate is not None and spec.sample_rate != rate:
        raise ExportError(
            f"'{spec.key_path}.sample_rate' is {spec.sample_rate}, but {spec.model_name} was "
            f"trained at {rate} Hz. Remove the key: audio is resampled to the bundle's rate."
        )
    from torchaudio.pipelines._wav2vec2 import utils as bundle_utils

    # architecture_kwargs override the bundle's parameters (a smaller variant, as tests build).
    params = {**bundle._params, **spec.architecture_kwargs}
    model = build_with_kwargs(
        bundle_utils._get_model,
        spec,
        spec.model_name,
        {"type_": bundle._model_type, "params": params},
    )
    weights = spec.weights or "default"
    if spec.weights_path is not None:
        load_state_dict(model, spec.weights_path, f"'{spec.key_path}.weights'")
    elif weights.lower() == "default":
        try:
            model.load_state_dict(bundle._get_state_dict(None))
        except (OSError, RuntimeError, ValueError) as e:
            raise ExportError(
                f"'{spec.key_path}': could not get the pretrained weights of {spec.model_name} "
                f"({type(e).__name__}: {e}). Without network, use weights: none or a local "
                "state-dict file (weights: path/to/file.pth)."
            ) from e
    elif weights.lower() != "none":
        raise ExportError(
            f"'{spec.key_path}.weights' is '{weights}'; torchaudio bundles take default, none "
            "or a state-dict file."
        )
    from ducho_fast.artifact import sha256_file

    source = {
        "framework": f"torch {torch.__version__}, torchaudio {torchaudio.__version__}",
        "architecture": f"torchaudio.pipelines.{spec.model_name}",
        "architecture_kwargs": spec.architecture_kwargs or None,
        "weights": str(spec.weights_path) if spec.weights_path else weights,
        "weights_sha256": sha256_file(spec.weights_path) if spec.weights_path else None,
    }
    return model, rate, bool(bundle._normalize_waveform), source
