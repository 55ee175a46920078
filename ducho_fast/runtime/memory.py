"""The memory ONNX Runtime may take for a model's activations on the CPU
(``runtime.memory_limit``).

A batch too big for the machine's memory was ended by the kernel's OOM killer, without a word:
EfficientNet-Lite0 took 6.3 GB of RSS for one batch of 600 images here (about 10 MB an image,
nearly all activations), so ``batch_size: 2048`` asked for 20 GB. Under a limit, ONNX
Runtime's CPU arena refuses the allocation instead, with an error; the batch then runs in
halves (:func:`run_fitting`) and the run says which batch size fits.

The limit is that of the arena which the CPU sessions ducho-fast makes share (ONNX Runtime's
environment allocator, session option ``session.use_env_allocators``). It holds the
activations: the weights were allocated outside it (EfficientNet-Lite0's session was made
under a 1 MB limit, and ran one image under a 20 MB one). The readers' decoded batches are
outside it too, hence the margin ``auto`` leaves. CUDA sessions keep ONNX Runtime's own
arenas (``runtime.cuda_options.gpu_mem_limit`` limits the device's).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import onnxruntime as ort

from ducho_fast.config.options import limit_value
from ducho_fast.errors import DuchoError, out_of_memory
from ducho_fast.runtime.cpu import CGROUP_ROOT, MEMBERSHIP, memberships, tightest

MEMINFO = Path("/proc/meminfo")

# ``auto``: this share of the memory available when the process makes its first CPU session,
# and never less than AUTO_FLOOR (a machine with less left would fail any batch).
AUTO_SHARE = 0.75
AUTO_FLOOR = 256 * 2**20


def available_memory(
    meminfo: Path = MEMINFO, root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP
) -> int | None:
    """Bytes this process could still take: the system's ``MemAvailable``, or less where its
    cgroup or one above it (a container's limit, a batch job's) has less left before its
    limit (v2: ``memory.max`` less ``memory.current``; v1: ``memory.limit_in_bytes`` less
    ``memory.usage_in_bytes``). The usage counts the page cache of files the cgroup read,
    which the kernel takes back before it fails an allocation: the inactive part of it
    (``memory.stat``'s ``inactive_file``, v1's ``total_inactive_file``) counts as free, as
    Kubernetes' working set does. Without that, a pod that had read its images would find
    its memory near full. None where neither is known (not Linux)."""
    system = _mem_available(meminfo)
    left = _cgroup_left(root, membership)
    known = [b for b in (system, left) if b is not None]
    return min(known) if known else None


def _mem_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemAvailable":
                return int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left(root: Path, membership: Path) -> int | None:
    paths = memberships(membership)
    if (root / "cgroup.controllers").is_file() or (root / "memory.max").is_file():
        left = tightest(root, paths.get("", "/"), _v2_left)
    elif (root / "memory").is_dir():
        path = next((p for c, p in paths.items() if "memory" in c.split(",")), "/")
        left = tightest(root / "memory", path, _v1_left)
    else:
        return None
    return None if left is None else max(0, int(left))


def _v2_left(folder: Path) -> float | None:
    return _left(folder, "memory.max", "memory.current", "inactive_file")


def _v1_left(folder: Path) -> float | None:
    return _left(folder, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _left(folder: Path, limit_name: str, usage_name: str, cache_key: str) -> float | None:
    try:
        limit = (folder / limit_name).read_text().strip()
        if limit == "max" or int(limit) >= 2**60:  # v1's "no limit" is a huge number
            return None
        usage = int((folder / usage_name).read_text())
    except (OSError, ValueError):
        return None
    return int(limit) - max(0, usage - _stat(folder / "memory.stat", cache_key))


def _stat(path: Path, key: str) -> int:
    """One counter of a cgroup's ``memory.stat`` (``key value`` lines); 0 where absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return 0
    return 0


_LOCK = threading.Lock()
_AUTO: list[int | None] = []  # ``auto``'s bytes, once worked out (empty: not yet)
_REGISTERED: list[int] = []  # the limit of the arena registered now (empty: none)


def arena_limit(value: Any) -> int | None:
    """The bytes ``runtime.memory_limit`` allows (``auto`` worked out once per process, when
    its first CPU session is made); None: no limit."""
    checked = limit_value(value, "runtime options")
    if checked != "auto":
        return None if checked is None else int(checked)
    with _LOCK:
        if not _AUTO:
            available = available_memory()
            _AUTO.append(None if available is None else auto_limit(available))
        return _AUTO[0]


def auto_limit(available: int) -> int:
    return max(AUTO_FLOOR, int(available * AUTO_SHARE))


def use_limited_arena(value: Any) -> int | None:
    """Register ONNX Runtime's shared CPU arena with the limit ``value`` allows, unless one
    with that limit is registered already; the limit, or None where there is none (sessions
    then keep ONNX Runtime's own arenas). Sessions made before keep the arena they had."""
    limit = arena_limit(value)
    if limit is None:
        return None
    with _LOCK:
        if [limit] != _REGISTERED:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            # max_mem, then -1 for ONNX Runtime's defaults of the extend strategy, the first
            # chunk and the dead bytes per chunk.
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(limit, -1, -1, -1))
            _REGISTERED[:] = [limit]
    return limit


def size_text(size: int) -> str:
    """Bytes in GiB (or MiB under one GiB), as the README's config reference gives them."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.0f} MiB"


def within_limit(limit: int | None, otherwise: str) -> str:
    """Where an allocation failed, in a message: within the limit of that many bytes, or
    ``otherwise`` where there was none."""
    return f"within runtime.memory_limit ({size_text(limit)})" if limit else otherwise


def memory_report() -> str:
    """:func:`available_memory` and ``auto``'s limit from it (``ducho-fast doctor``)."""
    available = available_memory()
    if available is None:
        return "unknown (no /proc/meminfo): runtime.memory_limit auto sets no limit"
    return (
        f"{size_text(available)} now (the system's and its cgroups' least); runtime."
        f"memory_limit auto: {size_text(auto_limit(available))} for the model's activations"
    )


@dataclass
class MemorySplits:
    """What batch sizes of one model ran out of memory (:func:`run_fitting`)."""

    too_big: int = sys.maxsize  # the fewest items of a batch that ran out of memory
    largest_part: int = 0  # the most items of a batch that ran since, below too_big
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def any(self) -> bool:
        return self.too_big != sys.maxsize

    def fits(self, size: int) -> bool:
        """Whether a batch of ``size`` items is worth trying whole."""
        return size < 2 or size < self.too_big

    def failed(self, size: int) -> bool:
        """Note that a batch of ``size`` items ran out of memory; whether it is the first."""
        with self.lock:
            first = not self.any
            self.too_big = min(self.too_big, size)
            return first

    def ran(self, size: int) -> None:
        """Note that a batch of ``size`` items ran (counted once one has run out of memory)."""
        if self.any:
            with self.lock:
                if size < self.too_big:
                    self.largest_part = max(self.largest_part, size)


T = TypeVar("T")


def run_fitting(
    run: Callable[[Sequence[Any]], list[T]],
    payloads: Sequence[Any],
    splits: MemorySplits,
    say: Callable[[int, BaseException], None],
) -> list[T]:
    """``run(payloads)``, in halves where a batch of two items or more runs out of memory,
    and in halves of those where they do too; a batch as big as one that did goes to halves
    without being tried (``splits`` records the sizes). ``say`` is told of the first batch
    that runs out of memory: its size and the error. Other errors are raised."""
    if splits.fits(len(payloads)):
        try:
            outputs = run(payloads)
        except DuchoError:
            raise
        except Exception as e:
            if len(payloads) < 2 or not out_of_memory(e):
                raise
            if splits.failed(len(payloads)):
                say(len(payloads), e)
        else:
            splits.ran(len(payloads))
            return outputs
    parts = fitting_parts(payloads, splits)
    return [out for part in parts for out in run_fitting(run, part, splits, say)]


def fitting_parts(payloads: Sequence[Any], splits: MemorySplits) -> list[Sequence[Any]]:
    """``payloads`` cut as :func:`run_fitting` cuts a batch that is too big by now: in
    halves, and halves of those, until each part fits."""
    if splits.fits(len(payloads)):
        return [payloads]
    half = (len(payloads) + 1) // 2
    return fitting_parts(payloads[:half], splits) + fitting_parts(payloads[half:], splits)
