"""``ducho-fast bench --vs KEY=VALUE``: extract with one setting changed, timed in the same
rounds as extract with the config as it is, and its features compared with those.

What is faster depends on the machine: reader threads or processes, how many decode workers,
batches at once, the batch size, reduced JPEG decoding, int8. A variant answers that on the
user's machine and data, side by side with the config's own run, and says whether the features
stay the same (bit for bit, or the least cosine between them where they do not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast import api
from ducho_fast.artifact import exported, find_artifact, slug_for
from ducho_fast.config import Config, ModelSpec
from ducho_fast.errors import ArtifactError, ConfigError


@dataclass(frozen=True)
class Variant:
    """Extract with ``setting`` on the same sample, in the same rounds: items/s (median
    round), its speed over extract as configured (per round: median, range), and how its
    features compare with the config's (those of each way's last round).

    A start-up that differs (decoder processes start with each run) weighs more in a sample
    than in the whole job: ``job_speedup`` is the speed over extract as configured for the
    job's items, what each way spends once (until its first batch ran, that batch's warm-up,
    and the last writes after the model's last batch) and the rest at its pace in the sample
    (per round: median, range). None where the engine does not time its first batch.
    """

    setting: str
    rate: float
    speedup: float
    speedup_range: tuple[float, float]
    identical: bool  # every feature the same array, bit for bit
    min_cosine: float | None  # the least cosine between the two ways' features of an item
    compared: int  # feature files compared (every one written by both ways)
    once: float | None = None  # seconds a run of it spends once (median round)
    job_speedup: float | None = None
    job_speedup_range: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "items_per_second": round(self.rate, 2),
            "vs_extract": round(self.speedup, 3),
            "vs_extract_range": [round(x, 3) for x in self.speedup_range],
            "identical": self.identical,
            "min_cosine": None if self.min_cosine is None else round(self.min_cosine, 6),
            "compared": self.compared,
            "once_seconds": None if self.once is None else round(self.once, 3),
            "vs_extract_whole_job": None
            if self.job_speedup is None
            else round(self.job_speedup, 3),
            "vs_extract_whole_job_range": (
                None
                if self.job_speedup_range is None
                else [round(x, 3) for x in self.job_speedup_range]
            ),
        }


def variant_configs(
    config: api.ConfigLike,
    overrides: Sequence[str],
    settings: Sequence[str],
    base: Config,
    name: str | None = None,
) -> list[tuple[str, Config]]:
    """Each setting applied over the config and its ``overrides``: the same jobs and models,
    run another way. Their models must be exported (a precision of their own included).
    ``name``: the file a mapping was read from, for errors."""
    if settings and isinstance(config, Config):
        raise ConfigError(
            "bench's variants (--vs) apply to a config's YAML file or mapping, not to a Config "
            "already resolved: pass the path or the mapping."
        )
    made = []
    for setting in dict.fromkeys(settings):  # one run of each, however often it is given
        if not isinstance(setting, str) or "=" not in setting:
            raise ConfigError(
                f"--vs {setting!r}: a variant is one KEY=VALUE, as --set takes, such as "
                "runtime.readers=processes or runtime.workers=8."
            )
        try:
            other = api.as_config(config, [*overrides, setting], name=name)
        except ConfigError as e:  # a bad key or value: say it came from this variant
            raise ConfigError(f"--vs {setting}: {e}") from e
        if _shape(other) != _shape(base):
            raise ConfigError(
                f"--vs {setting}: it changes the config's jobs or models; a variant runs the "
                "same models another way (runtime.*, input.*, a model's batch_size or "
                "precision)."
            )
        for graph in other.graphs():
            _exported(other, graph, setting, overrides)
        made.append((setting, other))
    return made


def _exported(other: Config, graph: ModelSpec, setting: str, overrides: Sequence[str]) -> None:
    """Check that a variant's graph is exported; where the setting makes it another artifact
    (a precision of its own) not exported yet, say how to export that one."""
    if not exported(other.store, graph):
        given = "".join(f" --set {o}" for o in overrides)
        raise ArtifactError(
            f"--vs {setting}: '{graph.key_path}' ({graph.model_name}) runs as another "
            f"artifact with it, not exported yet (no {other.store / slug_for(graph)}).\n"
            f"Hint: run `ducho-fast export CONFIG{given} --set {setting}` first; bench then "
            "times it beside the config's own artifact."
        )
    find_artifact(other.store, graph)  # one exported but not whole: says so, and how


def _shape(cfg: Config) -> list[tuple[str, int]]:
    return [(job.modality, len(job.models)) for job in cfg.jobs]


def compare_features(ours: Path, theirs: Path) -> tuple[bool, float | None, int]:
    """Whether the features under two output folders are the same arrays, the least cosine
    between an item's two features (flattened), and how many were compared: every ``.npy``
    both hold, by its path under each folder."""
    mine = {p.relative_to(ours) for p in ours.rglob("*.npy")}
    other = {p.relative_to(theirs) for p in theirs.rglob("*.npy")}
    common = sorted(mine & other)
    identical = bool(common) and mine == other
    least: float | None = None
    for rel in common:
        a, b = np.load(ours / rel), np.load(theirs / rel)
        same = a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        identical = identical and same
        if a.size == b.size:
            cosine = 1.0 if same else _cosine(a, b)
            least = cosine if least is None else min(least, cosine)
    return identical, least, len(common)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / norms) if norms > 0 else float(np.array_equal(x, y))
