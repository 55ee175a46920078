"""A config's paths made absolute, and why a path cannot be found, in words.

``Path.resolve`` raises RuntimeError on a loop of symbolic links (Python 3.12 and older; 3.13
returns the path unresolved), which would end a run with a traceback instead of naming the key.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ducho_fast.errors import ConfigError


def resolved(path: Path, name: str, key: str) -> Path:
    """``path`` made absolute, its links followed; a ConfigError naming ``key`` of config
    ``name`` where no file system could find it: a loop of links, a NUL character, a name
    too long (each would end a run in a traceback where the path is first used)."""
    if "\0" in str(path):
        raise ConfigError(
            f"{name}: key '{key}' holds a NUL character ('\\0'), which no path may hold; remove it."
        )
    try:
        full = path.resolve()
    except RuntimeError as e:
        raise ConfigError(
            f"{name}: key '{key}': {path} cannot be reached: a symbolic link on it leads round "
            f"in a loop ({e}). Fix or remove that link."
        ) from e
    except OSError as e:  # the working folder removed under a relative path, say
        raise ConfigError(
            f"{name}: key '{key}': {path} cannot be made absolute ({e.strerror or e}); check "
            "that the working folder still exists, or give an absolute path."
        ) from e
    if too_long(full):
        raise ConfigError(
            f"{name}: key '{key}': {path} is longer than its file system allows (a name over "
            "255 bytes, or a whole path of 4096 or more): shorten it."
        )
    return full


def working_folder() -> Path:
    """The working folder; a ConfigError where it was removed since the shell entered it
    (``Path.cwd`` raised FileNotFoundError, a traceback)."""
    try:
        return Path.cwd()
    except OSError as e:
        raise ConfigError(
            f"the working folder cannot be found ({e.strerror or e}): it was removed or moved "
            "after the shell entered it. Change to a folder that exists, then run again."
        ) from e


def no_path(path: str | os.PathLike[str]) -> bool:
    """Whether no file system takes ``path``: it holds a NUL, or is :func:`too_long` (a stat
    of it would raise ValueError or OSError)."""
    return "\0" in os.fspath(path) or too_long(path)


def too_long(path: str | os.PathLike[str]) -> bool:
    """Whether the file system refuses ``path`` for its length (a name, or the whole): past
    Linux's limits, which a path not yet made is checked against (the kernel stops at the
    first missing folder), or refused by the file system where the path exists."""
    raw = os.fsencode(path)
    parts = raw.replace(os.altsep.encode(), os.sep.encode()) if os.altsep else raw
    if len(raw) >= 4096 or any(len(part) > 255 for part in parts.split(os.sep.encode())):
        return True
    try:
        os.lstat(raw)
    except OSError as e:
        return e.errno == errno.ENAMETOOLONG
    return False


def absent(path: str | os.PathLike[str]) -> str:
    """Why ``path`` is not there, to follow its name in a message: 'does not exist', or that a
    symbolic link on it leads round in a loop, or that it is a link to a missing target."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "cannot be reached: a symbolic link on it leads round in a loop"
        if os.path.islink(path):
            return f"does not exist: it is a symbolic link to {os.readlink(path)}, which is missing"
    return "does not exist"
