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
    """``path`` made absolute, its links followed; a loop of links a ConfigError naming ``key``
    of config ``name``."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:
        raise ConfigError(
            f"{name}: key '{key}': {path} cannot be reached: a symbolic link on it leads round "
            f"in a loop ({e}). Fix or remove that link."
        ) from e


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
