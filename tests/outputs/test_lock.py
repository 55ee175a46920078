"""One writer per output folder: plain runs lock theirs, the tasks of a job array share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ducho_fast.errors import OutputError
from ducho_fast.fusion import fuse_folders
from ducho_fast.outputs import lock
from ducho_fast.outputs.lock import LOCK_FILE, FolderLocks
from tests.conftest import REPO, no_locks


def test_a_second_run_is_refused_naming_the_first(tmp_path: Path) -> None:
    folder = tmp_path / "out" / "avgpool"
    with FolderLocks("ducho-fast extract") as first:
        first.take(folder)
        assert (folder / LOCK_FILE).is_file()
        with pytest.raises(
            OutputError,
            match=rf"{folder} is being written by another ducho-fast run now \(ducho-fast "
            rf"extract, pid {os.getpid()} on .+, since .+\)\. Two runs writing one folder would "
            r"remove each other's unfinished files\.\nHint: wait for it to finish",
        ):
            FolderLocks("ducho-fast extract").take(folder)
        first.take(folder)  # a folder a run holds already: not a conflict with itself
    assert not (folder / LOCK_FILE).exists()  # released, and no file left behind
    with FolderLocks("ducho-fast extract") as second:
        second.take(folder)


def test_tasks_of_a_job_array_share_a_folder_and_no_plain_run_joins_them(tmp_path: Path) -> None:
    shards = [FolderLocks("the tasks of a job array, --shard i/2", shared=True) for _ in range(2)]
    for shard in shards:
        shard.take(tmp_path)
    with pytest.raises(
        OutputError,
        match=r"another ducho-fast run now \(the tasks of a job array, --shard i/2\)\. Two",
    ):
        FolderLocks("ducho-fast extract").take(tmp_path)
    shards[0].release()
    assert (tmp_path / LOCK_FILE).exists()  # the other task still writes
    shards[1].release()
    assert not (tmp_path / LOCK_FILE).exists()  # the last one out removes it

    with FolderLocks("ducho-fast extract") as plain:
        plain.take(tmp_path)
        with pytest.raises(
            OutputError,
            match=r"being written by a run without --shard now \(ducho-fast extract, pid .+\); "
            r"a task of a job array cannot share the folder with it",
        ):
            FolderLocks("the tasks of a job array, --shard i/2", shared=True).take(tmp_path)


def test_a_killed_run_leaves_no_lock(tmp_path: Path) -> None:
    """SIGKILL runs no clean-up: the system releases the lock; the file stays, unlocked."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from ducho_fast.outputs.lock import FolderLocks; "
            f"FolderLocks('ducho-fast extract').take(pathlib.Path({str(tmp_path)!r})); "
            "print('locked', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    with pytest.raises(OutputError, match=rf"\(ducho-fast extract, pid {holder.pid} on "):
        FolderLocks("ducho-fast extract").take(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    assert (tmp_path / LOCK_FILE).exists()
    with FolderLocks("ducho-fast extract") as after:
        after.take(tmp_path)


def test_a_lock_file_removed_under_a_run_is_taken_again(tmp_path: Path, monkeypatch) -> None:
    """A run that opened the lock file just as its holder ended and removed it holds a lock
    on a file no later run sees: it opens the new file and locks that one."""
    path = tmp_path / LOCK_FILE
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert lock._still_named(fd, path)
        path.unlink()
        assert not lock._still_named(fd, path)
        path.touch()
        assert not lock._still_named(fd, path)
    finally:
        os.close(fd)

    checks = iter([False, True])
    monkeypatch.setattr(lock, "_still_named", lambda fd, path: next(checks))
    with FolderLocks("ducho-fast extract") as locks:
        locks.take(tmp_path)
    assert next(checks, "both used") == "both used"


def test_a_file_system_without_locks_runs_unlocked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with FolderLocks("ducho-fast extract") as one, FolderLocks("ducho-fast extract") as two:
        one.take(tmp_path)
        two.take(tmp_path)


def test_an_unwritable_folder_is_named(tmp_path: Path, monkeypatch) -> None:
    """A file on the folder's path is named (the disk's free space was, for "Not a
    directory"); any other error is given with the checks to make."""
    (tmp_path / "file").write_text("")
    with pytest.raises(
        OutputError,
        match=r"cannot write to the output folder (\S+)/file/sub/deeper: \1/file is a file, not "
        r"a folder\. Give an output_path that is a folder \(or not there yet\), or move that",
    ):
        FolderLocks("ducho-fast extract").take(tmp_path / "file" / "sub" / "deeper")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(
        OutputError,
        match=r"output folder .*/new: Permission denied\. Check that it is writable and that",
    ):
        FolderLocks("ducho-fast extract").take(tmp_path / "new")


def test_a_fusion_into_a_folder_another_run_fuses_into_is_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x1.npy", np.ones((1, 4), np.float32))
    with FolderLocks("ducho-fast fusion 'fusion.0'") as other:
        other.take(tmp_path / "out")
        with pytest.raises(OutputError, match=r"another ducho-fast run now \(ducho-fast fusion"):
            fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "sum")
        assert not (tmp_path / "out" / "x1.npy").exists()
    result = fuse_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "sum")
    assert result.written == 1 and not (tmp_path / "out" / LOCK_FILE).exists()
