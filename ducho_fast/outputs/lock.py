"""Locks that the system releases when their process ends: one writer per output folder.

A run takes ``.ducho-fast.lock`` in each folder it writes, for as long as it writes. Two runs
writing one folder at once would lose features: each removes the temporary files it finds
when it starts (a killed run's leftovers, it assumes), and the other's writes fail. So a plain
run locks its folders exclusively and the tasks of a job array (``--shard i/N``, which keep
each other's temporary files) share theirs: a second plain run, a plain run among running
shards, or a shard beside a plain run stops before any work, naming the run that holds the
folder. ``export`` locks each artifact it makes the same way, and waits for another export
of it (:func:`ducho_fast.artifact.exporting`).

A lock is ``flock`` on a file, held through an open descriptor: a process killed in any way
releases it, so no stale lock outlives its run (over NFS, after the server's lease); the last
holder removes the file. Where the file system has no locks, or the platform no ``fcntl``,
runs go unlocked, as before.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ducho_fast.errors import OutputError, unwritable_folder

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".ducho-fast.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_TRIES = 10


class FolderLocks:
    """The locks of one run's output folders, released together when it ends.

    Args:
        holder: who holds them, as the error of a run that finds them taken says it
            (``"ducho-fast extract"``; shared: ``"the tasks of a job array, --shard i/4"``).
        shared: taken by a task of a job array, which shares its folders with the other tasks.
    """

    def __init__(self, holder: str, *, shared: bool = False) -> None:
        self.holder = holder
        self.shared = shared
        self._fds: dict[Path, int] = {}

    def take(self, folder: Path) -> None:
        """Lock ``folder`` (made if missing) for this run, or raise OutputError naming the run
        that writes it now. A folder this run holds already is not locked twice."""
        key = folder.resolve()
        if key in self._fds:
            return
        path = folder / LOCK_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = lock_file(path, shared=self.shared, wait=False)
        except Busy as e:
            raise OutputError(self._busy_message(folder, e.holder)) from e
        except OSError as e:
            raise unwritable_folder(folder, e) from e
        if fd is not None:  # None: a file system without locks, unlocked as before
            self._fds[key] = fd
            # Shared: the holder alone, as the tasks of a job array come and go (a process
            # named could be one that has ended).
            write_holder(fd, self.holder if self.shared else holder_line(self.holder))

    def _busy_message(self, folder: Path, who: str) -> str:
        held_by = f" ({who})" if who else ""
        if self.shared:
            return (
                f"{folder} is being written by a run without --shard now{held_by}; a task of "
                "a job array cannot share the folder with it.\nHint: wait for that run to "
                "finish, then start the job array; it resumes from the features written."
            )
        return (
            f"{folder} is being written by another ducho-fast run now{held_by}. Two runs "
            "writing one folder would remove each other's unfinished files.\nHint: wait for "
            "it to finish and run again (the features it wrote are reused), or choose another "
            "output_path. To split one job across processes or hosts, run its tasks with "
            "--shard i/N."
        )

    def release(self) -> None:
        """Release every lock; the last holder of a folder removes its lock file."""
        for folder, fd in self._fds.items():
            unlock_file(fd, folder / LOCK_FILE)
        self._fds.clear()

    def __enter__(self) -> FolderLocks:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()


class Busy(Exception):
    """Another process holds the lock; ``holder`` is the line it wrote ("" if none)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def lock_file(path: Path, *, shared: bool = False, wait: bool = False) -> int | None:
    """Open ``path`` (made if missing) and lock it: its descriptor, for :func:`unlock_file`.

    Without ``wait``, a lock another process holds raises :class:`Busy`; with it, this waits
    (Ctrl-C and SIGTERM still stop it). None where the file system has no locks. Other
    errors are OSError.
    """
    if fcntl is None:
        return None
    operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    for _ in range(_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, operation)
        except OSError as e:
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            holder = read_holder(fd) if busy else ""
            os.close(fd)
            if e.errno in _NO_LOCKS:
                return None
            if busy:
                raise Busy(holder) from e
            raise
        if _still_named(fd, path):
            return fd
        os.close(fd)  # the holder removed the file as it ended: lock the new one
    raise OSError(errno.EAGAIN, f"{path} keeps being replaced")


def unlock_file(fd: int, path: Path) -> None:
    """Release the lock :func:`lock_file` took; the last holder removes the file."""
    _remove_if_last(fd, path)
    os.close(fd)  # closing the descriptor releases its lock


def holder_line(holder: str) -> str:
    """``holder`` with this process, host and time: what a process that finds the lock taken
    reads."""
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"{holder}, pid {os.getpid()} on {socket.gethostname()}, since {since}"


def write_holder(fd: int, text: str) -> None:
    """Who holds the lock, for the error of a run that finds it taken."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode(), 0)
    except OSError:
        pass  # the lock holds without it; only the message loses the name


def read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path``: a run that ends removes its lock file,
    and a run that opened it just before holds a lock on a file no other run will see."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _remove_if_last(fd: int, path: Path) -> None:
    """Remove the lock file when no other run holds it (an exclusive lock, which a shard
    gets only as the last task of its job array still running), so finished folders hold
    only features and records. A run that opened the file meanwhile sees it gone and locks
    a new one (:func:`_still_named`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:
        pass  # other tasks hold it still: the last to end removes it
