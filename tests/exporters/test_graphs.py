from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ducho_fast.exporters.graphs import INLINE_BYTES, load_graph, save_graph


def _model(weight: np.ndarray) -> onnx.ModelProto:
    """x (n, 64) @ weight (64, k), reshaped to (n, k, 1) by a small shape constant."""
    k = weight.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Reshape", ["y", "shape"], ["out"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", k, 1])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array([-1, k, 1], np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_weights_go_beside_the_graph_and_run_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 256)).astype(np.float32)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    expected = _run(_model(weight), x)
    path = tmp_path / "model.onnx"
    old = os.umask(0o022)
    try:
        save_graph(_model(weight), path)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx.data").stat().st_size == weight.nbytes
    assert path.stat().st_size < INLINE_BYTES  # the graph and its shape constant only
    # ONNX makes the weights file 0600; it gets 0666 less the umask, as the graph, so that
    # everyone who shares the store can read both.
    modes = {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {0o644}
    np.testing.assert_array_equal(_run(path, x), expected)
    loaded = load_graph(path)  # weights read back in
    np.testing.assert_array_equal(_run(loaded, x), expected)


def test_saving_again_replaces_both_files(tmp_path: Path) -> None:
    """ONNX appends weights to an existing data file: a second save must not."""
    rng = np.random.default_rng(1)
    path = tmp_path / "model.onnx"
    save_graph(_model(rng.normal(size=(64, 256)).astype(np.float32)), path)
    second = rng.normal(size=(64, 128)).astype(np.float32)
    x = rng.normal(size=(2, 64)).astype(np.float32)
    save_graph(load_graph(path), path)  # read and written over itself, as precision does
    save_graph(_model(second), path)
    assert (tmp_path / "model.onnx.data").stat().st_size == second.nbytes
    np.testing.assert_array_equal(_run(path, x), _run(_model(second), x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_a_graph_without_large_tensors_has_no_weights_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "model.onnx"
    save_graph(_model(rng.normal(size=(64, 256)).astype(np.float32)), path)
    small = rng.normal(size=(64, 3)).astype(np.float32)  # under 1 KB: kept in the graph
    assert small.nbytes < INLINE_BYTES
    save_graph(_model(small), path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # the old weights gone
    x = rng.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(path, x), _run(_model(small), x))
