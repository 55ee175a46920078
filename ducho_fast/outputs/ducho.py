"""Ducho's output layout, which downstream scripts depend on.

``<dataset_path>/<output_path>/<backend>/<model dir>/<layer>/<id>.npy``, float32, shape (1, D)
as Ducho v2.0.1+ (``output.squeeze: true`` for (D,)). ``<backend>`` is the config's backend
word; ``<model dir>`` the visual model's file stem or the text model's name as nested folders.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np

from ducho_fast.config.model import Job, ModelSpec
from ducho_fast.data.ids import check_id
from ducho_fast.errors import DataError, OutputError
from ducho_fast.outputs.atomic import NpyFiles, save_npy


def model_dir_parts(spec: ModelSpec) -> list[str]:
    """``<model dir>`` as path parts that cannot leave the output folder.

    A model given by absolute path or with ``..`` keeps its remaining parts; Ducho would join
    an absolute path onto nothing and write next to the model.
    """
    parts = PurePosixPath(spec.model_dir.replace("\\", "/")).parts
    return [p for p in parts if p not in ("/", ".", "..", "")] or ["model"]


def output_root(job: Job, spec: ModelSpec) -> Path:
    """The block's ``output_path`` this model writes under (a two-tower text tower: textual)."""
    root = job.text_output_path if spec.tower == "text" else job.output_path
    assert root is not None
    return root


def layer_parts(spec: ModelSpec, layer: str | int) -> list[str]:
    """``<backend>/<model dir>/<layer>`` as path parts."""
    return [spec.backend_dir, *model_dir_parts(spec), str(layer)]


def layer_dir(job: Job, spec: ModelSpec, layer: str | int) -> Path:
    return output_root(job, spec).joinpath(*layer_parts(spec, layer))


class DuchoWriter:
    """Writes one model's per-item outputs in Ducho's layout."""

    def __init__(self, job: Job, spec: ModelSpec, *, squeeze: bool, dtype: str = "float32") -> None:
        self._dirs = {label: layer_dir(job, spec, label) for label in spec.layer_labels()}
        self._squeeze = squeeze
        self._dtype = dtype
        self._files = NpyFiles()
        self._made: set[str] = set()  # layers whose folder exists

    @property
    def dirs(self) -> list[Path]:
        return list(self._dirs.values())

    def path(self, layer: str, item_id: str) -> Path:
        return self._dirs[layer] / f"{check_id(item_id)}.npy"

    def write(self, item_id: str, outputs: dict[str, np.ndarray]) -> None:
        """Save one item's outputs, every layer checked before any is written. The pipeline
        (``write_checked``) has refused non-finite outputs: a layer saved in its own dtype
        needs no range check, one cast to float16 does."""
        for layer, value in outputs.items():
            if layer in self._dirs and value.dtype != self._dtype:
                check_range(value, self._dtype, f"the {layer!r} features")
        for layer, value in outputs.items():
            if layer not in self._dirs:
                continue
            array = value if self._squeeze else value[np.newaxis]
            path = self.path(layer, item_id)
            try:
                if layer not in self._made:  # once per folder, not per item
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._made.add(layer)
                self._files.save(path, array.astype(self._dtype, copy=False))
            except OSError as e:
                raise _unwritable(path, e) from e


def check_range(array: np.ndarray, dtype: str, what: str) -> None:
    """A DataError where finite ``array`` would be saved as ``dtype`` with infinities
    (float16 beyond about +-65504)."""
    with np.errstate(over="ignore"):  # the overflow is what this finds
        saved = array.astype(dtype, copy=False)
    if not np.isfinite(saved).all():
        limit = float(np.finfo(dtype).max)
        raise DataError(
            f"{what} exceed {dtype}'s range (+-{limit:g}), so they would be saved as "
            "infinity; set output.dtype: float32"
        )


def load_feature(path: Path) -> np.ndarray:
    """One per-item feature file, or a DataError that names it and says how to remake it."""
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as e:  # EOFError: numpy's word for an empty file
        raise DataError(
            f"{path} is not a readable .npy feature ({type(e).__name__}: {e}): truncated or "
            "overwritten? Delete it and run extract again; its item is embedded anew."
        ) from e


def save_feature(path: Path, array: np.ndarray, dtype: str = "float32") -> None:
    """Write one item's feature atomically (float32 or float16); a failed write stops the run."""
    with _writing(path):
        save_npy(path, array.astype(dtype, copy=False))


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _unwritable(path, e) from e


def _unwritable(path: Path, error: OSError) -> OutputError:
    return OutputError(
        f"cannot write {path}: {error.strerror or error}. Check that the output folder is "
        "writable and has free space; items already written are complete."
    )
