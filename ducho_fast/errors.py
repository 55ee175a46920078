"""One exception hierarchy for everything a user can get wrong.

Every message says what was wrong, where (file, key path, item id) and what to do next.
The CLI prints ``str(error)`` and exits with code 1; nothing else is caught.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ducho_fast.data.items import FileStamp


class DuchoError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(DuchoError):
    """A config file, key or value is wrong; raised before any work starts."""


class NotSupportedYet(ConfigError):
    """A Ducho feature that ducho-fast understands but does not run yet."""


class DataError(DuchoError):
    """Input data (a folder, a TSV, an item) cannot be read as configured."""


class UnreadableFile(DataError):
    """An input file that cannot be decoded for a reason that stays while the file and the
    decoding settings do: its content (not an image, truncated) or a limit it is over (too
    many pixels, too long). ``stamp`` (taken before reading) tells whether it changed."""

    def __init__(self, message: str, stamp: FileStamp) -> None:
        super().__init__(message)
        self.stamp = stamp

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.stamp)


def decode_error(message: str, error: BaseException, stamp: FileStamp | None) -> DataError:
    """The error for a file that did not decode: :class:`UnreadableFile` when its content is
    at fault, a plain DataError when the system failed to read it (an OSError with an errno:
    an I/O error of a disk or a network file system), which may pass on the next try."""
    system = isinstance(error, OSError) and error.errno is not None
    return DataError(message) if system else stamped(message, stamp)


def stamped(message: str, stamp: FileStamp | None) -> DataError:
    """:class:`UnreadableFile` for a file with a stamp, else a plain DataError."""
    return DataError(message) if stamp is None else UnreadableFile(message, stamp)


def unwritable_folder(folder: Path, error: OSError) -> OutputError:
    """The OutputError for an output folder that cannot be made or written: where a part of
    its path is a file ("Not a directory"), that file is named, not the disk's free space."""
    for part in (folder, *folder.parents):
        if os.path.lexists(part):
            if not part.is_dir():
                return OutputError(
                    f"cannot write to the output folder {folder}: {part} is a file, not a "
                    "folder. Give an output_path that is a folder (or not there yet), or move "
                    "that file."
                )
            break
    return OutputError(
        f"cannot write to the output folder {folder}: {error.strerror or error}. Check that "
        "it is writable and that the disk has space."
    )


class ExportError(DuchoError):
    """A model cannot be loaded, truncated or converted."""


class ParityError(ExportError):
    """The exported graph disagrees with the source framework beyond tolerance."""


class OutputError(DuchoError):
    """An output cannot be written (permissions, full disk); the run stops."""


class ArtifactError(DuchoError):
    """An artifact is missing, incomplete or does not match what the config asks for."""


class DeviceError(DuchoError):
    """The requested execution provider is not really available."""


class MissingExtraError(DuchoError):
    """An optional dependency is needed for this command."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed.\n"
            f"Hint: pip install 'ducho-fast[{extra}]'"
        )


# How the frameworks say that an allocation failed: torch's CPU allocator ("can't allocate
# memory") and CUDA ("out of memory"), ONNX Runtime ("Failed to allocate memory"; its arena,
# past ``runtime.memory_limit``: "Available memory of X is smaller than requested bytes of
# Y"), TensorFlow's ResourceExhaustedError ("OOM when allocating tensor"), C++.
NO_MEMORY = (
    "can't allocate memory",
    "out of memory",
    "failed to allocate memory",
    "smaller than requested bytes",
    "oom when allocating",
    "bad_alloc",
)


def memory_lines(error: BaseException) -> list[str]:
    """The lines of ``error``'s message that say an allocation failed; empty where none do."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return [line for line in lines if any(w in line.lower() for w in NO_MEMORY)]


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (a MemoryError, or a framework's
    error saying so)."""
    return isinstance(error, MemoryError) or bool(memory_lines(error))


# What ONNX Runtime says of an allocation, without the source file and function before it.
_ALLOCATION = re.compile(
    r"Available memory of \d+ is smaller than requested bytes of \d+|"
    r"Failed to allocate memory for requested buffer of size \d+"
)


def allocation_said(error: BaseException) -> str:
    """What ``error`` says of the allocation that failed, in one short line."""
    found = _ALLOCATION.search(str(error))
    if found:
        return found.group(0)
    lines = memory_lines(error) or [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip()[:200] if lines else ""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
