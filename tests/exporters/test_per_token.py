"""int8 products with one activation scale per token: the graph rewrite against numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ducho_fast.exporters.per_token import quantize_per_token, quantize_weight

K, N = 16, 6


def _model(opset: int, weights: list[np.ndarray]) -> Any:
    """x (batch, sequence, K) -> one MatMul per weight, all reading x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])
    outputs = [
        helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", "sequence", N])
        for i in range(2)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}")
        for i in range(len(weights))
    ]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    graph = helper.make_graph(nodes, "g", [x], outputs[: len(weights)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: Any, x: np.ndarray) -> list[np.ndarray]:
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _reference(x: np.ndarray, w: np.ndarray, asymmetric: bool) -> np.ndarray:
    """The same arithmetic in numpy: each row of x on its own 8-bit grid."""
    wq, ws = quantize_weight(w)
    high, low = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    if asymmetric:
        high, low = np.maximum(high, 0), np.minimum(low, 0)
        scale = np.maximum((high - low) / 255, 1e-8)
        zero = np.round(-low / scale)
    else:
        scale = np.maximum(np.maximum(high, -low) / 127, 1e-8)
        zero = np.full_like(scale, 128)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return ((q - zero) @ wq.astype(np.float64)) * ws * scale


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("opset", [17, 18])
def test_each_row_on_its_own_grid(asymmetric: bool, opset: int) -> None:
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(K, N)).astype(np.float32) for _ in range(2)]
    x = rng.normal(size=(3, 5, K)).astype(np.float32)
    x[:, :, 0] *= 40  # an outlier feature
    x[1] *= 0.01  # a quiet text: per token, it keeps its own resolution
    if asymmetric:
        x = np.abs(x) - np.float32(0.1)  # long-tailed and mostly positive, as after a GELU
    x[2, 0] = -np.abs(x[2, 0]) - 0.05  # a row all below zero: zero stays on the grid
    model = _model(opset, w)
    quantize_per_token(model, {"mm0": asymmetric, "mm1": asymmetric})
    ys = _run(model, x)
    for y, weight in zip(ys, w, strict=True):
        assert y.shape == (3, 5, N)
        ref = _reference(x.astype(np.float64), weight, asymmetric)
        np.testing.assert_allclose(y, ref, atol=2e-3 * np.abs(ref).max())
        exact = x @ weight
        assert not np.allclose(y, exact, atol=1e-6)  # really quantized
        assert _cosine(y[1], exact[1]) > 0.999  # the quiet text too
    # Both products read one quantization of x.
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 1


def test_weights_get_one_scale_per_output_column() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(K, N)) * np.array([1e-3, 1.0, 50.0, 1.0, 1.0, 1.0])
    q, scale = quantize_weight(w.astype(np.float32))
    assert q.dtype == np.int8 and scale.shape == (N,)
    np.testing.assert_array_equal(np.abs(q).max(axis=0), 127)  # each column uses all its steps
    step = np.abs(w).max(axis=0) / 127
    assert (np.abs(q * scale - w) <= step / 2 + 1e-9).all()


def test_a_row_does_not_depend_on_its_batch() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(K, N)).astype(np.float32)
    x = rng.normal(size=(1, 4, K)).astype(np.float32)
    loud = rng.normal(size=(1, 4, K)).astype(np.float32) * 1000
    for asymmetric in (False, True):
        model = _model(17, [w])
        quantize_per_token(model, {"mm0": asymmetric})
        (alone,) = _run(model, x)
        (batched,) = _run(model, np.concatenate([x, loud]))
        np.testing.assert_array_equal(batched[0], alone[0])


def test_an_all_zero_row_gives_zeros() -> None:
    w = np.ones((K, N), np.float32)
    x = np.zeros((1, 2, K), np.float32)
    x[0, 1] = 1.0
    for asymmetric in (False, True):
        model = _model(17, [w])
        quantize_per_token(model, {"mm0": asymmetric})
        (y,) = _run(model, x)
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y[0, 0], 0.0)
        np.testing.assert_allclose(y[0, 1], float(K), rtol=1e-2)


def test_untouched_products_stay_float() -> None:
    rng = np.random.default_rng(2)
    w = [rng.normal(size=(K, N)).astype(np.float32) for _ in range(2)]
    x = rng.normal(size=(2, 3, K)).astype(np.float32)
    model = _model(17, w)
    quantize_per_token(model, {"mm0": False})
    y0, y1 = _run(model, x)
    np.testing.assert_allclose(y1, x @ w[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y0, x @ w[0], atol=1e-6)


def test_the_float_weights_go_unless_another_node_reads_them() -> None:
    rng = np.random.default_rng(4)
    w = [rng.normal(size=(K, N)).astype(np.float32) for _ in range(2)]
    model = _model(17, w)
    model.graph.node.append(helper.make_node("Identity", ["w1"], ["tied"], name="reads_w1"))
    quantize_per_token(model, {"mm0": False, "mm1": False})
    names = {i.name for i in model.graph.initializer}
    assert "w0" not in names and "w1" in names


def test_which_products_are_quantized_and_how() -> None:
    """Linear layers x @ W only: per token, asymmetric after a GELU, per tensor where the output
    is wider than the input."""
    from ducho_fast.exporters.precision import int8_schemes

    def weight(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array(np.ones(shape, np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "square"], ["a"], name="square"),
        helper.make_node("MatMul", ["a", "wide"], ["b"], name="wide"),
        helper.make_node("Gelu", ["b"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "narrow"], ["c"], name="after_gelu"),
        helper.make_node("MatMul", ["left", "c"], ["d"], name="weight_on_the_left"),
        helper.make_node("MatMul", ["left", "square"], ["e"], name="constants"),
        helper.make_node("MatMul", ["d", "batched"], ["f"], name="batched"),
        helper.make_node("MatMul", ["d", "e"], ["h"], name="no_weight"),
    ]
    inits = [
        weight("square", (4, 4)),
        weight("wide", (4, 16)),
        weight("narrow", (16, 4)),
        weight("left", (4, 4)),
        weight("batched", (2, 4, 4)),
    ]
    graph = helper.make_graph(nodes, "g", [], [], inits)
    assert int8_schemes(graph) == {
        "square": "per_token",
        "wide": "per_tensor",
        "after_gelu": "per_token_asymmetric",
    }


def test_the_per_tensor_products_log_no_quantizer_advice(tmp_path, caplog) -> None:
    """ORT's quantizer advises on the root logger (pre-process the model, is it already
    quantized?); an export prints its own lines only. Errors would still come through."""
    import logging

    from ducho_fast.exporters.precision import _quantize_per_tensor

    rng = np.random.default_rng(0)
    path = tmp_path / "model.onnx"
    onnx.save(_model(17, [rng.normal(size=(K, N)).astype(np.float32)]), str(path))
    with caplog.at_level(logging.INFO):
        _quantize_per_tensor(path, ["mm0"])
    assert not [r for r in caplog.records if "onnxruntime" in r.pathname], caplog.text
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMul" not in ops and ops & {"DynamicQuantizeMatMul", "MatMulInteger"}
    assert not logging.getLogger().filters  # the filter is gone afterwards
