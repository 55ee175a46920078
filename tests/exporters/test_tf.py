"""TensorFlow/Keras: keras.applications by Ducho's names, a user's .keras file, layer names.

Each family's own ``preprocess_input`` is the reference (Ducho's path): the scheme the graph
applies is found by probing it, so a wrong scheme fails parity. ImageNet weights need the
network: the tests use random weights (seed 0), the real MTCNN ONet weights that ship in the
``mtcnn`` package, and a mocked download boundary for ``weights: imagenet``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import ducho_fast
from ducho_fast.cli import app
from ducho_fast.config import load_config
from ducho_fast.errors import ConfigError, ExportError
from ducho_fast.exporters.compat import import_keras
from tests.conftest import visual_config, within_fp32_bounds, write_image

tf, keras = import_keras()  # the tf extra is part of the test install (make test)
pytestmark = pytest.mark.slow


def images(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [
        write_image(folder / "a.jpg", size=(160, 120), seed=1),
        write_image(folder / "b.png", size=(90, 130), seed=2, mode="RGBA"),
        write_image(folder / "c.jpg", size=(224, 224), seed=3),
    ]


def entry(name: str, layers: list[str], **extra: Any) -> dict[str, Any]:
    return {"model_name": name, "backend": "tensorflow", "output_layers": layers, **extra}


def ducho_keras(model: Any, family: Any, path: Path, size: tuple[int, int]) -> np.ndarray:
    """Ducho's TensorFlow path: PIL RGB, resize, img_to_array, preprocess_input, predict."""
    image = Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    x = family.preprocess_input(keras.utils.img_to_array(image)[None])
    return np.squeeze(keras.ops.convert_to_numpy(model(x, training=False)))


@pytest.mark.parametrize(
    ("name", "layer", "family", "scheme"),
    [
        ("MobileNetV2", "global_average_pooling2d", "mobilenet_v2", "tf"),
        ("VGG16", "block5_pool", "vgg16", "caffe"),
        ("DenseNet121", "avg_pool", "densenet", "torch"),
        ("EfficientNetB0", "block6a_expand_activation", "efficientnet", "raw"),
    ],
)
def test_applications_equal_keras_with_their_preprocess_input(
    tmp_path: Path, store: Path, name: str, layer: str, family: str, scheme: str
) -> None:
    files = images(tmp_path / "images")
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None)
    truncated = keras.Model(model.inputs[0], model.get_layer(layer).output)
    weights = tmp_path / "seeded.weights.h5"
    model.save_weights(weights)
    config = visual_config(
        tmp_path, entry(name, [layer], weights=str(weights), batch_size=2), store
    )
    manifest = ducho_fast.export(config)[0].artifact.manifest
    assert manifest["parity"]["passed"] and manifest["preprocessing"]["scaling"] == scheme
    assert family in manifest["preprocessing"]["scheme_from"]
    assert ducho_fast.extract(config).failed == 0
    out = tmp_path / "out" / "tensorflow" / name / layer
    module = getattr(keras.applications, family)
    for path in files:
        saved = np.load(out / f"{path.stem}.npy")
        within_fp32_bounds(saved[0], ducho_keras(truncated, module, path, (224, 224)))


def onet_file(folder: Path) -> tuple[Any, Path]:
    """MTCNN's ONet with its real weights, rebuilt as a functional model (a user's file)."""
    from mtcnn.network.onet import ONet
    from mtcnn.utils.tensorflow import load_weights

    net = ONet()
    net.build()
    net.set_weights(load_weights("onet.lz4"))
    inputs = keras.Input((48, 48, 3))
    x = keras.layers.Rescaling(1 / 128, offset=-127.5 / 128, name="mtcnn_scale")(inputs)
    for layer in (net.conv1, net.prelu1, net.maxpool1, net.conv2, net.prelu2, net.maxpool2):
        x = layer(x)
    for layer in (net.conv3, net.prelu3, net.maxpool3, net.conv4, net.prelu4, net.permute):
        x = layer(x)
    x = net.prelu5(net.fc5(net.flatten(x)))
    model = keras.Model(inputs, [net.fc6_1(x), net.fc6_2(x), net.fc6_3(x)])
    path = folder / "onet.keras"
    model.save(path)
    return net, path


def test_keras_file_with_real_mtcnn_weights(tmp_path: Path, store: Path) -> None:
    net, path = onet_file(tmp_path)
    files = images(tmp_path / "images")
    config = visual_config(tmp_path, entry(str(path), ["prelu5", "fc6-3"]), store)
    manifest = ducho_fast.export(config)[0].artifact.manifest
    assert manifest["parity"]["passed"] and manifest["preprocessing"]["scaling"] == "raw"
    assert ducho_fast.extract(config).failed == 0
    out = next((tmp_path / "out" / "tensorflow").rglob("fc6-3")).parent
    for file in files:
        image = Image.open(file).convert("RGB").resize((48, 48), Image.Resampling.BICUBIC)
        x = (np.asarray(image, np.float32)[None] - 127.5) / 128  # MTCNN's own scaling
        face = keras.ops.convert_to_numpy(net(x)[2])  # the package's subclassed model
        saved = np.load(out / "fc6-3" / f"{file.stem}.npy")
        within_fp32_bounds(saved, face)
        assert np.load(out / "prelu5" / f"{file.stem}.npy").shape == (1, 256)


def test_imagenet_weights_come_through_the_download(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only keras.utils.get_file (the download boundary) is mocked."""
    from keras.src.utils import file_utils

    keras.utils.set_random_seed(0)
    weights = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV2(weights=None).save_weights(weights)
    asked: list[str] = []

    def get_file(fname: str | None = None, origin: str | None = None, **_: Any) -> str:
        asked.append(str(origin))
        return str(weights)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    images(tmp_path / "images")
    config = visual_config(tmp_path, entry("MobileNetV2", ["predictions"]), store)
    manifest = ducho_fast.export(config)[0].artifact.manifest
    assert asked and asked[0].startswith("https://") and manifest["source"]["weights"] == "imagenet"

    def offline(*_: Any, **__: Any) -> str:
        raise OSError("no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    config["visual"]["items"]["model"][0]["output_layers"] = ["out_relu"]
    with pytest.raises(ExportError, match="Without network, use weights: none"):
        ducho_fast.export(config)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"model_name": "Resnet50"}, ExportError, r"Did you mean 'ResNet50'"),
        ({"output_layers": ["avg_pooling"]}, ExportError, r"has no layer 'avg_pooling'"),
        ({"reshape": [200, 200]}, ExportError, r"takes 224x224 images"),
        ({"model_name": "VGG16", "output_layers": ["fc2"]}, ExportError, r"fc1/kernel of 392 MB"),
        ({"weights": "instagram"}, ConfigError, "neither 'default', 'none' nor a file"),
        (
            {"architecture_kwargs": {"pooling": "avg", "clases": 3}},
            ExportError,
            r"ResNet50 cannot be built with architecture_kwargs \{'pooling': 'avg', 'clases': 3\}"
            r".*'clases'.*Check 'visual\.items\.model\.0\.architecture_kwargs'",
        ),
    ],
)
def test_errors_name_the_key_and_the_fix(
    tmp_path: Path, store: Path, change: dict[str, Any], error: type, message: str
) -> None:
    model = {**entry("ResNet50", ["avg_pool"], weights="none"), **change}
    with pytest.raises(error, match=message):
        ducho_fast.export(visual_config(tmp_path, model, store))


def test_keras_schemes_are_for_tensorflow_models(tmp_path: Path, store: Path) -> None:
    model = {"model_name": "resnet18", "output_layers": ["avgpool"], "preprocessing": "caffe"}
    with pytest.raises(ConfigError, match="a Keras scheme for backend: tensorflow"):
        load_config(visual_config(tmp_path, model, store))


def test_lambda_layers_need_trust(tmp_path: Path, store: Path) -> None:
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(outputs)).save(path)
    with pytest.raises(ExportError, match="Set trust: true for this model"):
        ducho_fast.export(visual_config(tmp_path, entry(str(path), ["gap"]), store))
    trusted = visual_config(tmp_path, entry(str(path), ["gap"], trust=True), store)
    assert ducho_fast.export(trusted)[0].artifact.manifest["parity"]["passed"]
    # A wrong layer's hint names a layers command that loads the file as trusted, so it works.
    wrong = visual_config(tmp_path, entry(str(path), ["gaap"], trust=True), store)
    with pytest.raises(ExportError, match=r"Did you mean 'gap'") as caught:
        ducho_fast.export(wrong)
    hint = f"Hint: run `ducho-fast layers tensorflow {path} --trust` to list its layers."
    assert hint in str(caught.value)
    from typer.testing import CliRunner

    from ducho_fast.cli import app

    listed = CliRunner().invoke(app, ["layers", "tensorflow", str(path), "--trust"])
    assert listed.exit_code == 0 and "double" in listed.output.split(), listed.output


@pytest.mark.parametrize("name", ["broken.h5", "broken.keras", "cut.keras", "cut.h5"])
def test_a_damaged_keras_file_is_an_export_error(tmp_path: Path, store: Path, name: str) -> None:
    """h5py raised OSError, a traceback; Keras called a damaged .keras file "File not found"."""
    path = tmp_path / name
    if name.startswith("cut"):  # a real model file, truncated as an interrupted copy leaves it
        inputs = keras.Input((8, 8, 3))
        model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(inputs))
        model.save(tmp_path / f"whole{path.suffix}")
        data = (tmp_path / f"whole{path.suffix}").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"not a model")
    says = {
        "broken.h5": r"is not an HDF5 file, as a \.h5 model file is: it is damaged or truncated",
        "broken.keras": r"is not a whole zip archive, as a \.keras model file is: it is damaged",
        "cut.keras": r"is not a whole zip archive",
        "cut.h5": r"cannot load .*truncated file.*; it is damaged or not a Keras model file",
    }[name]
    with pytest.raises(ExportError, match=says) as e:
        ducho_fast.export(visual_config(tmp_path, entry(str(path), ["gap"]), store))
    assert str(path) in str(e.value) and "File not found" not in str(e.value)


def test_saved_model_folder_outputs_are_its_layers(tmp_path: Path, store: Path) -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((40, 40, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x))
    model.export(tmp_path / "exported")  # a SavedModel folder
    files = images(tmp_path / "images")
    config = visual_config(tmp_path, entry(str(tmp_path / "exported"), ["output_0"]), store)
    with pytest.raises(ExportError, match=r"has no layer 'gap'.*"):
        bad = visual_config(tmp_path, entry(str(tmp_path / "exported"), ["gap"]), store)
        ducho_fast.export(bad)
    assert ducho_fast.export(config)[0].artifact.manifest["parity"]["passed"]
    ducho_fast.extract(config)
    saved = np.load(next((tmp_path / "out").rglob(f"output_0/{files[0].stem}.npy")))
    image = Image.open(files[0]).convert("RGB").resize((40, 40), Image.Resampling.BICUBIC)
    x = np.asarray(image, np.float32)[None]
    within_fp32_bounds(saved, keras.ops.convert_to_numpy(model(x)))


def test_layers_command_lists_keras_names() -> None:
    result = CliRunner().invoke(app, ["layers", "tensorflow", "ResNet50"])
    assert result.exit_code == 0, result.output
    names = result.output.split()
    assert names[-2:] == ["avg_pool", "predictions"] and "conv4_block6_out" in names


def test_tensorflow_s_start_up_lines_are_muted_and_stderr_restored() -> None:
    """TF 2.21's C++ libraries print absl lines on import whatever TF_CPP_MIN_LOG_LEVEL says;
    only the import is muted, and what is written to stderr after it still arrives."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from ducho_fast.exporters.compat import import_keras\n"
        "import_keras()\n"
        "print('after', file=sys.stderr, flush=True)\n"
        "os.write(2, b'fd2\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    env.pop("DUCHO_FAST_TF_LOGS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "after\nfd2\n"


def test_bench_source_runs_the_keras_model_on_the_session_s_batches(
    tmp_path: Path, store: Path
) -> None:
    from ducho_fast.bench import bench

    keras.utils.set_random_seed(0)
    inputs = keras.Input((40, 40, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x))
    model.save(tmp_path / "tiny.keras")
    images(tmp_path / "images")
    config = visual_config(tmp_path, entry(str(tmp_path / "tiny.keras"), ["gap"]), store)
    ducho_fast.export(config)
    (run,) = bench(config, items=3, repeats=1, work=tmp_path, source=True).runs
    assert run.source is not None and run.source.framework == "Keras"
    assert run.source.min_cosine > 0.9999 and run.source.rate > 0
