from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import ducho_fast
from ducho_fast.artifact import load_artifact
from ducho_fast.errors import DataError, UnreadableFile
from tests.conftest import textual_config, visual_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def resnet_artifact(tmp_path_factory, store, resnet18_state_dict) -> Path:
    model = {
        "model_name": "resnet18",
        "weights": str(resnet18_state_dict),
        "output_layers": ["avgpool", "layer4"],
        "reshape": [64, 64],
        "preprocessing": "zscore",
    }
    (result,) = ducho_fast.export(visual_config(tmp_path_factory.mktemp("d"), model, store))
    return result.artifact.path


def test_paths_arrays_and_pil_images_agree(resnet_artifact, image_dir) -> None:
    emb = ducho_fast.load(resnet_artifact)
    paths = sorted(image_dir.iterdir())[:4]
    from_paths = emb.embed(paths)
    from_arrays = emb.embed([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    from_pil = emb.embed([Image.open(p) for p in paths], batch_size=3)
    assert isinstance(from_paths, np.ndarray) and from_paths.shape == (4, 512)
    np.testing.assert_allclose(from_paths, from_arrays, rtol=1e-6)
    np.testing.assert_allclose(from_paths, from_pil, rtol=1e-5, atol=1e-6)
    maps = emb.embed(paths[:2], layer="layer4")
    assert isinstance(maps, np.ndarray) and maps.shape == (2, 512, 2, 2)
    for layer, shape in (("avgpool", (0, 512)), ("layer4", (0, 512, 2, 2))):
        none = emb.embed([], layer=layer)
        assert isinstance(none, np.ndarray) and none.shape == shape


def test_an_embedder_says_what_it_runs(resnet_artifact) -> None:
    emb = ducho_fast.load(resnet_artifact)
    assert repr(emb) == (
        f"<Embedder resnet18 [avgpool, layer4]: visual, fp32, on CPUExecutionProvider; "
        f"{resnet_artifact}>"
    )


def test_bad_inputs(resnet_artifact) -> None:
    emb = ducho_fast.load(resnet_artifact)
    with pytest.raises(DataError, match=r"has no layer 'fc'"):
        emb.embed([np.zeros((8, 8, 3), np.uint8)], layer="fc")
    fixes = [
        (np.zeros((8, 8, 3), np.float32), r"uint8, found float32: .*0\.\.1 .*\* 255\)\.round"),
        (
            np.zeros((8, 8, 3), np.int64),
            r"uint8, found int64: .*pass array\.astype\(np\.uint8\)\.$",
        ),
        (np.zeros((8, 8, 3), bool), r"uint8, found bool\.$"),
        (np.zeros((3, 8, 9), np.uint8), r"found \(3, 8, 9\): .*array\.transpose\(1, 2, 0\)"),
        (np.zeros((8, 9, 1), np.uint8), r"found \(8, 9, 1\): one channel; pass array\[:, :, 0\]"),
        (np.zeros((3, 9, 1), np.uint8), r"found \(3, 9, 1\): one channel; pass array\[:, :, 0\]"),
        (
            np.zeros((2, 8, 9, 3), np.uint8),
            r"a stack of images, where each image is one input \(embed\(array\) takes a stack\)",
        ),
        (np.zeros((8, 9, 5), np.uint8), r"found \(8, 9, 5\)\.$"),
    ]
    for array, says in fixes:
        with pytest.raises(DataError, match=r"inputs\[0\]: image arrays must be .*" + says):
            emb.embed([array])


def test_embed_takes_any_iterable_or_a_stack_and_refuses_one_input_alone(
    resnet_artifact, image_dir, tmp_path
) -> None:
    emb = ducho_fast.load(resnet_artifact)
    paths = sorted(image_dir.iterdir())[:3]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((40, 40))) for p in paths]
    expected = emb.embed(arrays)
    np.testing.assert_array_equal(emb.embed(a for a in arrays), expected)
    np.testing.assert_array_equal(emb.embed(np.stack(arrays)), expected)
    np.testing.assert_array_equal(emb.embed([p.read_bytes() for p in paths]), emb.embed(paths))
    alone = [
        (str(paths[0]), r"not one str: pass \[input\]"),
        (paths[0], r"not one \w*Path: pass"),
        (arrays[0], r"an array of shape \(40, 40, 3\) is not a stack of images .* \[array\]"),
        (None, r"embed takes a list of inputs \(image paths, .*\); found NoneType"),
        (7, r"found int"),
    ]
    for inputs, says in alone:
        with pytest.raises(DataError, match=says):
            emb.embed(inputs)
    with pytest.raises(DataError, match=r"clean=True cleans texts; this is a visual model"):
        emb.embed(arrays, clean=True)
    with pytest.raises(DataError, match=r"sample_rate is for waveforms; this is a visual model"):
        emb.embed(arrays, sample_rate=16000)
    for size in (0, -1, True, 2.0):
        with pytest.raises(DataError, match=r"batch_size must be a whole number of 1 or more"):
            emb.embed(arrays, batch_size=size)  # type: ignore[arg-type]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableFile, match=rf"^inputs\[3\]: {broken}: not a readable image"):
        emb.embed([*arrays, broken], batch_size=2)  # named by position, its class kept
    with pytest.raises(DataError, match=r"^inputs\[1\]: an image input must be .* NoneType"):
        emb.embed([arrays[0], None])


def test_load_names_what_is_not_an_artifact_path_or_options(resnet_artifact) -> None:
    from ducho_fast.errors import ArtifactError, ConfigError

    for path in (None, 5):
        with pytest.raises(ArtifactError, match=r"path of an exported artifact's folder; found"):
            ducho_fast.load(path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"runtime options are a RuntimeOptions or a mapping"):
        ducho_fast.load(resnet_artifact, 5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"input options are an InputOptions or a mapping"):
        ducho_fast.load(resnet_artifact, None, "reduced")  # type: ignore[arg-type]


def test_text_embedder_token_level_layers_are_lists(tmp_path, store, tiny_bert_dir) -> None:
    model = {
        "model_name": str(tiny_bert_dir),
        "output_layers": ["pooler_output", "last_hidden_state"],
    }
    (result,) = ducho_fast.export(textual_config(tmp_path, model, store))
    emb = ducho_fast.load(result.artifact.path)
    tokens = emb.embed(["one", "a somewhat longer sentence"], layer="last_hidden_state")
    assert isinstance(tokens, list) and [t.shape for t in tokens] == [(3, 32), (6, 32)]
    pooled = emb.embed(["one", "two"])
    np.testing.assert_array_equal(emb.embed(np.array(["one", "two"])), pooled)
    with pytest.raises(DataError, match=r"not one str: pass \[input\]"):
        emb.embed("one")  # not three texts of a character each
    with pytest.raises(DataError, match=r"shape \(1, 2\) is not a stack .* a list of strings"):
        emb.embed(np.array([["one", "two"]]))
    for unordered in ({"one", "two"}, {"one": 1}):
        with pytest.raises(DataError, match=r"an ordered list of inputs, not a (set|dict), so"):
            emb.embed(unordered)
    with pytest.raises(DataError, match=r"^inputs\[1\]: text inputs must be strings, found int"):
        emb.embed(["one", 2])
    assert isinstance(pooled, np.ndarray) and pooled.shape == (2, 32)
    with pytest.raises(DataError, match=r"text inputs must be strings"):
        emb.embed([3])
    # texts are embedded as given: the empty string too (a table's empty cell is extract's
    # bad item, not the API's), as its own row, whatever it is batched with
    empty = emb.embed(["", "one", "NaN"])
    assert isinstance(empty, np.ndarray) and empty.shape == (3, 32) and np.isfinite(empty).all()
    np.testing.assert_allclose(empty[0], emb.embed([""])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(empty[1], pooled[0], rtol=1e-5, atol=1e-6)
    for bad, kind in ((None, "NoneType"), (float("nan"), "float"), (b"one", "bytes")):
        with pytest.raises(
            DataError, match=rf"^inputs\[0\]: text inputs must be strings, .* {kind}"
        ):
            emb.embed([bad])
    with pytest.raises(  # a tokenizer's TypeError, naming no input, before
        DataError, match=r"^inputs\[1\]: the text holds '\\udce9' at character 3, half of a"
    ):
        emb.embed(["café", b"caf\xe9".decode("utf-8", "surrogateescape")])
    none = emb.embed([])  # stacks with other results: (0, D), not (0,)
    assert isinstance(none, np.ndarray) and none.shape == (0, 32) and none.dtype == np.float32
    assert emb.embed([], layer="last_hidden_state") == []


def test_embed_batches_texts_by_length_and_keeps_their_order(
    tmp_path, store, tiny_bert_dir, monkeypatch
) -> None:
    """Texts of mixed lengths are batched as extract batches them: sorted by length within
    windows of 64 batches, each batch within batch_size x 64 tokens, so little is padding.
    Row i is still inputs[i], as embedding it alone gives."""
    import random

    from ducho_fast.data.text.clean import clear_text
    from ducho_fast.runtime.batcher import TEXT_WINDOW_BATCHES

    config = textual_config(tmp_path, {"model_name": str(tiny_bert_dir)}, store)
    (result,) = ducho_fast.export(config)
    emb = ducho_fast.load(result.artifact.path)
    rng = random.Random(0)
    words = ["red", "blue", "soft", "cotton", "shirt", "with", "long", "sleeves", "a", "pocket"]
    texts = [" ".join(rng.choices(words, k=rng.choice([1, 2, 30, 60]))) for _ in range(300)]
    alone = np.concatenate([emb.embed([t]) for t in texts])
    batches: list[list[int]] = []
    run = emb.run_prepared

    def recording(payloads):
        batches.append([len(p) for p in payloads])  # token counts
        return run(payloads)

    monkeypatch.setattr(emb, "run_prepared", recording)
    together = emb.embed(texts, batch_size=2)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    lengths = [n for batch in batches for n in batch]
    assert len(lengths) == 300 and all(len(b) <= 2 for b in batches)
    window = 2 * TEXT_WINDOW_BATCHES
    for begin in range(0, 300, window):  # each window's texts, shortest first
        own = sorted(len(t) for t in emb.tokenize(texts[begin : begin + window]))
        assert lengths[begin : begin + window] == own
    padded = sum(len(b) * max(b) for b in batches)
    assert padded <= 1.05 * sum(lengths)  # batches of 2 in input order: 1.55x
    with pytest.raises(DataError, match=r"batch_size must be a whole number of 1 or more"):
        next(emb.text_batches(texts, 0))  # not range()'s "arg 3 must not be zero"
    messy = ["Red <b>shoe</b> size 7 !!", "it's a cup"]
    cleaned = emb.embed(messy, clean=True)  # Ducho's clear_text first
    np.testing.assert_array_equal(cleaned, emb.embed([clear_text(t) for t in messy]))
    assert not np.allclose(cleaned[0], emb.embed(messy)[0])


def test_sessions_spin_unless_readers_decode_images(
    resnet_artifact, tmp_path, store, tiny_bert_dir
) -> None:
    """``runtime.spin_wait: auto``: text readers only tokenize; image decoders need the CPUs.
    Without readers (a bare embedder), sessions spin."""
    from ducho_fast.config.model import RuntimeOptions
    from ducho_fast.runtime.embedder import Embedder

    (text,) = ducho_fast.export(textual_config(tmp_path, {"model_name": str(tiny_bert_dir)}, store))

    def spins(embedder: Embedder) -> bool:
        config = embedder.session.get_session_options()
        try:
            return config.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except Exception:  # unset: ORT's default, spinning
            return True

    def spinning(path: Path, spin_wait: str = "auto", readers: bool = True) -> bool:
        options = RuntimeOptions(spin_wait=spin_wait)
        return spins(Embedder(load_artifact(path), options, readers=readers))

    assert spinning(text.artifact.path) and not spinning(resnet_artifact)
    assert spinning(resnet_artifact, readers=False)
    assert spinning(resnet_artifact, "on") and not spinning(text.artifact.path, "off")
    # load: embed's worker threads decode images beside the session; texts are only tokenized
    assert spins(ducho_fast.load(text.artifact.path))
    assert not spins(ducho_fast.load(resnet_artifact))


def test_embedder_waits_for_the_session_created_ahead(resnet_artifact) -> None:
    """A pending session is used as it is (not created again) and checked to be the one the
    embedder needs; its error comes from ``ready``, not from the constructor."""
    from ducho_fast.config.model import RuntimeOptions
    from ducho_fast.errors import DeviceError
    from ducho_fast.runtime.embedder import Embedder
    from ducho_fast.runtime.session import CUDA, PendingSession

    artifact = load_artifact(resnet_artifact)
    options = RuntimeOptions(device="cpu")
    pending = PendingSession(artifact.model_path, options, spinning=False)
    emb = Embedder(artifact, options, readers=True, pending=pending)
    assert emb.session is pending.result()[0]
    one = emb.embed([np.zeros((40, 30, 3), np.uint8)])
    assert isinstance(one, np.ndarray) and one.shape[0] == 1
    with pytest.raises(ValueError, match="is not the session"):
        Embedder(artifact, options, readers=False, pending=pending)  # readers=False spins

    if CUDA in ort.get_available_providers():
        return  # the error below is for machines where CUDA does not run
    cuda = RuntimeOptions(device="cuda", allow_fallback=False)
    failing = PendingSession(artifact.model_path, cuda, spinning=False)
    emb = Embedder(artifact, cuda, readers=True, pending=failing)
    with pytest.raises(DeviceError, match="CUDA is not really active"):
        emb.ready()


@pytest.mark.parametrize("io_binding", ["off", "on"])
def test_embed_from_several_threads_at_once(resnet_artifact, image_dir, io_binding) -> None:
    """A web service's workers share one embedder: calls at once give each its own results.
    ``io_binding: on`` runs the CUDA path's device-buffer pool (on the CPU), whose buffers the
    calls take and give back concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    from ducho_fast.config.model import RuntimeOptions

    emb = ducho_fast.load(resnet_artifact, RuntimeOptions(io_binding=io_binding))
    paths = sorted(image_dir.iterdir())[:12]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in paths]
    alone = [emb.embed(arrays[k:] + arrays[:k], batch_size=4) for k in range(12)]
    with ThreadPoolExecutor(6) as pool:
        together = list(
            pool.map(lambda k: emb.embed(arrays[k:] + arrays[:k], batch_size=4), range(12))
        )
    for k in range(12):
        np.testing.assert_allclose(together[k], alone[k], rtol=1e-6, atol=1e-7)
    assert not np.array_equal(alone[0], alone[1])  # each call's own order


def _serial(emb, inputs, batch_size) -> np.ndarray:
    """``embed`` read on the calling thread, batch after batch (what it did before workers)."""
    out: list[np.ndarray] = []
    for start in range(0, len(inputs), batch_size):
        chunk = [emb.prepare(x) for x in inputs[start : start + batch_size]]
        out.extend(item["avgpool"] for item in emb.run_prepared(chunk))
    return np.stack(out)


def test_embed_reads_images_in_workers_with_the_same_results(resnet_artifact, tmp_path) -> None:
    """Any worker count and batch size give the features of reading one by one, in input
    order, though images of very different sizes finish decoding out of order."""
    from tests.conftest import write_image

    emb = ducho_fast.load(resnet_artifact)
    sizes = [(600, 500) if i % 3 == 0 else (32, 24) for i in range(11)]
    paths = [write_image(tmp_path / f"{i}.png", s, seed=i) for i, s in enumerate(sizes)]
    expected = _serial(emb, paths, 4)
    for workers, batch_size in ((1, 4), (2, 4), (3, 1), (4, 5), (8, 32), (None, 3)):
        got = emb.embed(paths, batch_size=batch_size, workers=workers)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=f"{workers}")
    assert not np.allclose(expected[0], expected[1])
    for bad in (0, -2, True, 1.5, "2", 100_000):
        with pytest.raises(DataError, match=r"workers must be a whole number from 1 to 1024"):
            emb.embed(paths, workers=bad)  # type: ignore[arg-type]


def test_embed_reads_the_next_batches_while_the_session_runs(resnet_artifact, image_dir) -> None:
    """While the session runs a batch, the workers are already reading the next ones."""
    import threading
    import time

    emb = ducho_fast.load(resnet_artifact)
    paths = sorted(image_dir.iterdir())[:4] * 3
    started: list[str] = []
    seen_at_runs: list[int] = []
    prepare, run_prepared = emb.prepare, emb.run_prepared

    def slow_prepare(raw, sample_rate=None):
        started.append(threading.current_thread().name)
        return prepare(raw, sample_rate)

    def slow_run(payloads):
        time.sleep(0.3)
        seen_at_runs.append(len(started))
        return run_prepared(payloads)

    emb.prepare, emb.run_prepared = slow_prepare, slow_run  # type: ignore[method-assign]
    out = emb.embed(paths, batch_size=4, workers=2)
    assert isinstance(out, np.ndarray) and out.shape == (12, 512)
    assert seen_at_runs[0] == 12  # all of the next batches were read during the first run
    assert started and all(name.startswith("ducho-embed") for name in started)


def test_embed_raises_the_first_bad_input_and_reads_one_object_once(
    resnet_artifact, image_dir, tmp_path
) -> None:
    emb = ducho_fast.load(resnet_artifact)
    paths = sorted(image_dir.iterdir())[:4]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big)
    # inputs[5] is slow to read and bad; inputs[6] fails at once: the first in order is raised
    slow_bad = tmp_path / "slow_bad.png"
    slow_bad.write_bytes(big.read_bytes()[:-2000])
    inputs = [*paths, big, slow_bad, broken, *paths]
    with pytest.raises(UnreadableFile, match=r"^inputs\[5\]: .*slow_bad.png: not a readable"):
        emb.embed(inputs, batch_size=2, workers=4)
    # one lazily loaded PIL image (and one open file) given several times: read once, not by
    # two workers at once (neither a lazy image's loading nor a file's position is thread-safe)
    image = Image.open(paths[0])
    read: list[object] = []
    prepare = emb.prepare

    def counted(raw, sample_rate=None):
        read.append(raw)
        return prepare(raw, sample_rate)

    emb.prepare = counted  # type: ignore[method-assign]
    with open(paths[1], "rb") as file:
        got = emb.embed([image, file, image, file, image] * 2, batch_size=3, workers=4)
    assert len(read) == 2
    emb.prepare = prepare  # type: ignore[method-assign]
    expected = emb.embed([paths[0], paths[1]])
    for row, want in zip(got, [0, 1, 0, 1, 0] * 2, strict=True):
        np.testing.assert_allclose(row, expected[want], rtol=1e-5, atol=1e-6)
