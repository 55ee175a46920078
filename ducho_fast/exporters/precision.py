"""Reduced-precision variants of an exported fp32 graph: fp16 (for GPUs), int8 (for CPUs) and
bf16 (for Intel CPUs with bfloat16 math).

Both keep float32 inputs and outputs, so the runtime feeds and reads them exactly as the fp32
graph. Their parity is measured against the fp32 source model like any export, with a cosine
bound of their own (``MIN_COSINE``); a variant below it is refused.

- fp16: weights and math in float16, except the ops that lose accuracy in half precision
  (normalizations, softmax, reductions, powers and roots, GELU's erf): those stay float32.
- int8: dynamic quantization for CPU: every matrix product ``x @ W`` with a 2-D float weight
  (linear layers), weights int8 per output column, activations quantized at run time. Each
  product gets one of three schemes (``int8_schemes``):
  - per token (``per_token``, ``exporters/per_token.py``): one activation scale per row, so a
    text's vector does not depend on the texts batched with it, nor on their padding rows
    (which reach 2-3x the range of a short text's own tokens);
  - per token, asymmetric (``per_token_asymmetric``) for products fed by a GELU (the second
    FFN projection of transformer layers): long-tailed, mostly positive inputs get all 8 bits;
  - per tensor (``per_tensor``, ORT's ``DynamicQuantizeMatMul``, bias fused) where the output
    is wider than the input (the first FFN projection): a per-token scale costs a pass over the
    output, four times the input's width there.
  SmoothQuant (Xiao et al., 2023) on all but the GELU-fed: a few activation channels (the
  outlier features of transformers, largest on short texts) are divided by a per-channel factor
  and the weight rows multiplied by it, so both quantize well. The factors come from running
  the fp32 graph on calibration inputs (the exporter's, separate from its parity samples).
  Measured on all-MiniLM-L6-v2, min cosine against fp32 over 23 texts of 1 to 80 words in one
  batch (the parity samples, the calibration texts, 10 more very short ones) / over 1024
  generated product descriptions in extract's batches; the bare session's speed on those
  relative to the previous scheme (medians of 4 rounds):
  every product per tensor, no SmoothQuant: 0.976 on 50 short texts; per tensor + SmoothQuant
  with the GELU-fed kept fp32 (the previous scheme): 0.9914 / 0.9972, 1.00; the GELU-fed per
  token on top: 0.9878 (refused) / 0.9960, 1.11x; this scheme: 0.9912 / 0.9971, 1.10-1.15x;
  per token everywhere: 0.9941 / 0.9981, 1.02x.
- bf16: the fp32 graph as it is, which OpenVINO's CPU plugin runs in bfloat16 where the CPU
  has the math (:mod:`ducho_fast.runtime.openvino`): exported only where it can run so, so
  that its parity is bfloat16's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.errors import ExportError
from ducho_fast.exporters.graphs import load_graph, save_graph, scratch
from ducho_fast.exporters.per_token import quantize_per_token
from ducho_fast.runtime.openvino import OPENVINO, unusable

PRECISIONS = ("fp32", "fp16", "int8", "bf16")
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99, "bf16": 0.999}

FP16_KEEP_FP32 = [
    "LayerNormalization",
    "SkipLayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceSum",
    "ReduceMean",
    "ReduceL2",
    "ReduceMax",
    "Pow",
    "Sqrt",
    "Erf",
    "Exp",
    "Log",
]
_GELU_OPS = {"Erf", "Gelu", "BiasGelu", "FastGelu", "Tanh"}


SMOOTH_ALPHA = 0.5
Feeds = dict[str, np.ndarray]
FLOAT = 1  # onnx.TensorProto.FLOAT, without importing onnx here
CPU = "CPUExecutionProvider"

PER_TENSOR = "per_tensor"
PER_TOKEN = "per_token"
LONG_TAILED = "per_token_asymmetric"
SCHEMES = (PER_TENSOR, PER_TOKEN, LONG_TAILED)


def apply_precision(
    path: Path, precision: str, calibration: Callable[[], list[Feeds]]
) -> dict[str, Any]:
    """Rewrite the fp32 graph at ``path`` in ``precision``; what was done, for the manifest.

    ``calibration`` gives single-item feeds of the fp32 graph (int8 runs it for SmoothQuant).
    """
    if precision == "fp32":
        return {}
    if precision == "fp16":
        return _to_fp16(path)
    if precision == "int8":
        return _to_int8(path, calibration())
    if precision == "bf16":
        return _for_bf16()
    raise ExportError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}.")


def _for_bf16() -> dict[str, Any]:
    reason = unusable()
    if reason is not None:
        raise ExportError(
            f"precision bf16 runs on OpenVINO's CPU plugin in bfloat16, and is exported where "
            f"it can run so, to check it as it runs: {reason}. Export it on such a machine, "
            "or use precision: fp32 (or int8 for transformer models) here."
        )
    return {"runs_on": f"{OPENVINO} (CPU, bfloat16 math); the graph is the fp32 one"}


def _to_fp16(path: Path) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32))
    # Given the path, the converter infers shapes from the file (a model over 2 GB cannot be
    # shape-inferred in memory) and loads the weights from beside it.
    half = convert_float_to_float16(str(path), keep_io_types=True, op_block_list=blocked)
    _unique_node_names(half.graph.node)
    save_graph(half, path)
    kept = sorted({n.op_type for n in half.graph.node if n.op_type in FP16_KEEP_FP32})
    return {"kept_fp32_ops": kept}


def _to_int8(path: Path, calibration: list[Feeds]) -> dict[str, Any]:
    model = load_graph(path)
    _unique_node_names(model.graph.node)
    schemes = int8_schemes(model.graph)
    if not schemes:
        raise ExportError(
            "precision int8: this graph has no matrix product with weights to quantize "
            "(int8 here is dynamic quantization of the linear layers that transformer models "
            "are made of; ONNX Runtime's dynamic int8 convolutions ran ResNet50 at half the "
            "speed of fp32 here). Use precision: fp32."
        )
    smoothed = smooth(
        model,
        [n for n, s in schemes.items() if s != LONG_TAILED],
        calibration,
        SMOOTH_ALPHA,
        scratch_in=path.parent,
    )
    quantize_per_token(model, {n: s == LONG_TAILED for n, s in schemes.items() if s != PER_TENSOR})
    save_graph(model, path)
    per_tensor = [n for n, s in schemes.items() if s == PER_TENSOR]
    if per_tensor:
        _quantize_per_tensor(path, per_tensor)
    return {
        "quantized_nodes": len(schemes),
        "schemes": {k: sum(s == k for s in schemes.values()) for k in SCHEMES},
        "smoothquant": {"alpha": SMOOTH_ALPHA, "activations": smoothed},
        "calibration_samples": len(calibration),
    }


def _quantize_per_tensor(path: Path, nodes: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with scratch(path.parent) as folder, _quiet_quantizer():
        quantized = folder / path.name
        quantize_dynamic(
            str(path),
            str(quantized),
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            use_external_data_format=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        save_graph(load_graph(quantized), path)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Without the advice ORT's quantizer logs on the root logger (run its pre-processing;
    check the model is not already quantized: it is, by the per-token products, on purpose)."""

    def advice(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or record.levelno > logging.WARNING

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def int8_schemes(graph: Any) -> dict[str, str]:
    """How each MatMul with a weight is quantized (see the module docstring)."""
    weights = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    schemes: dict[str, str] = {}
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or node.input[0] in weights:
            continue  # no weight, or a product of constants
        if len(weight.dims) != 2 or weight.data_type != FLOAT:
            continue  # batched or non-float weights: not the x @ W of a linear layer
        if _after_gelu(node.input[0], producer, depth=4):
            schemes[node.name] = LONG_TAILED
        elif weight.dims[1] > weight.dims[0]:
            schemes[node.name] = PER_TENSOR
        else:
            schemes[node.name] = PER_TOKEN
    return schemes


def smooth(
    model: Any, nodes: list[str], calibration: list[Feeds], alpha: float, *, scratch_in: Path
) -> int:
    """SmoothQuant in place: activation / s and weight rows * s for the chosen MatMuls.

    MatMuls sharing an activation (a layer's Q, K and V) share one factor and one Mul.
    Returns how many activations were smoothed. The calibration graph is written to a
    folder made in ``scratch_in`` (a graph over 2 GB cannot be handed over in memory).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    groups: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.name in nodes:
            activation = next(x for x in node.input if x not in weights)
            groups.setdefault(activation, []).append(node)
    if not calibration or not groups:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(groups)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with scratch(scratch_in) as folder:
        save_graph(probe, folder / "probe.onnx")
        session = ort.InferenceSession(str(folder / "probe.onnx"), providers=[CPU])
        peak = _channel_peaks(session, names, calibration)
    for activation, group in groups.items():
        tensors = [weights[next(x for x in n.input if x in weights)] for n in group]
        arrays = [numpy_helper.to_array(t) for t in tensors]
        w_peak = np.max([np.abs(a).max(axis=1) for a in arrays], axis=0)
        factor = peak[activation] ** alpha / np.maximum(w_peak, 1e-8) ** (1 - alpha)
        factor = np.clip(factor, 1e-5, None).astype(np.float32)
        for tensor, array in zip(tensors, arrays, strict=True):
            tensor.CopyFrom(numpy_helper.from_array(array * factor[:, None], tensor.name))
        inverse = numpy_helper.from_array(1.0 / factor, f"{activation}/smooth_inverse")
        graph.initializer.append(inverse)
        smoothed = f"{activation}/smoothed"
        mul = helper.make_node("Mul", [activation, inverse.name], [smoothed], name=smoothed)
        for node in group:
            node.input[list(node.input).index(activation)] = smoothed
        position = min(list(graph.node).index(n) for n in group)
        graph.node.insert(position, mul)
    return len(groups)


def _channel_peaks(session: Any, names: list[str], calibration: list[Feeds]) -> dict[str, Any]:
    """Each named activation's largest magnitude per channel over the calibration feeds."""
    wanted = {i.name for i in session.get_inputs()}
    peak: dict[str, np.ndarray] = {}
    for feeds in calibration:
        values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        for name, value in zip(names, values, strict=True):
            channel = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peak[name] = np.maximum(peak[name], channel) if name in peak else channel
    return peak


def _after_gelu(tensor: str, producer: dict[str, Any], depth: int) -> bool:
    node = producer.get(tensor)
    if node is None or depth == 0:
        return False
    if node.op_type in _GELU_OPS:
        return True
    return any(_after_gelu(x, producer, depth - 1) for x in node.input)


def _unique_node_names(nodes: Iterable[Any]) -> None:
    # Node names must be unique; converters sometimes repeat or leave them empty.
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
