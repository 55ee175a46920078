"""A file system with a network file system's round trips, to time extract's writers on one.

    pip install fusepy                       # not a dependency of ducho-fast; needs libfuse 2
    python benchmarks/slowfs.py BACKING MOUNT 0.0005 &
    ducho-fast bench CONFIG --work MOUNT --vs runtime.writers=1 --vs runtime.writers=8
    fusermount -u MOUNT

A FUSE passthrough to the folder BACKING, mounted on MOUNT, that waits DELAY seconds in each
call that changes a folder (create, rename, link, unlink, mkdir, rmdir) and in each file's
close, as NFS does its server's round trips for them. It takes no unnamed files
(``O_TMPFILE``), as NFS does not, so extract's writer writes a named temporary and renames it.
Served by Python threads (sleeping without the GIL), from the same CPUs as what it times.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any

from fuse import FUSE, FuseOSError, Operations

STAT = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
STATFS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")


class Slow(Operations):
    def __init__(self, root: str, delay: float) -> None:
        self.root, self.delay = root, delay

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _wait(self) -> None:
        time.sleep(self.delay)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        try:
            st = os.lstat(self._p(path))
        except OSError as e:
            raise FuseOSError(e.errno) from e
        return {k: getattr(st, k) for k in STAT}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._p(path))]

    def access(self, path: str, mode: int) -> None:
        if not os.access(self._p(path), mode):
            raise FuseOSError(errno.EACCES)

    def mkdir(self, path: str, mode: int) -> None:
        self._wait()
        os.mkdir(self._p(path), mode)

    def rmdir(self, path: str) -> None:
        self._wait()
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        self._wait()
        os.unlink(self._p(path))

    def rename(self, old: str, new: str) -> None:
        self._wait()
        os.rename(self._p(old), self._p(new))

    def link(self, target: str, name: str) -> None:
        self._wait()
        os.link(self._p(name), self._p(target))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._p(path), times)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        os.truncate(self._p(path), length)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._p(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._wait()
        return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def release(self, path: str, fh: int) -> None:
        self._wait()
        os.close(fh)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._p(path))
        return {k: getattr(st, k) for k in STATFS}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    root, mount, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    FUSE(Slow(root, delay), mount, foreground=True, nothreads=False)
