"""The CPU time of this process and its children: what adaptive writers compare with the
quota (decoder processes keep CPUs busy that the process's own clock does not count)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ducho_fast.runtime.cpu import family_cpu_time, running_children_cpu_time

TICK = os.sysconf("SC_CLK_TCK")


def stat_line(pid: int, comm: str, utime: int, stime: int) -> str:
    """A ``/proc/<pid>/stat`` line: pid, (comm), then fields 3 to 20 with utime at 14 and
    stime at 15."""
    after = ["S", "1", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0"]
    after += [str(utime), str(stime), "7", "9", "20", "0", "1"]
    return f"{pid} ({comm}) " + " ".join(after) + "\n"


def fake_proc(tmp_path: Path, tasks: dict[str, str | None], stats: dict[str, str]) -> Path:
    proc = tmp_path / "proc"
    for tid, children in tasks.items():
        folder = proc / "self" / "task" / tid
        folder.mkdir(parents=True)
        if children is not None:
            (folder / "children").write_text(children)
    for pid, text in stats.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "stat").write_text(text)
    return proc


def test_running_children_are_counted_from_every_thread_and_once_each(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        # Two threads' children, one named by both (counted once), a thread without the file.
        {"100": "200 201 ", "101": "202 200", "102": None},
        {
            "200": stat_line(200, "python", 3 * TICK, TICK),
            "201": stat_line(201, "a (b) c", TICK, 2 * TICK),  # comm with spaces and parentheses
            "202": stat_line(202, "x", 0, 2 * TICK),
        },
    )
    assert running_children_cpu_time(proc) == pytest.approx(9.0)


def test_children_gone_or_unreadable_count_nothing(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        {"100": "200 201 202"},
        # 201 ended (no folder left), 202's line is cut short.
        {"200": stat_line(200, "python", TICK, TICK), "202": "202 (x) S 1 1\n"},
    )
    assert running_children_cpu_time(proc) == pytest.approx(2.0)
    assert running_children_cpu_time(tmp_path / "no-proc") == 0.0  # not Linux


def test_family_time_adds_the_running_children(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {"1": "5"}, {"5": stat_line(5, "w", 40 * TICK, 2 * TICK)})
    without = family_cpu_time(tmp_path / "no-proc")
    assert family_cpu_time(proc) - without == pytest.approx(42.0, abs=0.5)


BUSY = """
import sys, time
end = time.process_time() + 0.4
while time.process_time() < end:
    pass
sys.stdout.write("done\\n")
sys.stdout.flush()
sys.stdin.read()
"""


@pytest.mark.skipif(
    not glob.glob("/proc/self/task/*/children"), reason="needs Linux /proc children files"
)
def test_a_busy_child_counts_while_it_runs_and_after_it_ended() -> None:
    before, own_before = family_cpu_time(), time.process_time()
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        running = family_cpu_time() - before
        own = time.process_time() - own_before
        assert running >= own + 0.35  # the child's 0.4 s (ticks of 10 ms), besides our own
    finally:
        child.communicate("")
    assert family_cpu_time() - before >= running  # waited for: in os.times() now, not lost
