"""Two-tower Transformers models (CLIP, SigLIP, ALIGN, AltCLIP): each tower its own graph.

The image tower takes uint8 NHWC already resized and cropped on the host exactly as the
model's image processor does (PIL), and rescales and normalizes inside the graph; the text
tower takes token ids from the model's tokenizer. Either runs alone. An integer layer is the
projected, normalized ``image_embeds`` / ``text_embeds`` as the model's forward returns them;
``vision_model_output.X`` / ``text_model_output.X`` are attributes of the tower outputs.
Parity is checked against the full model's forward with the PIL image processor, as Ducho ran
it (one item at a time).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.errors import ExportError
from ducho_fast.exporters import hub
from ducho_fast.exporters.base import Built, Exporter
from ducho_fast.exporters.compat import import_torch, import_transformers
from ducho_fast.exporters.hf import load_pretrained, loading_error, model_source
from ducho_fast.exporters.text_common import (
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

EMBEDS = {"image": "image_embeds", "text": "text_embeds"}
OUTPUT_ATTR = {"image": "vision_model_output", "text": "text_model_output"}


@dataclass(frozen=True)
class Family:
    """How a two-tower class builds ``vision_model_output`` / ``text_model_output``."""

    vision: str  # the model attribute called for the image tower's outputs
    text: str
    text_padding: str = "longest"  # "max_length" where the text tower reads a fixed position


FAMILIES: dict[str, Family] = {
    "CLIPModel": Family(vision="get_image_features", text="get_text_features"),
    "SiglipModel": Family(vision="vision_model", text="text_model", text_padding="max_length"),
    "AlignModel": Family(vision="vision_model", text="text_model"),
    "AltCLIPModel": Family(vision="vision_model", text="text_model"),
}


class TowerGraph(_Module):
    """One tower: its inputs in, the selected outputs out."""

    def __init__(
        self, model: Any, family: Family, tower: str, paths: list[str], names: list[str]
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.tower = tower
        self.paths = paths
        self.names = names
        self.hidden = any("hidden_states" in p for p in paths)
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.scale, self.offset = 1.0 / 255.0, 0.0

    def set_pixels(self, pre: dict[str, Any]) -> None:
        self.scale, self.offset = pre["rescale_factor"], pre["rescale_offset"]
        self.mean.copy_(torch.tensor(pre["mean"]).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(pre["std"]).view(1, 3, 1, 1))

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        if self.tower == "image":
            x = inputs[0].permute(0, 3, 1, 2).float() * self.scale + self.offset
            kwargs = {"pixel_values": (x - self.mean) / self.std}
        else:
            kwargs = dict(zip(self.names, inputs, strict=True))
        return tuple(self._select(path, kwargs) for path in self.paths)

    def _select(self, path: str, kwargs: dict[str, Any]) -> Any:
        if path == EMBEDS[self.tower]:
            method = "get_image_features" if self.tower == "image" else "get_text_features"
            features = getattr(self.model, method)(**kwargs)
            value = getattr(features, "pooler_output", features)
            return value / value.norm(p=2, dim=-1, keepdim=True)
        source = self.family.vision if self.tower == "image" else self.family.text
        out = getattr(self.model, source)(**kwargs, output_hidden_states=self.hidden)
        return attribute_path(out, path.partition(".")[2])


def attribute_path(out: Any, path: str) -> Any:
    """``pooler_output`` or ``hidden_states.3`` of a model output."""
    value = out
    for part in path.split("."):
        value = value[int(part)] if part.lstrip("-").isdigit() else getattr(value, part)
    if not hasattr(value, "shape"):
        raise AttributeError(f"'{path}' is not a tensor")
    return value


def _family(model: Any, spec: ModelSpec) -> Family:
    name = type(model).__name__
    if name not in FAMILIES:
        raise ExportError(
            f"'{spec.key_path}': {spec.model_name} loads as {name}, which is not a two-tower "
            f"model ducho-fast knows. Supported: {', '.join(FAMILIES)}."
        )
    return FAMILIES[name]


class TowersExporter(Exporter):
    reference_name = "Transformers eager full model (PIL image processor, one item, as Ducho)"

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[Any, Any, Any]] = {}

    def _load(self, spec: ModelSpec) -> tuple[Any, Any, Any]:
        source = model_source(spec)
        if source not in self._loaded:  # both towers of one model share one load
            model = load_pretrained(transformers.AutoModel, source, spec, "model").eval()
            _family(model, spec)  # before loading the rest: a one-tower model stops here
            tokenizer = load_pretrained(
                transformers.AutoTokenizer, spec.tokenizer_name or source, spec, "tokenizer"
            )
            processor = _image_processor(spec.image_processor or source, spec)
            self._loaded = {source: (model, tokenizer, processor)}
        return self._loaded[source]

    def build(self, spec: ModelSpec) -> Built:
        model, tokenizer, processor = self._load(spec)
        family = _family(model, spec)
        tower = spec.tower or "image"
        paths = spec.tower_layers()
        _check_paths(paths, tower, spec)
        if tower == "image":
            pre = pixel_preprocessing(processor, spec)
            names = ["pixels"]
            h, w = pre["input_size"][1], pre["input_size"][0]
            example: tuple[Any, ...] = (torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8),)
            axes = {"pixels": {0: "batch"}}
            inputs = [
                {"name": "pixels", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", h, w, 3]}
            ]
        else:
            accepted = _accepted(model.get_text_features) | _accepted(getattr(model, family.text))
            names = [n for n in text_inputs(tokenizer) if n in accepted]
            positions = getattr(model.config.text_config, "max_position_embeddings", None)
            limit = max_length(spec.max_length, tokenizer, positions)
            pre = text_preprocessing(tokenizer, limit, padding=_padding(family))
            example, axes, inputs = text_io(names, torch)
        module = TowerGraph(model, family, tower, paths, names).eval()
        if tower == "image":
            module.set_pixels(pre)
        shapes = _output_shapes(module, example, paths, spec)
        return Built(
            module=module,
            example=example,
            input_names=names,
            dynamic_axes=axes,
            outputs=[
                _output(i, label, s, tower)
                for i, (label, s) in enumerate(zip(spec.layer_labels(), shapes, strict=True))
            ],
            inputs=inputs,
            preprocessing=pre,
            source={
                "framework": f"transformers {transformers.__version__}",
                "class": type(model).__name__,
                "tower": tower,
                "tower_outputs": paths,
            },
            files={}
            if tower == "image"
            else {"tokenizer.json": save_tokenizer(fast_tokenizer(tokenizer, spec.key_path))},
            reference=(model, tokenizer, processor, paths),
            modality="visual" if tower == "image" else "textual",
        )

    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        if spec.tower == "text":
            return list(SAMPLE_TEXTS)
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in _SAMPLE_SIZES]
        ramp = np.linspace(0, 255, 240 * 320 * 3).reshape(240, 320, 3).astype(np.uint8)
        return [*images, ramp]

    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        return self.reference_item(built, payload, payload)

    def reference_item(self, built: Built, raw: Any, payload: Any) -> dict[str, np.ndarray]:
        """The full model's forward on one raw item, its other tower fed a fixed partner."""
        model, tokenizer, processor, paths = built.reference
        tower = built.source["tower"]
        image = raw if tower == "image" else _PARTNER_IMAGE
        text = raw if tower == "text" else "a photo"
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        padding = built.preprocessing.get("padding") if tower == "text" else "longest"
        enc = _tokenize(tokenizer, text, built, padding)
        hidden = any("hidden_states" in p for p in paths)
        out = model(**enc, pixel_values=pixels, output_hidden_states=hidden, return_dict=True)
        values = {}
        for o, path in zip(built.outputs, paths, strict=True):
            if path == EMBEDS[tower]:
                value = getattr(out, path)
            else:
                head, _, rest = path.partition(".")
                value = attribute_path(getattr(out, head), rest)
            values[o["layer"]] = value[0].numpy()
        return values


_SAMPLE_SIZES = [(224, 224), (180, 300), (330, 250)]
_PARTNER_IMAGE = np.full((64, 64, 3), 127, dtype=np.uint8)


def _tokenize(tokenizer: Any, text: str, built: Built, padding: Any) -> dict[str, Any]:
    limit = built.preprocessing.get("max_length", 64) if built.source["tower"] == "text" else 64
    kwargs = {"padding": "max_length"} if padding == "max_length" else {}
    enc = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt", **kwargs)
    accepted = _accepted(built.reference[0].forward)
    return {k: v for k, v in enc.items() if k in accepted}


def _accepted(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)


def _padding(family: Family) -> str:
    return "max_length" if family.text_padding == "max_length" else "dynamic (longest in batch)"


def _check_paths(paths: list[str], tower: str, spec: ModelSpec) -> None:
    for path in paths:
        head = path.partition(".")[0]
        if path != EMBEDS[tower] and head != OUTPUT_ATTR[tower]:
            raise ExportError(
                f"'{spec.key_path}.output_layers': '{path}' is not a {tower}-tower output. Use "
                f"an integer (the projected embeddings), '{OUTPUT_ATTR[tower]}.<attribute>', or "
                "{visual: vision_model_output.X, textual: text_model_output.Y}."
            )


def _output_shapes(
    module: Any, example: tuple[Any, ...], paths: list[str], spec: ModelSpec
) -> list[tuple[int, ...]]:
    try:
        with torch.no_grad():
            return [tuple(o.shape) for o in module(*example)]
    except (AttributeError, IndexError, TypeError) as e:
        raise ExportError(
            f"'{spec.key_path}.output_layers': cannot select {paths} on {spec.model_name} "
            f"({type(e).__name__}: {e}). Attributes of the tower outputs include "
            "pooler_output, last_hidden_state and hidden_states.N."
        ) from e


def _output(index: int, label: str, shape: tuple[int, ...], tower: str) -> dict[str, Any]:
    return {
        "name": f"out{index}",
        "layer": label,
        "dim": int(shape[-1]),
        "item_shape": list(shape[1:]),
        "per_token": tower == "text" and len(shape) == 3,
        "squeeze": False,
        "pooling": None,
    }


def _image_processor(source: str, spec: ModelSpec) -> Any:
    loader = transformers.AutoImageProcessor
    offline = hub.unreachable(source)
    try:
        return loader.from_pretrained(
            source, backend="pil", trust_remote_code=spec.trust, **hub.options(offline)
        )
    except Exception as e:  # a missing, damaged or foreign file raises anything
        remote = (
            "Without network, give a local folder with preprocessor_config.json, or name one "
            "with image_processor."
        )
        if offline:
            remote = f"{hub.cache_fix(source, offline)} {remote}"
        raise loading_error(spec.key_path, "image processor", source, e, remote) from e


def pixel_preprocessing(processor: Any, spec: ModelSpec) -> dict[str, Any]:
    """The image processor as data: host resize/crop, then in-graph rescale/normalize."""
    size, crop = _size(processor, "size"), _size(processor, "crop_size")
    pre: dict[str, Any] = {"resize": None, "resize_shortest_edge": None, "crop": None}
    if getattr(processor, "do_resize", True) and size:
        if size.get("shortest_edge"):
            pre["resize_shortest_edge"] = int(size["shortest_edge"])
        elif size.get("height") and size.get("width"):
            pre["resize"] = [int(size["width"]), int(size["height"])]
        else:
            raise ExportError(
                f"'{spec.key_path}': image processor size {size} is not supported yet "
                "(ducho-fast reads shortest_edge or height/width)."
            )
    if getattr(processor, "do_center_crop", False) and crop:
        pre["crop"] = [int(crop["width"]), int(crop["height"])]
    out_size = pre["crop"] or pre["resize"]
    if out_size is None:
        raise ExportError(
            f"'{spec.key_path}': the image processor gives no fixed image size (no crop, "
            "no height/width resize); a batched graph needs one."
        )
    resample = getattr(processor, "resample", 3)
    do_rescale = getattr(processor, "do_rescale", True)
    do_norm = getattr(processor, "do_normalize", True)
    scale = float(processor.rescale_factor) if do_rescale else 1.0
    offset = -1.0 if do_rescale and getattr(processor, "rescale_offset", False) else 0.0
    mean = [float(x) for x in processor.image_mean] if do_norm else [0.0, 0.0, 0.0]
    std = [float(x) for x in processor.image_std] if do_norm else [1.0, 1.0, 1.0]
    if getattr(processor, "include_top", False):
        # EfficientNet's processors (ALIGN's family) divide by the std once more.
        std = [s * float(x) for s, x in zip(std, processor.image_std, strict=True)]
    return {
        **pre,
        "input_size": out_size,
        "interpolation": _RESAMPLE_NAMES.get(int(resample), "bicubic"),
        "color": "RGB",
        "rescale_factor": scale,
        "rescale_offset": offset,
        "mean": mean,
        "std": std,
        "processor": type(processor).__name__,
        "in_graph": ["cast", "rescale", "normalize", "transpose"],
    }


_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _size(processor: Any, key: str) -> dict[str, Any] | None:
    value = getattr(processor, key, None)
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    return {k: getattr(value, k, None) for k in ("shortest_edge", "height", "width")}


def tower_layers(model: Any) -> list[str]:
    """What a two-tower model's ``output_layers`` can name (for ``ducho-fast layers``)."""
    layers = ["1  (image_embeds / text_embeds: projected, normalized; the default)"]
    for tower, config in (
        ("vision", model.config.vision_config),
        ("text", model.config.text_config),
    ):
        count = getattr(config, "num_hidden_layers", 0)
        layers += [f"{tower}_model_output.{a}" for a in ("pooler_output", "last_hidden_state")]
        layers.append(f"{tower}_model_output.hidden_states.N  (N = 0..{count})")
    return layers
