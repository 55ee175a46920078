"""sentence-transformers models: the whole ``encode`` (pooling, normalization) in the graph.

Ducho calls ``SentenceTransformer.encode``; its ``output_layers`` value only names the output
folder. The graph returns ``sentence_embedding`` and every label maps to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.exporters import hub
from ducho_fast.exporters.base import Built, Exporter
from ducho_fast.exporters.compat import import_sentence_transformers, import_torch
from ducho_fast.exporters.hf import loading_error, model_source
from ducho_fast.exporters.text_common import (
    CALIBRATION_TEXTS,
    SAMPLE_TEXTS,
    fast_tokenizer,
    max_length,
    save_tokenizer,
    text_inputs,
    text_io,
    text_preprocessing,
)

torch = import_torch()
_Module: Any = torch.nn.Module  # torch is typed as Any here (imported lazily)
sentence_transformers = import_sentence_transformers()


class SentenceGraph(_Module):
    def __init__(self, model: Any, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: Any) -> Any:
        features = dict(zip(self.names, inputs, strict=True))
        return self.model(features)["sentence_embedding"]


class SentenceTransformersExporter(Exporter):
    reference_name = "SentenceTransformer.encode"

    def build(self, spec: ModelSpec) -> Built:
        model = _load(spec)
        tokenizer = model.tokenizer
        limit = max_length(spec.max_length or model.max_seq_length, tokenizer, None)
        model.max_seq_length = limit
        names = text_inputs(tokenizer)
        module = SentenceGraph(model, names).eval()
        example, axes, inputs = text_io(names, torch)
        with torch.no_grad():
            dim = int(module(*example).shape[-1])
        outputs = [
            {
                "name": "embedding",
                "layer": str(x),
                "dim": dim,
                "per_token": False,
                "squeeze": False,
                "pooling": "model",
            }
            for x in spec.output_layers
        ]
        return Built(
            module=module,
            example=example,
            input_names=names,
            dynamic_axes=axes,
            outputs=outputs,
            inputs=inputs,
            preprocessing=text_preprocessing(
                tokenizer, limit, modules=[type(m).__name__ for m in model]
            ),
            source={"framework": f"sentence-transformers {sentence_transformers.__version__}"},
            files={"tokenizer.json": save_tokenizer(fast_tokenizer(tokenizer, spec.key_path))},
            reference=model,
        )

    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        return list(SAMPLE_TEXTS)

    def calibration(self, spec: ModelSpec, built: Built) -> list[Any]:
        return list(CALIBRATION_TEXTS)

    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        vector = built.reference.encode([payload], convert_to_numpy=True)[0]
        return {o["layer"]: vector for o in built.outputs}


def _load(spec: ModelSpec) -> Any:
    source = model_source(spec)
    offline = hub.unreachable(source)
    try:
        return sentence_transformers.SentenceTransformer(
            source, device="cpu", trust_remote_code=spec.trust, **hub.options(offline)
        )
    except Exception as e:  # a missing, damaged or foreign file raises anything
        remote = hub.cache_fix(source, offline) if offline else ""
        what = "sentence-transformers model"
        raise loading_error(spec.key_path, what, source, e, remote) from e
