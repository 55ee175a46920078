"""What the benchmarks share: the FLOP limit of this machine, timing, the final JSON line."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matrix-product rate of numpy's BLAS here: the machine's FLOP limit."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of ``repeats`` timed runs, and the last run's value."""
    best, value = float("inf"), None
    for _ in range(max(1, repeats)):
        seconds, value = timed(fn)
        best = min(best, seconds)
    return best, value


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)


def report(rows: list[tuple[str, float, str]], summary: dict[str, Any]) -> None:
    """A human table, then one JSON line (the last line of output) with every figure."""
    width = max(len(r[0]) for r in rows)
    for name, rate, note in rows:
        print(f"  {name:<{width}}  {rate:8.1f} items/s  {note}")
    print(json.dumps(summary, sort_keys=True))


def npy_files(folder: Path) -> dict[str, bytes]:
    """Every .npy file under ``folder`` by relative path: to check runs wrote the same bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}
