"""The per-item fast path writes the bytes np.save writes, atomically, with no leftovers:
unnamed files linked in (Linux) and named temporaries renamed (elsewhere) alike."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest

from ducho_fast.outputs import atomic
from ducho_fast.outputs.atomic import TMP_PREFIX, NpyFiles, save_npy, write_text

UNNAMED = atomic._UNNAMED is not None  # Linux: O_TMPFILE
needs_unnamed = pytest.mark.skipif(not UNNAMED, reason="O_TMPFILE is Linux's")
# Both ways of writing a file: the first is the second where the system has no O_TMPFILE.
MODES = [pytest.param(True, id="unnamed"), pytest.param(False, id="named")]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


ARRAYS: dict[str, np.ndarray] = {
    "row": np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32),
    "vector_fp16": np.arange(7, dtype=np.float16),
    "scalar": np.array(2.5, dtype=np.float32),
    "tokens": np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32),
    "strided_view": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
}


@pytest.mark.parametrize("unnamed", MODES)
@pytest.mark.parametrize("name", list(ARRAYS))
def test_files_hold_the_bytes_np_save_writes(tmp_path: Path, name: str, unnamed: bool) -> None:
    """Byte for byte what np.save writes for the array in C order (the pipeline's arrays are)."""
    files = NpyFiles(unnamed=unnamed)
    array = ARRAYS[name]
    for round_ in range(2):  # the second write reuses the cached header
        files.save(tmp_path / f"{name}{round_}.npy", array)
        expected = npy_bytes(np.require(array, requirements="C"))
        assert (tmp_path / f"{name}{round_}.npy").read_bytes() == expected
    np.testing.assert_array_equal(np.load(tmp_path / f"{name}1.npy"), array)


def test_shapes_sharing_a_cache_keep_their_own_headers(tmp_path: Path) -> None:
    files = NpyFiles()
    for i, array in enumerate([np.zeros((1, 4), np.float32), np.zeros((1, 5), np.float32)] * 2):
        files.save(tmp_path / f"{i}.npy", array)
        assert np.load(tmp_path / f"{i}.npy").shape == array.shape


@pytest.mark.parametrize("unnamed", MODES)
def test_an_existing_file_is_replaced_and_no_temporaries_stay(
    tmp_path: Path, unnamed: bool
) -> None:
    target = tmp_path / "a.npy"
    target.write_bytes(b"old")
    # two writers into one folder, as shards do
    writers = [NpyFiles(unnamed=unnamed), NpyFiles(unnamed=unnamed)]
    for k, files in enumerate(writers):
        files.save(target, np.full(3, k, np.float32))
        files.save(tmp_path / f"b{k}.npy", np.zeros(2, np.float32))
    np.testing.assert_array_equal(np.load(target), np.full(3, 1, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b0.npy", "b1.npy"]


@pytest.mark.parametrize("unnamed", MODES)
def test_a_failed_write_raises_and_leaves_neither_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        NpyFiles(unnamed=unnamed).save(tmp_path / "a.npy", np.zeros(3, np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("unnamed", MODES)
def test_a_short_write_is_continued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:50])))
    array = ARRAYS["row"]
    NpyFiles(unnamed=unnamed).save(tmp_path / "a.npy", array)
    assert (tmp_path / "a.npy").read_bytes() == npy_bytes(array)


def test_temporaries_carry_the_prefix_a_new_run_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def replace(src: str, dst: Path) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    files = NpyFiles(unnamed=False)
    for i in range(3):
        files.save(tmp_path / f"{i}.npy", np.zeros(1, np.float32))
    assert all(name.startswith(TMP_PREFIX) for name in seen)
    assert len(set(seen)) == 3


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_files_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """Group-readable under umask 022, as np.save would leave them (a temp file from
    tempfile.mkstemp is 0600, and the rename kept that)."""
    old = os.umask(0o022)
    try:
        NpyFiles().save(tmp_path / "a.npy", np.zeros(2, np.float32))
        NpyFiles(unnamed=False).save(tmp_path / "d.npy", np.zeros(2, np.float32))
        save_npy(tmp_path / "b.npy", np.zeros(2, np.float32))
        write_text(tmp_path / "c.txt", "x")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "a.npy": 0o644,
        "b.npy": 0o644,
        "c.txt": 0o644,
        "d.npy": 0o644,
    }


@pytest.mark.parametrize("writer", ["npy_files", "save_npy", "write_text"])
def test_a_failed_rename_leaves_neither_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    def refused(src: str, dst: Path) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refused)
    array = np.zeros(3, np.float32)
    write = {
        "npy_files": lambda: NpyFiles(unnamed=False).save(tmp_path / "a.npy", array),
        "save_npy": lambda: save_npy(tmp_path / "a.npy", array),
        "write_text": lambda: write_text(tmp_path / "a.txt", "x"),
    }[writer]
    with pytest.raises(OSError, match="Permission denied"):
        write()
    assert list(tmp_path.iterdir()) == []


class Spy:
    """Records the file-system calls of a write: os.open's flags, os.link and os.replace."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[int] = []
        self.linked: list[str] = []
        self.replaced: list[str] = []
        real_open, real_link, real_replace = os.open, os.link, os.replace

        def open_(path: str, flags: int, mode: int = 0o777) -> int:
            self.opened.append(flags)
            return real_open(path, flags, mode)

        def link(src: str, dst: str, **kwargs: object) -> None:
            self.linked.append(os.fspath(dst))
            real_link(src, dst, **kwargs)  # type: ignore[arg-type]

        def replace(src: str, dst: Path) -> None:
            self.replaced.append(os.fspath(dst))
            real_replace(src, dst)

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "replace", replace)

    @property
    def unnamed(self) -> int:
        """How many unnamed files were opened."""
        return sum(flags & os.O_TMPFILE == os.O_TMPFILE for flags in self.opened)


@needs_unnamed
def test_new_files_are_written_unnamed_and_linked_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No named temporary at all: one link per file, no rename."""
    spy = Spy(monkeypatch)
    files = NpyFiles()
    for i in range(3):
        files.save(tmp_path / f"{i}.npy", np.full(2, i, np.float32))
    assert spy.unnamed == 3 and len(spy.opened) == 3
    assert spy.linked == [str(tmp_path / f"{i}.npy") for i in range(3)]
    assert spy.replaced == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.npy", "1.npy", "2.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "2.npy"), np.full(2, 2, np.float32))


@needs_unnamed
def test_an_existing_file_is_replaced_and_the_next_new_one_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "old.npy").write_bytes(b"old")
    spy = Spy(monkeypatch)
    files = NpyFiles()
    files.save(tmp_path / "old.npy", np.ones(2, np.float32))
    files.save(tmp_path / "new.npy", np.zeros(2, np.float32))
    assert spy.replaced == [str(tmp_path / "old.npy")]
    assert spy.linked == [str(tmp_path / "old.npy"), str(tmp_path / "new.npy")]
    assert spy.unnamed == 2  # the folder still gets unnamed files
    np.testing.assert_array_equal(np.load(tmp_path / "old.npy"), np.ones(2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npy", "old.npy"]


@needs_unnamed
@pytest.mark.parametrize("errno_", [errno.EOPNOTSUPP, errno.EISDIR])
def test_a_file_system_without_unnamed_files_gets_named_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    """Asked once per folder (NFS says EOPNOTSUPP, kernels before 3.11 EISDIR)."""
    spy = Spy(monkeypatch)
    real_open = os.open

    def no_tmpfile(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            spy.opened.append(flags)
            raise OSError(errno_, os.strerror(errno_))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_tmpfile)
    files = NpyFiles()
    for i in range(3):
        files.save(tmp_path / f"{i}.npy", np.full(2, i, np.float32))
    assert spy.unnamed == 1
    assert spy.replaced == [str(tmp_path / f"{i}.npy") for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.npy", "1.npy", "2.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "1.npy"), np.full(2, 1, np.float32))


@needs_unnamed
def test_a_refused_link_falls_back_for_that_folder_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc is missing (ENOENT) or a file system refuses the link: named temporaries."""
    spy = Spy(monkeypatch)

    def refused(src: str, dst: str, **kwargs: object) -> None:
        spy.linked.append(dst)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", src)

    monkeypatch.setattr(os, "link", refused)
    files = NpyFiles()
    other = tmp_path / "other"
    other.mkdir()
    for i in range(2):
        files.save(tmp_path / f"{i}.npy", np.full(2, i, np.float32))
    files.save(other / "x.npy", np.zeros(1, np.float32))
    assert len(spy.linked) == 2  # once per folder
    assert spy.replaced == [str(tmp_path / "0.npy"), str(tmp_path / "1.npy"), str(other / "x.npy")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.npy", "1.npy", "other"]
    np.testing.assert_array_equal(np.load(tmp_path / "1.npy"), np.full(2, 1, np.float32))


@needs_unnamed
def test_a_missing_folder_is_reported_as_before(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        NpyFiles().save(tmp_path / "gone" / "a.npy", np.zeros(1, np.float32))
    assert list(tmp_path.iterdir()) == []
