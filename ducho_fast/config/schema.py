"""The shape of a config: every key ducho-fast understands, its types and allowed values.

A superset of Ducho's v2 YAML schema (v1 spellings are renamed by ``compat``). Checking a raw
mapping against this spec reports the first wrong key with its full path, what was found,
what is allowed and the closest spelling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ducho_fast.errors import ConfigError, did_you_mean

MODALITIES = ("visual", "textual", "audio", "visual_textual")
ORIGINS = ("items", "interactions")
FUSION_MODES = ("concat", "sum", "mul", "mean")
BACKENDS = ("torch", "tensorflow", "transformers", "sentence_transformers")
LAYOUTS = ("ducho", "matrix")


@dataclass(frozen=True)
class Key:
    """One allowed key: its types, optional choices and, for mappings and lists, children."""

    types: tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    children: dict[str, Key] | None = None
    item: Key | None = None
    doc: str = ""


_STR = Key((str,))
_INT = Key((int,))
_BOOL = Key((bool,))
# auto | on | off; YAML 1.1 reads a bare on/off as true/false, so those are taken as well.
_SWITCH = ("auto", "on", "off", True, False)
_NUM = Key((int, float))
_NUM_LIST = Key((list,), item=_NUM)
_LAYER = Key(
    (str, int, dict),
    children={"visual": Key((str,)), "textual": Key((str,))},
    doc="layer name or index; two-tower models: {visual: path, textual: path}",
)

MODEL_KEYS: dict[str, Key] = {
    "model_name": Key((str,), doc="torchvision name, local file or folder"),
    "backend": Key((str,), choices=(*BACKENDS, "sentence-transformers")),
    "output_layers": Key((list,), item=_LAYER),
    "reshape": Key((list,), item=_INT, doc="[width, height] for PIL's bicubic resize"),
    "preprocessing": Key(
        (str, type(None)),
        choices=("zscore", "minmax", "caffe", "tf", "torch", "raw", "unit", None),
        doc="caffe|tf|torch|raw|unit: tensorflow models only",
    ),
    "mean": _NUM_LIST,
    "std": _NUM_LIST,
    "clear_text": _BOOL,
    "batch_size": _INT,
    "fusion": Key((str,), choices=FUSION_MODES),
    "tokenizer_name": _STR,
    "image_processor": _STR,
    "task": _STR,
    "weights": Key((str, type(None)), doc="default | none | path to a state dict"),
    "architecture": Key((str,), doc="torchvision builder or 'package.module:callable'"),
    "architecture_kwargs": Key((dict,)),
    "trust": _BOOL,
    "max_length": _INT,
    "pooling": Key((str, type(None)), choices=("mean", "max", "none", None)),
    "max_seconds": Key((int, float, type(None)), doc="audio: embed only the first seconds"),
    "sample_rate": Key((int, type(None)), doc="audio torch files: the model's rate (16000)"),
    "precision": Key(
        (str,), choices=("fp32", "fp16", "int8", "bf16"), doc="exported graph precision (fp32)"
    ),
}

BLOCK_KEYS: dict[str, Key] = {
    "input_path": Key((str, dict)),
    "output_path": Key((str, dict)),
    "item_column": _STR,
    "text_column": _STR,
    "interaction_columns": Key((list,), item=_STR, doc="textual.interactions: [user, item]"),
    "unpaired": Key((str,), choices=("skip", "fail"), doc="visual_textual: ids in one modality"),
    "model": Key((list,), item=Key((dict,), children=MODEL_KEYS)),
}

MODALITY_KEYS: dict[str, Key] = {o: Key((dict,), children=BLOCK_KEYS) for o in ORIGINS}

RUNTIME_KEYS: dict[str, Key] = {
    "device": _STR,
    "allow_fallback": _BOOL,
    "threads": _INT,
    "prefetch": _INT,
    "workers": _INT,
    "writers": _INT,
    "readers": Key(
        (str,),
        choices=("threads", "processes"),
        doc="images/audio: decoded in threads or processes",
    ),
    "token_budget": Key((int,), doc="text: tokens per batch (rows x padded length); 0 = auto"),
    "sort_window": Key((int,), doc="text: batches sorted by length together; 0 = auto (64)"),
    "concurrent_batches": Key(
        (int,), doc="CPU: batches run at once, threads shared out; 0 = auto (at most 4)"
    ),
    "io_binding": Key((str, bool), choices=_SWITCH, doc="auto: on for CUDA sessions"),
    "spin_wait": Key(
        (str, bool), choices=_SWITCH, doc="CPU: ORT's threads spin; auto: not beside decoders"
    ),
    "cuda_options": Key((dict,), doc="CUDA provider options, e.g. cudnn_conv_algo_search"),
    "memory_limit": Key(
        (str, bool, int, float),
        doc="CPU: memory for the model's activations; auto, off, or 8GB, 512MiB",
    ),
    "on_error": Key((str,), choices=("skip", "fail")),
}

OUTPUT_KEYS: dict[str, Key] = {
    "squeeze": _BOOL,
    "layouts": Key((list,), item=Key((str,), choices=LAYOUTS)),
    "dtype": Key((str,), choices=("float32", "float16")),
    "id_order": Key((str, type(None)), doc="file with one item id per line: matrix row order"),
    "resume": _BOOL,
}

INPUT_KEYS: dict[str, Key] = {
    "exif_orientation": Key((str,), choices=("apply", "ignore")),
    "jpeg_decode": Key((str,), choices=("full", "reduced")),
    "max_image_pixels": _INT,
    "max_audio_seconds": _NUM,
}

FUSION_KEYS: dict[str, Key] = {
    "inputs": Key(
        (list,), item=_STR, doc="model entries (visual.items.model.0[:layer]) or folders"
    ),
    "mode": Key((str,), choices=FUSION_MODES),
    "normalize": _BOOL,
    "output_path": _STR,
}

TOP_KEYS: dict[str, Key] = {
    "dataset_path": _STR,
    "gpu list": Key((str, int, list)),
    "store": _STR,
    "runtime": Key((dict,), children=RUNTIME_KEYS),
    "output": Key((dict,), children=OUTPUT_KEYS),
    "input": Key((dict,), children=INPUT_KEYS),
    "model": Key((dict,), children=MODEL_KEYS, doc="defaults for every model entry"),
    "fusion": Key((list,), item=Key((dict,), children=FUSION_KEYS)),
    **{m: Key((dict,), children=MODALITY_KEYS) for m in MODALITIES},
}


@dataclass
class Checker:
    """Walks a raw mapping against the spec; ``source`` names the file in messages."""

    source: str
    errors: list[str] = field(default_factory=list)

    def check(self, raw: dict[str, Any]) -> None:
        self._mapping(raw, TOP_KEYS, "")

    def _mapping(self, raw: dict[str, Any], spec: dict[str, Key], path: str) -> None:
        for name, value in raw.items():
            where = f"{path}.{name}" if path else str(name)
            key = spec.get(name)
            if key is None:
                allowed = ", ".join(sorted(spec))
                raise ConfigError(
                    f"{self.source}: unknown key '{where}'.{did_you_mean(str(name), spec)}"
                    f"{_elsewhere(str(name), path)}\nAllowed here: {allowed}"
                )
            self._value(value, key, where)

    def _value(self, value: Any, key: Key, where: str) -> None:
        if not _has_type(value, key.types):
            allowed = " or ".join(_type_name(t) for t in key.types)
            found = (
                "no value (null, or a YAML key with nothing after its colon): give it one, "
                "or remove the key"
                if value is None
                else f"{_type_name(type(value))} {value!r}"
            )
            raise ConfigError(f"{self.source}: key '{where}' must be {allowed}, found {found}.")
        if isinstance(value, float) and not math.isfinite(value):
            # YAML's .nan and .inf: a NaN mean makes every feature NaN, an infinite std zeros
            # a channel, and no limit compares with NaN.
            raise ConfigError(
                f"{self.source}: key '{where}' must be a finite number, found {value!r} (YAML's "
                f"{'.nan' if math.isnan(value) else '.inf'})."
            )
        if key.choices is not None and value not in key.choices:
            shown = ", ".join(repr(c) for c in key.choices)
            raise ConfigError(
                f"{self.source}: key '{where}' is {value!r}; allowed: {shown}."
                f"{did_you_mean(str(value), [str(c) for c in key.choices])}"
            )
        if key.children is not None and isinstance(value, dict):
            self._mapping(value, key.children, where)
        if key.item is not None and isinstance(value, list):
            for i, element in enumerate(value):
                self._value(element, key.item, f"{where}.{i}")


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    # YAML booleans are ints to Python; a bool is only accepted where bool is asked for.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _type_name(t: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(t, t.__name__)


def _homes() -> dict[str, list[str]]:
    """Each key's places in a config, written as a path (``<modality>`` and ``[]`` for any)."""
    sections: list[tuple[str, dict[str, Key]]] = [
        ("", TOP_KEYS),
        ("<modality>.", MODALITY_KEYS),
        ("<modality>.<items|interactions>.", BLOCK_KEYS),
        ("<modality>.<items|interactions>.model[].", MODEL_KEYS),
        ("model.", MODEL_KEYS),
        ("runtime.", RUNTIME_KEYS),
        ("output.", OUTPUT_KEYS),
        ("input.", INPUT_KEYS),
        ("fusion[].", FUSION_KEYS),
    ]
    homes: dict[str, list[str]] = {}
    for prefix, keys in sections:
        for name in keys:
            homes.setdefault(name, []).append(prefix + name)
    return homes


HOMES = _homes()


def _elsewhere(name: str, path: str) -> str:
    """Where a key that is unknown at ``path`` is known: a key written at the wrong level.
    Inside a modality's block, its places there are named with that block's words."""
    homes = HOMES.get(name)
    if not homes:
        return ""
    parts = path.split(".")
    if parts[0] in MODALITIES:
        homes = [h.replace("<modality>", parts[0]) for h in homes]
        if len(parts) > 1 and parts[1] in ORIGINS:
            homes = [h.replace("<items|interactions>", parts[1]) for h in homes]
    return f" '{name}' is a key of another section: " + " or ".join(homes) + "; move it there."
