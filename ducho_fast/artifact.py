"""The artifact contract: ``<store>/<slug>/{model.onnx, model.onnx.data, manifest.json,
tokenizer.json}``.

Written by the exporters and read by the runtime, so the runtime never imports an exporter.
The slug is a deterministic function of what determines the graph, computed from a config
entry alone: ``export`` skips work that is done and valid, ``extract`` finds the artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from ducho_fast.config.model import ModelSpec
from ducho_fast.config.paths import absent, no_path
from ducho_fast.data.items import FileStamp
from ducho_fast.errors import ArtifactError
from ducho_fast.outputs.atomic import replacing
from ducho_fast.outputs.lock import Busy, holder_line, lock_file, unlock_file, write_holder

log = logging.getLogger("ducho_fast")

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
# The graph's weights, beside it as ONNX external data (``exporters/graphs.py``): ONNX Runtime
# reads them straight into its tensors, without parsing and copying a protobuf of the whole
# model, and no 2 GB protobuf limit applies. Artifacts written before it hold their weights in
# model.onnx and still load.
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
BUILDING = ".building-"  # an export's folder until it is renamed into place
VERIFIED_FILE = ".verified.json"  # a cache of the model's hash check, not part of the contract
# Bump a precision's entry when the exporter changes the graphs it writes for it, so that
# ``export`` makes them again instead of finding the earlier ones under the same slug (int8 2:
# per-token products; 1: per-batch scales with the GELU-fed projections in fp32).
PRECISION_REVISIONS = {"fp16": 1, "int8": 2}


def graph_key(spec: ModelSpec) -> dict[str, Any]:
    """Everything that changes the exported graph or its recorded preprocessing."""
    key: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "backend": spec.backend,
        "model": _file_identity(spec.local_path) if spec.local_path else spec.model_name,
        "weights": _file_identity(spec.weights_path) if spec.weights_path else spec.weights,
        "architecture": spec.architecture,
        "architecture_kwargs": spec.architecture_kwargs,
        "layers": spec.layer_labels(),
        "precision": spec.precision,
    }
    if spec.precision in PRECISION_REVISIONS:
        key["precision_revision"] = PRECISION_REVISIONS[spec.precision]
    if spec.tower is not None:
        key["tower"] = spec.tower
        key["image_processor"] = spec.image_processor
        key["text"] = {"max_length": spec.max_length, "tokenizer": spec.tokenizer_name}
    elif spec.modality == "audio":
        key["audio"] = {
            "pooling": spec.pooling,
            "max_seconds": spec.max_seconds,
            "sample_rate": spec.sample_rate,
        }
    elif spec.modality == "visual":
        key["visual"] = {
            "reshape": spec.reshape,
            "preprocessing": spec.preprocessing,
            "mean": spec.mean if spec.preprocessing == "zscore" else None,
            "std": spec.std if spec.preprocessing == "zscore" else None,
        }
    else:
        key["text"] = {"max_length": spec.max_length, "tokenizer": spec.tokenizer_name}
    return key


def _file_identity(path: Path) -> dict[str, Any]:
    # Path, size and mtime stand in for the content hash (recorded in the manifest) so that
    # finding an artifact never reads a multi-GB weights file.
    st = path.stat()
    if path.is_dir():
        sizes = sorted((p.name, p.stat().st_size) for p in path.rglob("*") if p.is_file())
        return {"path": str(path), "files": sizes}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def slug_for(spec: ModelSpec) -> str:
    digest = hashlib.sha256(json.dumps(graph_key(spec), sort_keys=True).encode()).hexdigest()
    stem = Path(spec.model_name.rstrip("/")).name or spec.model_name
    short = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:40] or "model"
    tower = f"-{spec.tower}" if spec.tower else ""
    return f"{spec.backend}-{short}{tower}-{digest[:12]}"


def varies_per_item(output: dict[str, Any]) -> bool:
    """Whether an output's length differs from item to item (tokens of a text, audio frames)."""
    return bool(output.get("per_token") or output.get("per_frame"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _matches(files: dict[Path, str | None]) -> Path | None:
    """The first of ``files`` whose sha256 is not the one given, or None; each version of the
    files is hashed once.

    A match is recorded beside them (``VERIFIED_FILE``) with each file's ``FileStamp`` (size,
    modification and change times in ns, inode; not the device, which differs between the hosts
    that mount one shared store). Any write, copy or replacement changes a stamp (the
    change time cannot be set back), so the next load hashes again; an unwritable folder
    only means hashing every time. Large graphs take seconds to hash, in every shard and actor.
    """
    record = next(iter(files)).parent / VERIFIED_FILE
    expected = {path.name: sha for path, sha in files.items()}
    before = {path.name: list(astuple(FileStamp.of(path))) for path in files}
    try:
        if json.loads(record.read_text("utf-8")) == {"stamps": before, "sha256": expected}:
            return None
    except (OSError, ValueError):
        pass
    for path, sha in files.items():
        if sha256_file(path) != sha:
            return path
    if {path.name: list(astuple(FileStamp.of(path))) for path in files} == before:
        try:  # recorded only when not written while being hashed
            with replacing(record) as fd:
                os.write(fd, json.dumps({"stamps": before, "sha256": expected}).encode())
        except OSError:
            pass
    return None


@dataclass(frozen=True)
class Artifact:
    """An exported model on disk: its directory and parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def data_path(self) -> Path | None:
        """The graph's weights file, or None when model.onnx holds them (older artifacts)."""
        return self.path / DATA_FILE if "data_sha256" in self.manifest else None

    @property
    def hashes(self) -> dict[str, str]:
        """The sha256 of its graph and of its weights file (when apart): what identifies the
        model whose features a run writes."""
        keys = ("model_sha256", "data_sha256")
        return {k: str(self.manifest[k]) for k in keys if k in self.manifest}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def modality(self) -> str:
        return str(self.manifest["modality"])

    def output(self, layer: str | int) -> dict[str, Any]:
        for out in self.manifest["outputs"]:
            if str(out["layer"]) == str(layer):
                return dict(out)
        known = [o["layer"] for o in self.manifest["outputs"]]
        raise ArtifactError(f"artifact {self.path} has no output for layer {layer!r} ({known}).")


def _not_an_artifact(path: Path) -> str:
    """Why ``path`` is no artifact: missing, a file in one (its folder named), a model store
    (its artifacts named), or incomplete."""
    if not path.exists():
        return (
            f"artifact folder {path} {absent(path)}.\nHint: run `ducho-fast export CONFIG` first."
        )
    if path.is_file() and (path.parent / MANIFEST_FILE).is_file():
        return f"{path} is a file of an artifact; give the artifact's folder, {path.parent}."
    if path.is_file() and path.suffix.lower() in (".yml", ".yaml"):
        return (
            f"{path} is a config file, not an artifact: give one of the folders of its model "
            f"store (its key 'store', local/models by default). `ducho-fast export {path}` "
            "names each model's folder (and reuses those already exported)."
        )
    inside = []
    if path.is_dir():
        with suppress(OSError):
            inside = sorted(
                p.name for p in path.iterdir() if (p / MANIFEST_FILE).is_file() and p.is_dir()
            )
    if inside:
        shown = ", ".join(inside[:5]) + (f" and {len(inside) - 5} more" if len(inside) > 5 else "")
        return (
            f"{path} is a model store, not one artifact: give one of its folders ({shown}). "
            "`ducho-fast inspect FOLDER` shows what one holds."
        )
    return (
        f"no complete artifact at {path} (needs {MANIFEST_FILE} and {MODEL_FILE}).\n"
        "Hint: run `ducho-fast export CONFIG` first."
    )


def load_artifact(path: Path, *, verify: bool = True) -> Artifact:
    """Read and check an artifact directory (manifest present, graph hash matches)."""
    manifest_path = path / MANIFEST_FILE
    if no_path(manifest_path):  # is_file would raise
        raise ArtifactError(
            f"no artifact at {str(path)!r}: no file system takes it as a path (it holds a NUL "
            "character, a name over 255 bytes or 4096 bytes or more in all)."
        )
    if not manifest_path.is_file() or not (path / MODEL_FILE).is_file():
        raise ArtifactError(_not_an_artifact(path))
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({e}); export again.") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(
            f"{manifest_path} holds a JSON {type(manifest).__name__}, not a manifest (an "
            "object); export again."
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_path} has schema version {manifest.get('schema_version')}, this "
            f"ducho-fast reads {SCHEMA_VERSION}. Export the model again."
        )
    files = {path / MODEL_FILE: manifest.get("model_sha256")}
    if "data_sha256" in manifest:
        files[path / DATA_FILE] = manifest["data_sha256"]
        if not (path / DATA_FILE).is_file():
            raise ArtifactError(
                f"{path / DATA_FILE} is missing: it holds the weights of {path / MODEL_FILE}, "
                "and the two are only ever copied or moved together. Delete the folder and "
                "export again."
            )
    changed = _matches(files) if verify else None
    if changed is not None:
        raise ArtifactError(
            f"{changed} does not match the sha256 in its manifest (changed or truncated). "
            "Delete the folder and export again."
        )
    return Artifact(path=path, manifest=manifest)


def exported(store: Path, spec: ModelSpec) -> bool:
    """Whether ``export`` wrote an artifact for this config entry in ``store`` (its manifest
    is there; :func:`find_artifact` checks the rest)."""
    return (store / slug_for(spec) / MANIFEST_FILE).is_file()


def find_artifact(store: Path, spec: ModelSpec) -> Artifact:
    """The artifact that ``export`` wrote for this config entry."""
    path = store / slug_for(spec)
    if not exported(store, spec):
        raise ArtifactError(
            f"'{spec.key_path}' ({spec.model_name}) has not been exported: no artifact at "
            f"{path}.\nHint: run `ducho-fast export CONFIG` with the same config first."
        )
    return load_artifact(path)


@contextmanager
def exporting(store: Path, slug: str) -> Iterator[None]:
    """Hold the store's lock on ``slug``: one export of an artifact at a time.

    The tasks of a job array that each run ``export`` before ``extract`` wait for the first,
    then reuse its artifact, instead of each building its own and replacing the artifact
    under the extracts already running.
    """
    path = store / f".exporting-{slug}.lock"
    try:
        store.mkdir(parents=True, exist_ok=True)
        try:
            fd = lock_file(path)
        except Busy as e:
            log.warning(
                "%s is being exported by another process now (%s); waiting for it to finish.",
                store / slug,
                e.holder or "unnamed",
            )
            fd = lock_file(path, wait=True)
    except OSError as e:
        raise ArtifactError(
            f"cannot write to the model store {store} (key 'store'): {e.strerror or e}.\n"
            "Hint: set `store` to a folder you can write to, or check that the disk has space."
        ) from e
    try:
        if fd is not None:  # None: a file system without locks, unlocked
            write_holder(fd, holder_line("ducho-fast export"))
            _remove_leftovers(store, slug)
        yield
    finally:
        if fd is not None:
            unlock_file(fd, path)


_LEFTOVER = re.compile(re.escape(BUILDING) + r"(.+)-[0-9a-f]{12}")


def _remove_leftovers(store: Path, slug: str) -> None:
    """Remove the build folders killed exports left (SIGKILL, the OOM killer, a power loss; a
    failed or stopped export removes its own): ``slug``'s, whose lock this export holds, and
    another model's where no export of it holds that model's lock now (every build folder is
    made and used under its model's lock)."""
    with os.scandir(store) as entries:
        left = [
            (match.group(1), Path(e.path))
            for e in entries
            if (match := _LEFTOVER.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)
        ]
    for owner, path in left:
        if owner == slug:
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove_unless_exporting(store, owner, path)


def _remove_unless_exporting(store: Path, owner: str, path: Path) -> None:
    lock = store / f".exporting-{owner}.lock"
    try:
        fd = lock_file(lock)
    except (Busy, OSError):
        return  # an export of that model is running (this may be its folder), or unknown
    if fd is None:
        return  # a file system without locks: exports run unlocked, so it may be in use
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        unlock_file(fd, lock)


def write_artifact(store: Path, slug: str, build_dir: Path, manifest: dict[str, Any]) -> Artifact:
    """Finish ``build_dir`` (which holds model.onnx and, unless all its tensors are small,
    model.onnx.data) and move it into place atomically."""
    manifest = {
        **manifest,
        "schema_version": SCHEMA_VERSION,
        "slug": slug,
        "model_sha256": sha256_file(build_dir / MODEL_FILE),
    }
    if (build_dir / DATA_FILE).is_file():
        manifest["data_sha256"] = sha256_file(build_dir / DATA_FILE)
    (build_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str), "utf-8")
    target = store / slug
    if target.exists():  # --force: set aside, so the name is missing for a rename's time only
        old = new_build_dir(store, slug)
        os.replace(target, old / slug)
        os.replace(build_dir, target)
        shutil.rmtree(old, ignore_errors=True)  # what stays, the next export of it removes
    else:
        os.replace(build_dir, target)
    return Artifact(path=target, manifest=manifest)


def new_build_dir(store: Path, slug: str) -> Path:
    """A temporary directory inside the store for ``slug``'s artifact, so the final move is a
    same-disk rename. Named after the slug, so the next export of it removes it if this one
    is killed (:func:`_remove_leftovers`).

    Made with 0777 less the umask, as the store itself: ``tempfile.mkdtemp`` makes it 0700,
    which the rename would keep, hiding the artifact from everyone else sharing the store.
    """
    store.mkdir(parents=True, exist_ok=True)
    while True:
        path = store / f"{BUILDING}{slug}-{secrets.token_hex(6)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
