"""``ducho-fast bench --source``: the source framework's model (PyTorch or Keras, loaded and
cut as export loads and cuts it) run eagerly on the batches the session runs, and compared
with it: items/s and the least cosine between their outputs."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ducho_fast.config import ModelSpec
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.embedder import Prepared


@dataclass(frozen=True)
class Source:
    """The source framework's model run eagerly on the session's batches: items/s (median
    round), extract's speed over it per round (median, range), and the least cosine between
    its outputs and the session's (the first output, every item of the last round)."""

    framework: str
    rate: float
    speedup: float
    speedup_range: tuple[float, float]
    min_cosine: float
    session_speedup: float = 0.0  # the session alone over the source, median round

    def as_dict(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "items_per_second": round(self.rate, 2),
            "extract_vs_source": round(self.speedup, 3),
            "extract_vs_source_range": [round(x, 3) for x in self.speedup_range],
            "session_vs_source": round(self.session_speedup, 3),
            "min_cosine": round(self.min_cosine, 6),
        }


@dataclass(frozen=True)
class Eager:
    """The source model's eager runs over the session's batches (their feeds, group by
    group), graph by graph, each returning the first output of every group."""

    framework: str
    steps: list[Callable[[dict[str, np.ndarray]], list[np.ndarray]]]
    batches: list[list[Prepared]]  # per graph

    def run(self) -> list[np.ndarray]:
        return [
            step(feeds)[0]
            for step, batches in zip(self.steps, self.batches, strict=True)
            for b in batches
            for _, feeds in b.parts
        ]

    def measured(
        self, seconds: dict[str, list[float]], outputs: list[np.ndarray], embedders: list[Any]
    ) -> Source:
        ours = [
            out[0]
            for embedder, batches in zip(embedders, self.batches, strict=True)
            for b in batches
            for _, out in embedder.launch(b).parts
        ]
        speedups = [s / e for e, s in zip(seconds["extract"], seconds["source"], strict=True)]
        model = [s / e for e, s in zip(seconds["session"], seconds["source"], strict=True)]
        count = sum(len(idx) for b in self.batches[0] for idx, _ in b.parts)
        return Source(
            framework=self.framework,
            rate=count / statistics.median(seconds["source"]),
            speedup=statistics.median(speedups),
            speedup_range=(min(speedups), max(speedups)),
            min_cosine=min(least_cosine(a, b) for a, b in zip(outputs, ours, strict=True)),
            session_speedup=statistics.median(model),
        )


def eager_source(specs: list[ModelSpec], batches: list[list[Prepared]]) -> Eager:
    """The source model's graphs, each loaded and cut as export loads and cuts it, run
    eagerly once on its first batch (untimed: the framework's first call sets itself up)."""
    from ducho_fast.exporters import exporter_for

    exporter = exporter_for(specs[0])
    steps = [exporter.eager(exporter.build(spec)) for spec in specs]
    for step, graph_batches in zip(steps, batches, strict=True):
        if graph_batches:
            step(graph_batches[0].parts[0][1])
    return Eager(exporter.eager_name, steps, batches)


def least_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine between the rows of two batches' outputs (each row flattened)."""
    x = np.asarray(a, np.float64).reshape(len(a), -1)
    y = np.asarray(b, np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.min(np.sum(x * y, axis=1) / np.maximum(norms, 1e-30)))


@contextmanager
def torch_threads(eager: bool) -> Iterator[None]:
    """Torch on the CPUs this process may use (as the sessions are), while the source runs."""
    try:
        import torch
    except ImportError:  # a Keras source, without the torch extra
        eager = False
    if not eager:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_quota())
    try:
        yield
    finally:
        torch.set_num_threads(before)
