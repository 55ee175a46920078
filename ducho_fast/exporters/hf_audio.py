"""Transformers audio models (``Wav2Vec2Model``, ``HubertModel``, …) from a model folder.

The graph takes mono float32 waveforms at the feature extractor's sample rate and does the
extractor's normalization (zero mean, unit variance per item) inside. ``output_layers``: an
integer N is ``hidden_states[N]`` (0 = the feature projection), or ``last_hidden_state``.
Outputs keep the time axis, ``(frames, D)`` per item as Ducho saves them, unless ``pooling``
(``mean`` or ``max`` over time) is set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.errors import ExportError
from ducho_fast.exporters.audio_common import audio_samples, pool_frames, waveform_built
from ducho_fast.exporters.base import Built, Exporter
from ducho_fast.exporters.compat import import_torch, import_transformers
from ducho_fast.exporters.hf import (
    available_layers,
    layer_ref,
    load_pretrained,
    model_source,
    select,
)
from ducho_fast.exporters.layers import check_layers

torch = import_torch()
_Module: Any = torch.nn.Module
transformers = import_transformers()

NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


class AudioGraph(_Module):
    """Normalizes each waveform as the feature extractor does, runs the model, selects layers."""

    def __init__(
        self, model: Any, layers: list[str | int], normalize: bool, pooling: str | None
    ) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.normalize = normalize
        self.pooling = pooling
        self.hidden = any(isinstance(x, int) for x in layers)

    def forward(self, waveform: Any) -> tuple[Any, ...]:
        x = waveform
        if self.normalize:
            mean = x.mean(dim=1, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
            x = (x - mean) / torch.sqrt(var + NORM_EPS)
        out = self.model(input_values=x, output_hidden_states=self.hidden, return_dict=True)
        return tuple(pool_frames(select(out, layer), self.pooling) for layer in self.layers)


class AudioExporter(Exporter):
    reference_name = "Transformers eager with its feature extractor (one clip at a time)"

    def build(self, spec: ModelSpec) -> Built:
        source = model_source(spec)
        model = load_pretrained(transformers.AutoModel, source, spec, "model").eval()
        extractor = load_pretrained(
            transformers.AutoFeatureExtractor, source, spec, "feature extractor"
        )
        if getattr(extractor, "feature_size", 1) != 1 or not hasattr(extractor, "sampling_rate"):
            raise ExportError(
                f"'{spec.key_path}': {type(model).__name__} does not take raw waveforms (its "
                f"feature extractor is {type(extractor).__name__}); ducho-fast runs waveform "
                "models such as Wav2Vec2Model and HubertModel."
            )
        layers = [layer_ref(x) for x in spec.layer_labels()]
        check_layers(
            [str(x) for x in layers],
            [str(x) for x in available_layers(model)],
            model=spec.model_name,
            backend="transformers",
        )
        normalize = bool(getattr(extractor, "do_normalize", False))
        module = AudioGraph(model, layers, normalize, spec.pooling).eval()
        return waveform_built(
            module,
            layers,
            spec,
            rate=int(extractor.sampling_rate),
            min_samples=_receptive_field(model),
            normalize="zero mean, unit variance per item (in the graph)" if normalize else None,
            source={
                "framework": f"transformers {transformers.__version__}",
                "class": type(model).__name__,
            },
            reference=(model, extractor, layers, spec.pooling),
        )

    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        return audio_samples(int(built.preprocessing["sample_rate"]))

    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        model, extractor, layers, pooling = built.reference
        rate = int(built.preprocessing["sample_rate"])
        inputs = extractor(payload, sampling_rate=rate, return_tensors="pt")
        out = model(**inputs, output_hidden_states=True, return_dict=True)
        result = {}
        for spec, layer in zip(built.outputs, layers, strict=True):
            value = select(out, layer)[0]
            if pooling == "mean":
                value = value.mean(dim=0)
            elif pooling == "max":
                value = value.amax(dim=0)
            result[spec["layer"]] = value.numpy()
        return result


def _receptive_field(model: Any) -> int:
    """The fewest samples the convolutional front end turns into one frame."""
    kernels = getattr(model.config, "conv_kernel", None)
    strides = getattr(model.config, "conv_stride", None)
    if not kernels or not strides:
        return 1
    size, jump = 1, 1
    for kernel, stride in zip(kernels, strides, strict=True):
        size += (kernel - 1) * jump
        jump *= stride
    return int(size)
