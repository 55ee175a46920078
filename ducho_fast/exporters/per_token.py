"""int8 matrix products with one activation scale per token, built from standard ONNX ops.

ORT's dynamic quantization (``DynamicQuantizeMatMul``) gives a whole batch one activation scale:
a few tokens with large values (the outlier features of transformers, or the padding rows of a
short text batched with long ones) coarsen the steps of all the others, and a text's vector
depends on what it was batched with. Here each token (each row of the activation, all leading
axes flattened) gets its own scale, so a row's result is the same alone or in any batch:

    x (..., K) -> per-row range -> QuantizeLinear along axis 0 of the (rows, K) view -> uint8
    -> MatMulIntegerToFloat with the int8 weight (one scale per output column) -> * row scale

- symmetric: the row's largest magnitude maps to 127, the zero point is 128 for every row, which
  ``MatMulIntegerToFloat`` takes natively: one pass over the output for the row scale;
- asymmetric (for long-tailed activations such as GELU outputs, mostly positive): the row's
  [min, max] maps to [0, 255] with a zero point per row, corrected after the product with the
  weight's column sums: two more passes over the output, a full 8 bits for the values.

Weights are int8, symmetric, one scale per output column.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SYMMETRIC_ZERO_POINT = 128
_TINY = 1e-8  # an all-zero row gets this scale instead of dividing by zero


def quantize_per_token(model: Any, nodes: dict[str, bool]) -> None:
    """Rewrite in place each MatMul named in ``nodes`` (name -> asymmetric).

    Each must have its weight, a 2-D float initializer, as its second input. MatMuls sharing an
    activation with the same scheme (a layer's Q, K and V) quantize it once.
    """
    from onnx import helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    quantized: dict[tuple[str, bool], tuple[str, str, str | None]] = {}
    rewritten: list[Any] = []
    replaced: set[str] = set()
    for node in graph.node:
        if node.name not in nodes:
            rewritten.append(node)
            continue
        asymmetric = nodes[node.name]
        activation, weight = node.input[0], weights[node.input[1]]
        add = _Builder(graph, rewritten, f"{node.name}/int8", opset)
        if (activation, asymmetric) not in quantized:
            width = int(weight.dims[0])
            quantized[activation, asymmetric] = _quantize_rows(add, activation, width, asymmetric)
        rows, scale, zero_scaled = quantized[activation, asymmetric]
        _product(add, rows, scale, zero_scaled, weight, node.output[0])
        replaced.add(weight.name)
    del graph.node[:]
    graph.node.extend(rewritten)
    # The float weights now quantized, unless another node still reads them (tied weights).
    used = {x for n in graph.node for x in n.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 per output column (symmetric, -127..127) and the column scales."""
    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0
    q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


class _Builder:
    """Appends nodes and constants under one name prefix."""

    def __init__(self, graph: Any, nodes: list[Any], prefix: str, opset: int) -> None:
        self.graph, self.nodes, self.prefix, self.opset = graph, nodes, prefix, opset

    def const(self, name: str, value: Any) -> str:
        from onnx import numpy_helper

        full = f"{self.prefix}/{name}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        from onnx import helper

        full = f"{self.prefix}/{name}"
        domain = "com.microsoft" if op_type == "MatMulIntegerToFloat" else ""
        self.nodes.append(
            helper.make_node(op_type, inputs, [full], name=full, domain=domain, **attrs)
        )
        return full

    def row_reduce(self, op_type: str, x: str, name: str) -> str:
        # Over the last axis, kept: (..., 1). Axes became an input in opset 18.
        if self.opset >= 18:
            axes = self.const(f"{name}_axes", np.array([-1], np.int64))
            return self.op(op_type, [x, axes], name, keepdims=1)
        return self.op(op_type, [x], name, axes=[-1], keepdims=1)


def _quantize_rows(
    add: _Builder, x: str, width: int, asymmetric: bool
) -> tuple[str, str, str | None]:
    """uint8 ``x`` (its shape), the row scales (..., 1), and zero point x scale (asymmetric)."""
    from onnx import TensorProto

    high = add.row_reduce("ReduceMax", x, "max")
    low = add.row_reduce("ReduceMin", x, "min")
    f32 = np.float32
    if asymmetric:
        high = add.op("Max", [high, add.const("zero", f32(0))], "high")
        low = add.op("Min", [low, add.const("zero_", f32(0))], "low")
        span = add.op("Sub", [high, low], "span")
        scale = add.op("Mul", [span, add.const("per_step", f32(1 / 255))], "raw_scale")
        scale = add.op("Max", [scale, add.const("tiny", f32(_TINY))], "scale")
        zero = add.op("Round", [add.op("Div", [add.op("Neg", [low], "neg_low"), scale], "z")], "zf")
        zero_u8 = add.op("Cast", [zero], "zero_point", to=TensorProto.UINT8)
        zero_scaled: str | None = add.op("Mul", [zero, scale], "zero_scaled")
    else:
        peak = add.op("Max", [high, add.op("Neg", [low], "neg_low")], "peak")
        scale = add.op("Mul", [peak, add.const("per_step", f32(1 / 127))], "raw_scale")
        scale = add.op("Max", [scale, add.const("tiny", f32(_TINY))], "scale")
        # A zero point of 128 per row, shaped like the scales (QuantizeLinear per axis).
        middle = add.op("Mul", [scale, add.const("zero", f32(0))], "zeros")
        middle = add.op("Add", [middle, add.const("middle", f32(SYMMETRIC_ZERO_POINT))], "zp")
        zero_u8 = add.op("Cast", [middle], "zero_point", to=TensorProto.UINT8)
        zero_scaled = None
    flat = add.const("flat", np.array([-1], np.int64))
    rows = add.op("Reshape", [x, add.const("rows_shape", np.array([-1, width], np.int64))], "rows")
    scales = add.op("Reshape", [scale, flat], "scale_rows")
    zeros = add.op("Reshape", [zero_u8, flat], "zero_point_rows")
    q = add.op("QuantizeLinear", [rows, scales, zeros], "q_rows", axis=0)
    q = add.op("Reshape", [q, add.op("Shape", [x], "x_shape")], "q")
    return q, scale, zero_scaled


def _product(
    add: _Builder, q: str, scale: str, zero_scaled: str | None, weight: Any, output: str
) -> None:
    from onnx import helper, numpy_helper

    wq, wscale = quantize_weight(numpy_helper.to_array(weight).astype(np.float32))
    one = add.const("one", np.float32(1.0))
    inputs = [q, add.const("w", wq), one, add.const("w_scale", wscale)]
    if zero_scaled is None:
        inputs.append(add.const("zero_point_a", np.uint8(SYMMETRIC_ZERO_POINT)))
    y = add.op("MatMulIntegerToFloat", inputs, "product")
    y = add.op("Mul", [y, scale], "scaled")
    if zero_scaled is not None:
        sums = (wq.astype(np.int64).sum(axis=0) * wscale).astype(np.float32)
        offset = add.op("Mul", [zero_scaled, add.const("w_sums", sums)], "offset")
        y = add.op("Sub", [y, offset], "corrected")
    add.nodes.append(helper.make_node("Identity", [y], [output], name=f"{add.prefix}/out"))
