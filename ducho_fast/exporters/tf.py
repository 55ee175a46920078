"""TensorFlow / Keras visual models: every ``keras.applications`` class, or a ``.keras`` file.

``model_name`` is a ``keras.applications`` class name exactly as Ducho spells it
(``ResNet50``, ``VGG19``, ``Xception``, ``MobileNetV2``, ``EfficientNetB0`` …; ``weights``
``imagenet`` downloads, ``none`` is random, a file is a weights file), a user's ``.keras`` /
``.h5`` model file, or a SavedModel folder (its layers: the serving signature's outputs).
Layers are Keras layer names (``avg_pool``, ``fc2``, ``predictions``, any mid-network
layer), truncated as ``keras.Model(inputs, layer.output)``.

The graph takes uint8 NHWC at the model's input size and applies the family's own
``preprocess_input`` inside. The scheme is found by probing that function (so every family is
covered, not a list of four) and recorded in the manifest: ``caffe`` (RGB->BGR, ImageNet mean
subtraction: ResNet, VGG), ``tf`` ([-1, 1]: Xception, Inception, MobileNet, NASNet, ResNetV2),
``torch`` (x/255, ImageNet mean/std: DenseNet) or ``raw`` (0..255, the model rescales itself:
EfficientNet, ConvNeXt, RegNet, MobileNetV3). Conversion is tf2onnx with a dynamic batch axis.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.config.model import ModelSpec
from ducho_fast.errors import ExportError, did_you_mean
from ducho_fast.exporters.base import OPSET, Built, Exporter, build_with_kwargs, image_output
from ducho_fast.exporters.compat import import_keras
from ducho_fast.exporters.layers import check_layers, layers_command

tf, keras = import_keras()

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCHEMES = ("caffe", "tf", "torch", "raw", "unit", "zscore", "minmax")
MODEL_FILES = (".keras", ".h5", ".hdf5")
DEFAULT_SIZE = (224, 224)
# tf2onnx 1.17 needs tens of times a weight's size in memory to convert it: VGG16's fc1
# (411 MB) took over 24 GB here. Larger weights are refused with a way out, not an OOM kill.
MAX_WEIGHT_BYTES = 256 * 2**20


def apply_scheme(x: Any, scheme: str, mean: Any = IMAGENET_MEAN, std: Any = IMAGENET_STD) -> Any:
    """A float 0..255 NHWC batch (numpy or Keras tensor) as the scheme's model input."""
    ops = keras.ops
    if scheme == "caffe":
        return x[..., ::-1] - ops.convert_to_tensor(np.array(IMAGENET_BGR_MEAN, np.float32))
    if scheme == "tf":
        return x / 127.5 - 1.0
    if scheme in ("torch", "zscore"):
        m = ops.convert_to_tensor(np.array(mean, np.float32))
        s = ops.convert_to_tensor(np.array(std, np.float32))
        return (x / 255.0 - m) / s
    if scheme == "unit":
        return x / 255.0
    if scheme == "minmax":
        # Ducho's MinMaxNormalize: per image, over all channels.
        low = ops.min(x, axis=(1, 2, 3), keepdims=True)
        high = ops.max(x, axis=(1, 2, 3), keepdims=True)
        return (x - low) / (high - low)
    return x


class KerasExporter(Exporter):
    reference_name = "Keras eager (the family's preprocess_input, the truncated keras.Model)"
    eager_name = "Keras"

    def build(self, spec: ModelSpec) -> Built:
        base, source, family = load_keras_model(spec)
        layers = [str(x) for x in spec.output_layers]
        names = [layer.name for layer in base.layers]
        hint = layers_command(
            "tensorflow", str(spec.local_path or spec.model_name), trust=spec.trust
        )
        check_layers(layers, names, model=spec.model_name, backend="tensorflow", command=hint)
        inputs = base.inputs[0] if len(base.inputs) == 1 else base.inputs
        truncated = keras.Model(inputs, [base.get_layer(n).output for n in layers])
        _check_weight_sizes(truncated, spec, layers)
        height, width = _input_size(base, spec)
        scheme = spec.preprocessing or (_family_scheme(family, spec) if family else "raw")
        pixels = keras.Input((height, width, 3), dtype="uint8", name="pixels")
        x = apply_scheme(keras.ops.cast(pixels, "float32"), scheme, spec.mean, spec.std)
        outs = truncated(x)
        graph = keras.Model(pixels, outs if isinstance(outs, list) else [outs])
        probe = graph(np.zeros((1, height, width, 3), np.uint8), training=False)
        shapes = [tuple(int(d) for d in o.shape[1:]) for o in probe]
        return Built(
            module=graph,
            example=(),
            input_names=["pixels"],
            dynamic_axes={"pixels": {0: "batch"}},
            outputs=[
                image_output(f"out{i}", n, s)
                for i, (n, s) in enumerate(zip(layers, shapes, strict=True))
            ],
            inputs=[
                {
                    "name": "pixels",
                    "dtype": "uint8",
                    "layout": "NHWC",
                    "shape": ["batch", height, width, 3],
                }
            ],
            preprocessing={
                "resize": [width, height],
                "interpolation": "bicubic",
                "color": "RGB",
                "scaling": scheme,
                "scheme_from": f"keras.applications {family}.preprocess_input"
                if family and not spec.preprocessing
                else "config"
                if spec.preprocessing
                else "none (the model takes 0..255)",
                "mean": list(spec.mean) if scheme == "zscore" else None,
                "std": list(spec.std) if scheme == "zscore" else None,
                "in_graph": ["cast", scheme],
            },
            source=source,
            reference=(truncated, family if not spec.preprocessing else None, scheme, spec),
        )

    def eager(self, built: Built) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        model = built.module

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            out = model(feeds["pixels"], training=False)
            return [
                keras.ops.convert_to_numpy(v) for v in (out if isinstance(out, list) else [out])
            ]

        return run

    def convert(self, built: Built, path: Path) -> None:
        import tf2onnx

        graph = built.module
        height, width = built.inputs[0]["shape"][1:3]
        signature = (tf.TensorSpec((None, height, width, 3), tf.uint8, name="pixels"),)
        names = [o["name"] for o in built.outputs]
        graph.output_names = names
        try:
            # tf2onnx prints a harmless traceback ("max() arg is an empty sequence").
            with contextlib.redirect_stderr(io.StringIO()):
                model, _ = tf2onnx.convert.from_keras(graph, input_signature=signature, opset=OPSET)
        except (Exception, MemoryError) as e:
            raise ExportError(f"ONNX conversion failed (tf2onnx): {type(e).__name__}: {e}") from e
        ops = {n.op_type for n in model.graph.node}
        left = sorted(op for op in ops if op.endswith("PartitionedCall"))
        if left:
            raise ExportError(
                f"tf2onnx left TensorFlow function calls ({', '.join(left)}) in the graph: a "
                "layer of this model runs as a compiled tf.function (Keras 3 runs grouped "
                "convolutions, as in ConvNeXt, through XLA), which ONNX cannot express. Cut "
                "before such layers, or use the torch backend for this architecture."
            )
        _rename_outputs(model, names)
        path.write_bytes(model.SerializeToString())

    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        height, width = built.inputs[0]["shape"][1:3]
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(3)]
        ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
        return [*images, ramp.astype(np.uint8)]

    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        """Ducho's way: the family's preprocess_input on the float image, then predict."""
        truncated, family, scheme, spec = built.reference
        x = np.asarray(payload, dtype=np.float32)[None]
        if family is not None:
            x = _family_module(family).preprocess_input(x.copy())
        else:
            x = keras.ops.convert_to_numpy(apply_scheme(x, scheme, spec.mean, spec.std))
        out = truncated(x, training=False)
        values = out if isinstance(out, list) else [out]
        return {
            o["layer"]: np.squeeze(keras.ops.convert_to_numpy(v))
            for o, v in zip(built.outputs, values, strict=True)
        }


def _check_weight_sizes(model: Any, spec: ModelSpec, layers: list[str]) -> None:
    for weight in model.weights:
        size = int(np.prod(weight.shape)) * 4
        if size > MAX_WEIGHT_BYTES:
            raise ExportError(
                f"'{spec.key_path}': {spec.model_name} cut at {', '.join(layers)} holds the weight "
                f"{weight.path} of {size / 2**20:.0f} MB, more than tf2onnx can convert within "
                f"memory ({MAX_WEIGHT_BYTES // 2**20} MB; it needs tens of times the size). Cut "
                "at an earlier layer (VGG: block5_pool), or use the torch backend (torchvision "
                "has the same architecture)."
            )


def _rename_outputs(model: Any, names: list[str]) -> None:
    """tf2onnx names outputs after Keras tensors; the runtime reads ``out0``, ``out1`` …"""
    renames = {o.name: n for o, n in zip(model.graph.output, names, strict=True)}
    for node in model.graph.node:
        node.output[:] = [renames.get(x, x) for x in node.output]
        node.input[:] = [renames.get(x, x) for x in node.input]
    for output in model.graph.output:
        output.name = renames[output.name]


def _input_size(model: Any, spec: ModelSpec) -> tuple[int, int]:
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ExportError(
            f"'{spec.key_path}': {spec.model_name} takes inputs of shape {shape}; ducho-fast "
            "runs Keras image models with NHWC RGB inputs (batch, height, width, 3)."
        )
    fixed = (shape[1], shape[2])
    if spec.reshape is not None:
        width, height = spec.reshape
        if None not in fixed and fixed != (height, width):
            raise ExportError(
                f"'{spec.key_path}.reshape' is [{width}, {height}], but {spec.model_name} takes "
                f"{fixed[1]}x{fixed[0]} images. Remove reshape (the model's size is used), or "
                f"use reshape: [{fixed[1]}, {fixed[0]}]."
            )
        return height, width
    if None in fixed:
        return DEFAULT_SIZE  # any size: 224 x 224 unless reshape says otherwise
    return int(fixed[0]), int(fixed[1])


# -- loading ------------------------------------------------------------------------------


def application_names() -> list[str]:
    return sorted(n for n in dir(keras.applications) if n[:1].isupper())


def load_keras_model(spec: ModelSpec) -> tuple[Any, dict[str, Any], str | None]:
    """The Keras model, its manifest source, and its keras.applications family (module)."""
    path = spec.local_path
    if path is not None:
        return _from_file(spec, path), _source(spec, str(path), path), None
    names = application_names()
    if spec.model_name not in names:
        raise ExportError(
            f"'{spec.key_path}.model_name' '{spec.model_name}' is neither a keras.applications "
            f"model nor an existing file.{did_you_mean(spec.model_name, names)} Names are "
            "spelled as in Keras: ResNet50, VGG19, Xception, MobileNetV2, EfficientNetB0 …"
        )
    builder = getattr(keras.applications, spec.model_name)
    # Keras numbers unnamed layers per session (global_average_pooling2d_1 on a second build):
    # a fresh session gives every build the names `ducho-fast layers` lists.
    keras.backend.clear_session()
    weights = (spec.weights or "imagenet").lower()
    # The config allows default (= imagenet, Ducho's), none, imagenet or a weights file.
    weights_arg: str | None = str(spec.weights_path) if spec.weights_path else "imagenet"
    if spec.weights_path is None and weights == "none":
        weights_arg = None
    try:
        model = build_with_kwargs(
            builder, spec, spec.model_name, {"weights": weights_arg, **spec.architecture_kwargs}
        )
    except (OSError, ValueError) as e:
        raise ExportError(
            f"'{spec.key_path}': could not build {spec.model_name} with weights "
            f"'{spec.weights or 'imagenet'}' ({type(e).__name__}: {e}). Without network, use "
            "weights: none or a local weights file."
        ) from e
    family = builder.__module__.rsplit(".", 1)[-1]
    source = _source(spec, weights_arg or "none", spec.weights_path)
    return model, {**source, "application": spec.model_name, "family": family}, family


def _from_file(spec: ModelSpec, path: Path) -> Any:
    if path.is_dir():
        return _saved_model(spec, path)
    if path.suffix.lower() not in MODEL_FILES:
        raise ExportError(
            f"'{spec.key_path}.model_name' {path}: TensorFlow models are .keras or .h5 files."
        )
    _check_model_file(spec, path)
    try:
        # safe_mode refuses Lambda layers (they run code from the file) unless trusted.
        return keras.models.load_model(path, compile=False, safe_mode=not spec.trust)
    except ValueError as e:
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise ExportError(
                f"'{spec.key_path}': {path} holds Python code (a Lambda layer); loading it runs "
                "that code. Set trust: true for this model if you trust the file."
            ) from e
        raise ExportError(f"'{spec.key_path}': cannot load {path} ({e}).") from e
    except Exception as e:  # a damaged or foreign file: h5py's OSError, a zip's errors, ...
        raise ExportError(
            f"'{spec.key_path}': cannot load {path} ({type(e).__name__}: {e}); it is damaged "
            "or not a Keras model file."
        ) from e


def _check_model_file(spec: ModelSpec, path: Path) -> None:
    """A file that is not what its suffix says: Keras calls a damaged .keras file "File not
    found", h5py a damaged .h5 one "file signature not found"; this names the cause and the
    fix. A .keras file is a zip archive (checked from its end, so a truncated one fails), an
    .h5 file HDF5."""
    if not path.is_file():
        return  # Keras's own "File not found" is right
    try:
        path.open("rb").close()  # first: is_zipfile and is_hdf5 answer False if they cannot
    except OSError as e:
        raise ExportError(
            f"'{spec.key_path}.model_name' {path} cannot be read ({e.strerror or e}); check its "
            "permissions."
        ) from e
    if path.suffix.lower() == ".keras":
        kind, valid = "a whole zip archive", zipfile.is_zipfile(path)
    else:
        import h5py  # Keras's own dependency for .h5 files

        kind, valid = "an HDF5 file", h5py.is_hdf5(str(path))
    if not valid:
        raise ExportError(
            f"'{spec.key_path}.model_name' {path} is not {kind}, as a {path.suffix} model file "
            "is: it is damaged or truncated (an interrupted download or copy?), or another "
            "format renamed. Save the model again with model.save(...)."
        )


def _saved_model(spec: ModelSpec, path: Path) -> Any:
    """A SavedModel folder as a functional model whose layers are its serving outputs.

    Its internals are a compiled TensorFlow function, not Keras layers: the layers that
    output_layers can name are the serving signature's outputs (``output_0`` …).
    """
    if not (path / "saved_model.pb").is_file():
        raise ExportError(
            f"'{spec.key_path}.model_name' {path} is a folder without saved_model.pb; a "
            "TensorFlow model is a .keras / .h5 file or a SavedModel folder."
        )
    try:
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    except (KeyError, OSError, ValueError) as e:
        raise ExportError(
            f"'{spec.key_path}': cannot read the serving_default signature of {path} ({e})."
        ) from e
    specs = list(signature.structured_input_signature[1].values())
    if len(specs) != 1:
        raise ExportError(
            f"'{spec.key_path}': {path} takes {len(specs)} inputs; ducho-fast runs SavedModels "
            "with one image input."
        )
    inputs = keras.Input(tuple(specs[0].shape[1:]), dtype=specs[0].dtype.name)
    served = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")(inputs)
    served = served if isinstance(served, dict) else {"output_0": served}
    outputs = [keras.layers.Identity(name=key)(value) for key, value in sorted(served.items())]
    return keras.Model(inputs, outputs)


def _family_module(family: str) -> Any:
    return getattr(keras.applications, family)


def _family_scheme(family: str, spec: ModelSpec) -> str:
    """Which scheme the family's preprocess_input is, found by running it on known pixels."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    got = np.asarray(_family_module(family).preprocess_input(x.copy()))
    for scheme in ("caffe", "tf", "torch", "raw"):
        want = keras.ops.convert_to_numpy(apply_scheme(x, scheme))
        if got.shape == want.shape and np.allclose(got, want, atol=1e-4):
            return scheme
    raise ExportError(
        f"'{spec.key_path}': the preprocess_input of keras.applications.{family} is none of "
        f"caffe, tf, torch or raw; set preprocessing: one of {', '.join(SCHEMES)}."
    )


def _source(spec: ModelSpec, weights: str, path: Path | None) -> dict[str, Any]:
    from ducho_fast.artifact import sha256_file

    return {
        "framework": f"tensorflow {tf.__version__}, keras {keras.__version__}",
        "weights": weights,
        "weights_sha256": sha256_file(path) if path is not None and path.is_file() else None,
    }


def keras_layer_names(spec: ModelSpec) -> list[str]:
    model, _, _ = load_keras_model(spec)
    return [layer.name for layer in model.layers]
