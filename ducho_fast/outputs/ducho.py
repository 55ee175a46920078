"""Ducho's output layout, which downstream scripts depend on.

``<dataset_path>/<output_path>/<backend>/<model dir>/<layer>/<id>.npy``, float32, shape (1, D)
as Ducho v2.0.1+ (``output.squeeze: true`` for (D,)). ``<backend>`` is the config's backend
word; ``<model dir>`` the visual model's file stem or the text model's name as nested folders.
"""

from __future__ import annotations

import errno
import io
import math
import os
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
                raise write_error(path, e) from e


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
    """One per-item feature file, or a DataError that names it and says how to remake it.

    The file is read in one call and its header looked up among those already read (the
    files of a folder share one: same dtype and shape), so ``np.load``'s parsing of the
    header runs once per kind of file, not per file: matrices and fusions read every
    feature (8 us a file instead of 54-72 here, 2048 floats on /dev/shm). Anything else than
    a plain, complete array (another format, a truncated file) goes to ``np.load``, which
    says what is wrong.
    """
    try:
        with path.open("rb", buffering=0) as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            size = f.readinto(data)
        array = _npy_array(data) if size == len(data) else None
        return array if array is not None else np.load(path)
    except (OSError, ValueError, EOFError) as e:  # EOFError: numpy's word for an empty file
        raise DataError(
            f"{path} is not a readable .npy feature ({type(e).__name__}: {e}): truncated or "
            "overwritten? Delete it and run extract again; its item is embedded anew."
        ) from e


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}  # header -> dtype, shape


def _npy_array(data: bytearray) -> np.ndarray | None:
    """The array of a ``.npy`` file's bytes when its header is a plain one (C order, no
    objects) and the data is complete; None otherwise. Writable, as ``np.load``'s arrays."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 12 or data[6] not in (1, 2):
        return None  # version 3 (a UTF-8 header) is left to np.load
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    header = bytes(data[:end])
    known = _NPY_HEADERS.get(header)
    if known is None:
        stream = io.BytesIO(header[8:])
        read = (
            np.lib.format.read_array_header_1_0
            if data[6] == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(stream)
        if fortran or dtype.hasobject:
            return None
        if len(_NPY_HEADERS) >= 256:  # token-level features: one shape per text length
            _NPY_HEADERS.clear()
        known = _NPY_HEADERS[header] = (dtype, tuple(shape))
    dtype, shape = known
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, count, offset=end).reshape(shape)


def save_feature(
    path: Path, array: np.ndarray, dtype: str = "float32", files: NpyFiles | None = None
) -> None:
    """Write one item's feature atomically (float32 or float16); a failed write stops the run.
    ``files``: save through these (their folder must exist), as the extract writer does: the
    header built once, the file written unnamed and linked in (a fusion of 20k ids here:
    206 -> 116 us an id)."""
    with _writing(path):
        if files is None:
            save_npy(path, array.astype(dtype, copy=False))
        else:
            files.save(path, array.astype(dtype, copy=False))


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from e


# What a write in an existing folder fails with where its file system refuses the name:
# exFAT, FAT and NTFS (also on Linux) refuse : * ? " < > | (ENOENT through FUSE, EINVAL from
# the kernel's drivers); some refuse names not in their encoding (EILSEQ) or longer than theirs.
_NAME_ERRORS = frozenset({errno.ENOENT, errno.EINVAL, errno.EILSEQ, errno.ENAMETOOLONG})


def write_error(path: Path, error: OSError) -> DataError | OutputError:
    """The error of a failed write: a DataError (the item fails, the run goes on) where the
    file system refuses this one file name, an OutputError (the run stops) otherwise."""
    if error.errno in _NAME_ERRORS and path.parent.is_dir():
        return DataError(
            f"the file system of {path.parent} refuses the file name {path.name!r} "
            f"({error.strerror or error}); rename the item (exFAT, FAT and NTFS refuse "
            ': * ? " < > | in file names), or write to another file system'
        )
    return _unwritable(path, error)


def _unwritable(path: Path, error: OSError) -> OutputError:
    return OutputError(
        f"cannot write {path}: {error.strerror or error}. Check that the output folder is "
        "writable and has free space; items already written are complete."
    )
