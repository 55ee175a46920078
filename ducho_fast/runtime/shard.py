"""``--shard i/N``: one task of a job array (Slurm, Kubernetes indexed jobs) does its part.

The unit of the split is the pipeline's window: a run reads a job's items in windows cut at
fixed positions of the id list (one batch of images or audio, several batches of texts, sorted
by length inside). Shard ``i`` of ``N`` takes windows ``i, i + N, i + 2N, …``. So the split is
a function of the id list and the batch size alone (every task computes the same one without
talking to the others), shards are disjoint and together complete, and every item is embedded
in the very batch a single run would have put it in: the files are byte-identical to one run's
(text models' outputs change in the last bits with the batch they share, so a split by id hash
would not be).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ducho_fast.errors import ConfigError

_FORM = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based, as Kubernetes' completion index) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _FORM.match(text)
        if match is None:
            raise ConfigError(
                f"--shard {text!r}: give INDEX/COUNT with a 0-based index, e.g. --shard 0/4 "
                "for the first of four tasks ($SLURM_ARRAY_TASK_ID/4 with --array=0-3, or "
                "$JOB_COMPLETION_INDEX/4 in a Kubernetes indexed job)."
            )
        index, count = int(match[1]), int(match[2])
        if count < 1:
            raise ConfigError(
                f"--shard {text!r}: COUNT, the number of tasks that share the work, must be 1 "
                "or more."
            )
        if not 0 <= index < count:
            raise ConfigError(
                f"--shard {text!r}: the index must be 0 to {max(count - 1, 0)} for {count} "
                "shard(s) (it is 0-based)."
            )
        return cls(index, count)

    def owns(self, window: int) -> bool:
        """Whether the ``window``-th window of a run belongs to this shard."""
        return window % self.count == self.index

    def size(self, total: int, window: int) -> int:
        """How many of ``total`` items, read in windows of ``window``, this shard embeds."""
        starts = range(0, total, window)
        return sum(min(window, total - s) for w, s in enumerate(starts) if self.owns(w))

    @property
    def tag(self) -> str:
        """``shard-0-of-4``, for file names."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
