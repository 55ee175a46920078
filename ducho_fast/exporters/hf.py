"""Transformers text models (``AutoModel``), with Ducho's ``output_layers``.

``pooler_output`` and ``last_hidden_state`` are output attributes; an integer N is
``hidden_states[N]`` (0 = embeddings). Token-level layers keep the token axis, cut to each
text's real tokens, as Ducho's unpadded one-text-at-a-time run returns them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.errors import ExportError
from ducho_fast.exporters import hub
from ducho_fast.exporters.base import Built, Exporter
from ducho_fast.exporters.compat import import_torch, import_transformers
from ducho_fast.exporters.layers import check_layers
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
transformers = import_transformers()


class TextGraph(_Module):
    """Calls the model with keyword arguments and returns the selected layers."""

    def __init__(self, model: Any, names: list[str], layers: list[str | int]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.layers = layers
        self.hidden = any(isinstance(x, int) for x in layers)

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        kwargs = dict(zip(self.names, inputs, strict=True))
        out = self.model(**kwargs, output_hidden_states=self.hidden, return_dict=True)
        return tuple(select(out, layer) for layer in self.layers)


def select(out: Any, layer: str | int) -> Any:
    if isinstance(layer, int):
        return out.hidden_states[layer]
    return getattr(out, layer)


def model_source(spec: ModelSpec) -> str:
    return str(spec.local_path) if spec.local_path else spec.model_name


def load_pretrained(loader: Any, source: str, spec: ModelSpec, what: str) -> Any:
    offline = hub.unreachable(source)
    try:
        return loader.from_pretrained(source, trust_remote_code=spec.trust, **hub.options(offline))
    except Exception as e:  # a missing, damaged or foreign file raises anything (safetensors...)
        remote = hub.cache_fix(source, offline) if offline else ""
        raise loading_error(spec.key_path, what, source, e, remote) from e


def loading_error(
    key: str, what: str, source: str, error: Exception, remote: str = ""
) -> ExportError:
    """The ExportError for a model, tokenizer or processor that did not load from ``source``:
    a local folder has a file missing, damaged or not what the library expects; a hub name
    needs the network (``remote``: what to give instead)."""
    lines = str(error).splitlines()
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
    if Path(source).is_dir():
        fix = "A file of that folder is missing, damaged or not what the library expects."
    elif not hub.is_hub_name(source):  # the library's "Repo id must…" misleads
        under = "the working directory"
        under = under if key == "layers" else f"dataset_path, then {under}"
        return ExportError(
            f"'{key}': cannot load the {what} '{source}': no such folder (a path, not a hub "
            f"name). Check it: a relative path is looked for under {under}."
        )
    else:
        fix = remote or "Without network, give a local model folder."
    return ExportError(f"'{key}': cannot load the {what} '{source}' ({reason}). {fix}")


def available_layers(model: Any) -> list[str | int]:
    layers: list[str | int] = ["last_hidden_state"]
    if getattr(model, "pooler", None) is not None:
        layers.insert(0, "pooler_output")
    count = getattr(model.config, "num_hidden_layers", 0)
    return layers + list(range(count + 1))


def layer_ref(value: str | int) -> str | int:
    """A layer label as ``select`` takes it: digits name ``hidden_states[N]``."""
    number = value.lstrip("-") if isinstance(value, str) else ""
    return int(value) if number.isascii() and number.isdigit() else value


class TransformersExporter(Exporter):
    reference_name = "Transformers eager (one text at a time, unpadded, as Ducho)"

    def build(self, spec: ModelSpec) -> Built:
        source = model_source(spec)
        model = load_pretrained(transformers.AutoModel, source, spec, "model").eval()
        tokenizer = load_pretrained(
            transformers.AutoTokenizer, spec.tokenizer_name or source, spec, "tokenizer"
        )
        layers = [layer_ref(x) for x in spec.layer_labels()]
        check_layers(
            [str(x) for x in layers],
            [str(x) for x in available_layers(model)],
            model=spec.model_name,
            backend="transformers",
        )
        names = text_inputs(tokenizer)
        limit = max_length(
            spec.max_length, tokenizer, getattr(model.config, "max_position_embeddings", None)
        )
        module = TextGraph(model, names, layers).eval()
        example, axes, inputs = text_io(names, torch)
        with torch.no_grad():
            shapes = [tuple(o.shape) for o in module(*example)]
        return Built(
            module=module,
            example=example,
            input_names=names,
            dynamic_axes=axes,
            outputs=[_output(i, layers[i], s) for i, s in enumerate(shapes)],
            inputs=inputs,
            preprocessing=text_preprocessing(tokenizer, limit),
            source={
                "framework": f"transformers {transformers.__version__}",
                "class": type(model).__name__,
            },
            files={"tokenizer.json": save_tokenizer(fast_tokenizer(tokenizer, spec.key_path))},
            reference=(module, tokenizer, limit),
        )

    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        return list(SAMPLE_TEXTS)

    def calibration(self, spec: ModelSpec, built: Built) -> list[Any]:
        return list(CALIBRATION_TEXTS)

    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        module, tokenizer, limit = built.reference
        enc = tokenizer(payload, truncation=True, max_length=limit, return_tensors="pt")
        values = module(
            *[enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in module.names]
        )
        return {o["layer"]: v[0].numpy() for o, v in zip(built.outputs, values, strict=True)}


def _output(index: int, layer: str | int, shape: tuple[int, ...]) -> dict[str, Any]:
    per_token = len(shape) == 3
    return {
        "name": f"out{index}",
        "layer": str(layer),
        "dim": int(shape[-1]),
        "per_token": per_token,
        "squeeze": False,
        "pooling": None,
    }


def list_layers(model_name: str, trust: bool = False) -> list[str]:
    """Selectable ``output_layers`` of a Transformers model (loads its config and weights)."""
    offline = hub.unreachable(model_name)
    try:
        model = transformers.AutoModel.from_pretrained(
            model_name, trust_remote_code=trust, **hub.options(offline)
        )
    except Exception as e:
        remote = hub.cache_fix(model_name, offline) if offline else ""
        raise loading_error("layers", "model", model_name, e, remote) from e
    from ducho_fast.exporters.hf_towers import FAMILIES, tower_layers

    if type(model).__name__ in FAMILIES:
        return tower_layers(model)
    return [str(x) for x in available_layers(model)]
