"""Atomic writes: a temp file in the target folder, then a rename over the final name."""

from __future__ import annotations

import errno
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

    On Linux a file is written unnamed (``O_TMPFILE``) and linked in under its name when
    complete: one change to the folder instead of a named temporary's two (create, rename),
    and nothing left behind by a killed run. Where the file system has no unnamed files (NFS,
    other systems than Linux), the name is taken (an existing feature is replaced) or the link
    fails, a named temporary is written and renamed, as :func:`replacing` does.
    ``unnamed=False``: always a named temporary (to compare the two).
    """

    def __init__(self, *, unnamed: bool = True) -> None:
        self._headers: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._unnamed = unnamed and _UNNAMED is not None
        self._named_folders: set[str] = set()  # folders whose file system has no unnamed files

    def save(self, path: Path, array: np.ndarray) -> None:
        """Write ``array`` to ``path`` (its folder must exist) so no reader sees a partial file."""
        array = np.require(array, requirements="C")  # keeps a 0-d array 0-d
        key = (array.dtype.str, array.shape)
        header = self._headers.get(key)
        if header is None:
            header = self._headers[key] = _npy_header(array)
        data = header + array.tobytes()
        if self._unnamed and self._linked(os.fspath(path), data):
            return
        with replacing(path, ".npy") as fd:
            _write_all(fd, data)

    def unnamed_in(self, folder: Path) -> bool:
        """Whether new files in ``folder`` are written unnamed: so far, if nothing was saved
        there yet."""
        return self._unnamed and os.fspath(folder) not in self._named_folders

    def _linked(self, path: str, data: bytes) -> bool:
        """Whether ``data`` was written unnamed in ``path``'s folder and linked in as ``path``.
        False where it was not and nothing was left: the caller writes a named temporary,
        which reports what is wrong with the folder, if anything."""
        folder = os.path.dirname(path)
        if folder in self._named_folders:
            return False
        try:
            fd = os.open(folder or ".", _UNNAMED or 0, 0o666)
        except OSError as e:
            if e.errno in _NO_UNNAMED:
                self._named_folders.add(folder)
            return False
        try:
            _write_all(fd, data)  # a failure raises: the unnamed file goes with its descriptor
            linked = _link(fd, path)
        finally:
            os.close(fd)
        if linked is False:  # no /proc, or a file system refusing such links
            self._named_folders.add(folder)
        return bool(linked)


def _link(fd: int, path: str) -> bool | None:
    """Link the unnamed file open as ``fd`` in as ``path``: True; None where ``path`` exists
    (a feature written before, to be replaced); False where such links fail here."""
    try:
        # linkat(2) with AT_SYMLINK_FOLLOW through /proc names the open file. Python calls
        # linkat rather than link(2), which would link the /proc entry itself, only when given
        # a directory descriptor: src_dir_fd, which an absolute path ignores.
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd)
    except FileExistsError:
        return None
    except OSError:
        return False
    return True


# O_TMPFILE with write access: an unnamed file in a folder (Linux 3.11 or later). Errors that
# say the kernel or the folder's file system has none; any other (a missing or unwritable
# folder) the named temporary reports.
_UNNAMED = os.O_WRONLY | os.O_TMPFILE if hasattr(os, "O_TMPFILE") else None
_NO_UNNAMED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP})


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
