"""The CPUs this process may really use: affinity mask and cgroup quota, not os.cpu_count()."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")
PROC = Path("/proc")


def cpu_quota() -> int:
    """Usable CPUs: the smaller of the affinity mask and the cgroup (v2 or v1) CPU quota."""
    return _usable(_affinity(), cgroup_cpu_limit())


def cpu_quota_report() -> str:
    """:func:`cpu_quota` and what it was found from (``ducho-fast doctor``)."""
    affinity, limit = _affinity(), cgroup_cpu_limit()
    quota = "no cgroup CPU quota" if limit is None else f"a cgroup quota of {limit:g} CPUs"
    return f"{_usable(affinity, limit)} (affinity mask {affinity} CPUs, {quota})"


def _usable(affinity: int, limit: float | None) -> int:
    count = affinity if limit is None else min(affinity, max(1, math.floor(limit)))
    return max(1, count)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> float | None:
    """The tightest CPU quota, in CPUs, of this process's cgroup and the cgroups above it;
    None where none is set (or there are no cgroups).

    ``membership`` (``/proc/self/cgroup``) names the process's cgroup in each hierarchy. In a
    container with its own cgroup namespace that is ``/``, the root of what is mounted at
    ``root``; on a host, a path below it (a systemd slice with ``CPUQuota=``, a batch job's
    cgroup), whose parents may hold a tighter quota. A path that is not under ``root`` (a
    container that sees the host's names but has its own cgroup mounted) reads ``root``'s.
    cgroup v2: ``cpu.max`` (``max`` or ``<quota> <period>``); v1: ``cpu.cfs_quota_us`` (-1:
    none) over ``cpu.cfs_period_us``, in the hierarchy of the ``cpu`` controller.
    """
    paths = memberships(membership)
    if (root / "cgroup.controllers").is_file() or (root / "cpu.max").is_file():
        return tightest(root, paths.get("", "/"), _v2_quota)
    for controllers in (("cpu",), ("cpu", "cpuacct"), ("cpuacct", "cpu")):
        base = root / ",".join(controllers)
        if base.is_dir():
            path = next((p for c, p in paths.items() if "cpu" in c.split(",")), "/")
            return tightest(base, path, _v1_quota)
    return None


def memberships(membership: Path) -> dict[str, str]:
    """``{controllers: path}`` from ``/proc/self/cgroup`` (``id:controllers:path`` lines; v2's
    controllers are empty)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return {}
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    return paths


def tightest(base: Path, path: str, quota: Callable[[Path], float | None]) -> float | None:
    """The smallest ``quota`` (a limit read from a cgroup folder; None: none) over
    ``base / path`` and its parents up to ``base``."""
    relative = Path(path.strip("/"))
    folder = base / relative
    if ".." in relative.parts or not folder.is_dir():
        folder = base
    depth = len(folder.relative_to(base).parts)
    limits = [quota(level) for level in (folder, *folder.parents[:depth])]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        if quota_us <= 0:
            return None
        return quota_us / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def family_cpu_time(proc: Path = PROC) -> float:
    """CPU seconds used by this process (every thread) and by its child processes: those
    still running (read from ``proc``; Linux) and those already waited for. A run's decoder
    processes (``runtime.readers: processes``) keep CPUs busy that this process's own clock
    does not count. Where ``proc`` cannot be read, the running children count nothing."""
    running = running_children_cpu_time(proc)  # first: one waited for meanwhile counts twice
    waited = os.times()  # rather than not at all (a rate too high adds no writer)
    return time.process_time() + waited.children_user + waited.children_system + running


def running_children_cpu_time(proc: Path = PROC) -> float:
    """CPU seconds used so far by this process's running (or not yet waited for) children:
    every thread's ``task/<tid>/children`` names those it started; each one's ``stat`` holds
    its user and system clock ticks. 0.0 where ``proc`` has no such files (not Linux, or a
    kernel without ``CONFIG_PROC_CHILDREN``). The kernel's lists may miss a child starting or
    ending as they are read: a look that finds the CPUs less busy than they were (at worst, a
    writer added that was not needed)."""
    try:
        threads = os.listdir(proc / "self" / "task")
    except OSError:
        return 0.0
    pids: set[str] = set()
    for tid in threads:
        try:
            pids.update((proc / "self" / "task" / tid / "children").read_text().split())
        except OSError:
            continue  # a thread that ended meanwhile
    ticks = 0
    for pid in pids:
        try:
            stat = (proc / pid / "stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; utime and
            # stime are the 14th and 15th fields, the 12th and 13th after comm's ")".
            after = stat[stat.rindex(")") + 2 :].split()
            ticks += int(after[11]) + int(after[12])
        except (OSError, ValueError, IndexError):
            continue  # it ended meanwhile (its time moves to the waited-for children's)
    return ticks / os.sysconf("SC_CLK_TCK") if ticks else 0.0
