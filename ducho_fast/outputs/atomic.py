"""Atomic writes: a temp file in the target folder, then a rename over the final name."""

from __future__ import annotations

import io
import itertools
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ducho_fast.data.ids import TMP_PREFIX  # a killed run's leftovers; never read, removed

_TOKEN = secrets.token_hex(4)
_COUNT = itertools.count()


def temp_path(folder: Path, suffix: str = "") -> str:
    """A new temp name in ``folder``, unique across the processes and hosts of a job array
    (a random token, the process id, a counter)."""
    return os.path.join(folder, f"{TMP_PREFIX}{_TOKEN}-{os.getpid()}-{next(_COUNT)}{suffix}")


def open_temp(folder: Path, suffix: str = "") -> tuple[int, str]:
    """A new temp file in ``folder``, opened for writing: its descriptor and path.

    Its name is unique across the processes and hosts of a job array that write one folder (a
    random token, the process id, a counter), and it gets the permissions of a plain
    ``open`` (0666 less the umask), which the final file keeps.
    """
    tmp = temp_path(folder, suffix)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(tmp, flags, 0o666), tmp


@contextmanager
def replacing(path: Path, suffix: str = "") -> Iterator[int]:
    """A temp file in ``path``'s folder, written through the yielded descriptor (file objects
    over it take ``closefd=False``), then closed and renamed over ``path``; removed when the
    block fails."""
    fd, tmp = open_temp(path.parent, suffix)
    try:
        try:
            yield fd
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` so that a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, ".npy") as fd, os.fdopen(fd, "wb", closefd=False) as f:
        np.save(f, array, allow_pickle=False)


class NpyFiles:
    """Saves many small arrays as ``.npy`` files into existing folders, atomically, with the
    same bytes as :func:`save_npy` and less work per file (the per-item writer's CPU time is
    taken from the model's threads): the header is built once per dtype and shape, and the
    file is written with one call.
    """

    def __init__(self) -> None:
        self._headers: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def save(self, path: Path, array: np.ndarray) -> None:
        """Write ``array`` to ``path`` (its folder must exist) so no reader sees a partial file."""
        array = np.require(array, requirements="C")  # keeps a 0-d array 0-d
        key = (array.dtype.str, array.shape)
        header = self._headers.get(key)
        if header is None:
            header = self._headers[key] = _npy_header(array)
        with replacing(path, ".npy") as fd:
            _write_all(fd, header + array.tobytes())


def _npy_header(array: np.ndarray) -> bytes:
    """What ``np.save`` writes before the data of an array of this dtype and shape."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()[: buffer.tell() - array.nbytes]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as fd, os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
        f.write(text)
