from __future__ import annotations

import os
import stat

import pytest

from ducho_fast.artifact import new_build_dir
from tests.conftest import no_locks


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700)])
def test_build_dirs_follow_the_umask(tmp_path, umask: int, mode: int) -> None:
    """An artifact keeps its build directory's mode when it is renamed into the store: 0755
    under the usual umask, so everyone sharing the store can read the models."""
    old = os.umask(umask)
    try:
        first, second = (new_build_dir(tmp_path / "store", "torch-resnet18-0123") for _ in "ab")
    finally:
        os.umask(old)
    assert first != second and first.name.startswith(".building-torch-resnet18-0123-")
    assert stat.S_IMODE(first.stat().st_mode) == mode


def _artifact(folder, content: bytes = b"graph bytes", data: bytes | None = None):
    """An artifact's files, its weights in model.onnx (as written before model.onnx.data)
    or, given ``data``, beside it."""
    import hashlib
    import json

    from ducho_fast.artifact import DATA_FILE, MANIFEST_FILE, MODEL_FILE, SCHEMA_VERSION

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(content)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model_sha256": hashlib.sha256(content).hexdigest(),
    }
    if data is not None:
        (folder / DATA_FILE).write_bytes(data)
        manifest["data_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder / MODEL_FILE


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the artifact module hashes."""
    from ducho_fast import artifact

    calls: list[str] = []
    real = artifact.sha256_file

    def counting(path, *a, **k):
        calls.append(path.name)
        return real(path, *a, **k)

    monkeypatch.setattr(artifact, "sha256_file", counting)
    return calls


def test_a_model_is_hashed_once_per_version(tmp_path, hashed: list[str]) -> None:
    from ducho_fast.artifact import VERIFIED_FILE, load_artifact
    from ducho_fast.errors import ArtifactError

    model = _artifact(tmp_path / "a")
    load_artifact(tmp_path / "a")
    load_artifact(tmp_path / "a")
    assert hashed == ["model.onnx"]  # the second load trusted the record
    assert (tmp_path / "a" / VERIFIED_FILE).is_file()
    # Same bytes, new modification time (a copy, a restore): hashed again, and accepted.
    os.utime(model, ns=(0, 10**9))
    load_artifact(tmp_path / "a")
    assert len(hashed) == 2
    # The record vouches for one hash only: a manifest expecting another refuses the model.
    manifest = tmp_path / "a" / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good.replace('"model_sha256": "', '"model_sha256": "0'))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_artifact(tmp_path / "a")
    assert len(hashed) == 3
    manifest.write_text(good)
    (tmp_path / "a" / VERIFIED_FILE).write_text("{not json")
    load_artifact(tmp_path / "a")
    assert len(hashed) == 4


def test_a_changed_model_is_refused_after_a_good_load(tmp_path, hashed: list[str]) -> None:
    from ducho_fast.artifact import load_artifact
    from ducho_fast.errors import ArtifactError

    model = _artifact(tmp_path / "a", b"0123456789")
    load_artifact(tmp_path / "a")
    stamp = model.stat()
    with model.open("r+b") as f:  # same size, one byte changed in place
        f.write(b"X")
    os.utime(model, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even with the old mtime
    with pytest.raises(ArtifactError, match=r"does not match the sha256.*export again"):
        load_artifact(tmp_path / "a")
    assert len(hashed) == 2


def test_the_weights_file_is_checked_with_the_graph(tmp_path, hashed: list[str]) -> None:
    from ducho_fast.artifact import DATA_FILE, load_artifact
    from ducho_fast.errors import ArtifactError

    model = _artifact(tmp_path / "a", data=b"weights 0123")
    data = model.parent / DATA_FILE
    artifact = load_artifact(tmp_path / "a")
    assert artifact.data_path == data and set(artifact.hashes) == {"model_sha256", "data_sha256"}
    load_artifact(tmp_path / "a")
    assert hashed == ["model.onnx", "model.onnx.data"]  # the second load trusted the record
    stamp = data.stat()
    with data.open("r+b") as f:  # same size, one byte changed in place, old mtime
        f.write(b"W")
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(ArtifactError, match=r"model.onnx.data does not match the sha256"):
        load_artifact(tmp_path / "a")
    data.unlink()
    with pytest.raises(ArtifactError, match=r"model.onnx.data is missing.*export again"):
        load_artifact(tmp_path / "a")
    older = load_artifact(_artifact(tmp_path / "b").parent)  # weights inside model.onnx
    assert older.data_path is None and set(older.hashes) == {"model_sha256"}


def test_an_unwritable_store_hashes_every_time(
    tmp_path, hashed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ducho_fast import artifact

    def refused(*a, **k):
        raise PermissionError("read-only file system")

    _artifact(tmp_path / "a")
    monkeypatch.setattr(artifact, "replacing", refused)
    artifact.load_artifact(tmp_path / "a")
    artifact.load_artifact(tmp_path / "a")
    assert hashed == ["model.onnx", "model.onnx"]
    assert not (tmp_path / "a" / artifact.VERIFIED_FILE).exists()


def test_a_new_revision_of_a_precision_gets_its_own_artifact(monkeypatch) -> None:
    """Graphs made by an earlier version of the int8 exporter are not found, and so not
    reused, once its revision is bumped; fp32 slugs never depend on it."""
    from ducho_fast import artifact
    from ducho_fast.config.model import ModelSpec

    def spec(precision: str) -> ModelSpec:
        return ModelSpec(
            modality="textual",
            origin="items",
            key_path="textual.items.model.0",
            model_name="sentence-transformers/all-MiniLM-L6-v2",
            backend="sentence_transformers",
            backend_dir="sentence_transformers",
            output_layers=("1",),
            batch_size=32,
            precision=precision,
        )

    before = {p: artifact.slug_for(spec(p)) for p in ("fp32", "int8")}
    assert before["fp32"] != before["int8"]
    assert "precision_revision" not in artifact.graph_key(spec("fp32"))
    monkeypatch.setitem(
        artifact.PRECISION_REVISIONS, "int8", artifact.PRECISION_REVISIONS["int8"] + 1
    )
    assert artifact.slug_for(spec("int8")) != before["int8"]
    assert artifact.slug_for(spec("fp32")) == before["fp32"]


@pytest.mark.parametrize(
    ("text", "says"), [("{not json", "is not valid JSON"), ("[]", "JSON list")]
)
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path, text: str, says: str) -> None:
    from ducho_fast.artifact import MANIFEST_FILE, load_artifact
    from ducho_fast.errors import ArtifactError

    folder = _artifact(tmp_path / "a").parent
    (folder / MANIFEST_FILE).write_text(text)
    with pytest.raises(ArtifactError, match=rf"manifest\.json .*{says}.*export again"):
        load_artifact(folder)


def test_an_export_removes_what_killed_exports_left(tmp_path, monkeypatch) -> None:
    """SIGKILL or the OOM killer leaves a build folder (maybe GBs of weights): the next export
    removes its own model's, holding the lock no other export of it holds meanwhile, and other
    models' whose lock no export holds now. A model being exported keeps its folder."""
    from ducho_fast.artifact import exporting
    from ducho_fast.outputs import lock

    store = tmp_path / "store"
    slug = "torch-resnet18-0123456789ab"
    left = new_build_dir(store, slug)
    (left / "model.onnx.data").write_bytes(b"weights")
    other = new_build_dir(store, "torch-resnet50-0123456789ab")  # a killed export of another
    prefixed = new_build_dir(store, f"{slug}-image")  # a name that starts with this slug
    running = new_build_dir(store, "st-minilm-0123456789ab")
    kept = [running, store / f".building-{slug}-notatoken"]  # being built; not a build folder
    kept[-1].mkdir()
    held = lock.lock_file(store / ".exporting-st-minilm-0123456789ab.lock")  # its export
    assert held is not None
    try:
        with exporting(store, slug):
            assert not left.exists() and not other.exists() and not prefixed.exists()
            assert all(p.is_dir() for p in kept)
    finally:
        lock.unlock_file(held, store / ".exporting-st-minilm-0123456789ab.lock")
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in kept)

    # Without locks, another export of any model may be building it: nothing is removed.
    again = new_build_dir(store, slug)
    other = new_build_dir(store, "torch-resnet50-0123456789ab")
    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with exporting(store, slug):
        assert again.is_dir() and other.is_dir()


def test_what_is_not_an_artifact_folder_says_why(tmp_path) -> None:
    from ducho_fast.artifact import load_artifact
    from ducho_fast.errors import ArtifactError

    with pytest.raises(ArtifactError, match=r"artifact folder .*missing does not exist"):
        load_artifact(tmp_path / "missing")
    for unusable in ("a" * 256, "a\0b", "d/" * 2050):  # each an OSError or ValueError before
        with pytest.raises(ArtifactError, match=r"no artifact at .*: no file system takes it"):
            load_artifact(tmp_path / unusable)
    store = tmp_path / "store"
    for name in ("torch-b-1", "torch-a-2", "st-c-3", "st-d-4", "st-e-5", "st-f-6"):
        _artifact(store / name)
    (store / "notes").mkdir()
    with pytest.raises(ArtifactError, match=r"is a model store, not one artifact") as caught:
        load_artifact(store)  # a common slip: the store, not one of its artifacts
    assert "(st-c-3, st-d-4, st-e-5, st-f-6, torch-a-2 and 1 more)" in str(caught.value)
    with pytest.raises(ArtifactError, match=r"no complete artifact at .*notes \(needs manifest"):
        load_artifact(store / "notes")
    for name in ("model.onnx", "manifest.json"):  # the other common slip: a file in it
        with pytest.raises(ArtifactError, match=r"is a file of an artifact; give the artifact's"):
            load_artifact(store / "torch-a-2" / name)
    (tmp_path / "config.yml").write_text("dataset_path: .\n")
    with pytest.raises(ArtifactError, match=r"config.yml is a config file, not an artifact: give"):
        load_artifact(tmp_path / "config.yml")  # `inspect config.yml`
    assert load_artifact(store / "torch-a-2", verify=False).path == store / "torch-a-2"
