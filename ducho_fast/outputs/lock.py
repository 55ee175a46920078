"""One writer per output folder: a lock file that the system releases when its run ends.

A run takes ``.ducho-fast.lock`` in each folder it writes, for as long as it writes. Two runs
writing one folder at once would lose features: each removes the temporary files it finds
when it starts (a killed run's leftovers, it assumes), and the other's writes fail. So a plain
run locks its folders exclusively and the tasks of a job array (``--shard i/N``, which keep
each other's temporary files) share theirs: a second plain run, a plain run among running
shards, or a shard beside a plain run stops before any work, naming the run that holds the
folder.

The lock is ``flock`` on the file, held through an open descriptor: a run killed in any way
releases it, so no stale lock outlives its run (over NFS, after the server's lease). Where the
file system has no locks, or the platform no ``fcntl``, runs go unlocked, as before.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ducho_fast.errors import OutputError

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
        if key in self._fds or fcntl is None:
            return
        for _ in range(_TRIES):
            fd = self._open(folder)
            if fd is None:
                return  # a file system without locks: unlocked, as before
            if _still_named(fd, folder / LOCK_FILE):
                break
            os.close(fd)  # the holder removed the file as it ended: lock the new one
        else:
            raise OutputError(f"cannot lock {folder / LOCK_FILE}: it keeps being replaced.")
        self._fds[key] = fd
        _write_holder(fd, self._who())

    def _who(self) -> str:
        """The line a run that finds the folder taken reads: the holder alone when shared
        (the tasks of a job array come and go; a process named would be one that may have
        ended), with its process otherwise."""
        if self.shared:
            return self.holder
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        return f"{self.holder}, pid {os.getpid()} on {socket.gethostname()}, since {since}"

    def _open(self, folder: Path) -> int | None:
        """The lock file's descriptor, locked; None where the file system has no locks."""
        path = folder / LOCK_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(
                f"cannot write to the output folder {folder}: {e.strerror or e}. Check that it "
                "is writable and that the disk has space."
            ) from e
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            who = _read_holder(fd) if busy else ""
            os.close(fd)
            if e.errno in _NO_LOCKS:
                return None
            if busy:
                raise OutputError(self._busy_message(folder, who)) from e
            raise OutputError(f"cannot lock {path}: {e.strerror or e}.") from e
        return fd

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
            _remove_if_last(fd, folder / LOCK_FILE)
            os.close(fd)  # closing the descriptor releases its lock
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


def _write_holder(fd: int, text: str) -> None:
    """Who holds the lock, for the error of a run that finds it taken."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode(), 0)
    except OSError:
        pass  # the lock holds without it; only the message loses the name


def _read_holder(fd: int) -> str:
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
