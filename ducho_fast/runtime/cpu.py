"""The CPUs this process may really use: affinity mask and cgroup quota, not os.cpu_count()."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_quota() -> int:
    """Usable CPUs: the smaller of the affinity mask and the cgroup (v2 or v1) CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    limit = _cgroup_limit()
    if limit is not None:
        count = min(count, max(1, math.floor(limit)))
    return max(1, count)


def _cgroup_limit() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_file = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    period_file = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota_file.is_file() and period_file.is_file():
        quota_us = int(quota_file.read_text())
        if quota_us > 0:
            return quota_us / int(period_file.read_text())
    return None
