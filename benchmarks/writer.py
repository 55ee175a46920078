"""The per-item writer: unnamed files linked in vs named temporaries renamed.

    python benchmarks/writer.py --n 4096 [--dim 384] [--work /some/disk/folder]

extract saves one ``.npy`` file per item and layer, on the writer thread, whose CPU time is
taken from the model's (on a GPU, the writer bounds the items/s). Both ways ducho-fast can save
a feature, N features of ``--dim`` float32 values each (MiniLM's 384 by default) into a new,
empty folder per round (deleting thousands of files makes creating files dearer for a while
on some disks, see ``common.NewFolders``), with the writer's own class
(``ducho_fast.outputs.atomic.NpyFiles``):
- ``unnamed``: what extract does on Linux: each file written unnamed (``O_TMPFILE``) and
  linked in under its name when complete: one change to the folder;
- ``named``: what it does where the file system has no unnamed files: a named temporary
  written, then renamed: two changes to the folder.
Files/s are medians over ``--repeats`` rounds (rounds alternate the order); the ratio is taken
within each round. CPU milliseconds per file are this thread's (the kernel's work for it
included). Every file of the last rounds is checked to hold what np.save writes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_work_option, median_rates, paired, ratio_summary, report, rounds, work_folder


def file_system(folder: Path) -> str:
    """The type of the file system holding ``folder`` (Linux's /proc/mounts), or "unknown"."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(folder.resolve())
    found = ("", "unknown")
    for fields in mounts:
        point = fields[1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(found[0]):
            found = (point, fields[2])
    return found[1]


class Saves:
    """Saves ``n`` features into a new folder under ``root`` on every call, with ``files``;
    keeps the CPU seconds of each call and the last folder."""

    def __init__(self, root: Path, name: str, unnamed: bool, features: np.ndarray) -> None:
        from ducho_fast.outputs.atomic import NpyFiles

        self._root, self._name, self._features = root, name, features
        self._files = NpyFiles(unnamed=unnamed)
        self.cpu: list[float] = []
        self.last: Path | None = None

    def __call__(self) -> None:
        folder = self._root / f"{self._name}_{len(self.cpu)}"
        folder.mkdir(parents=True)
        paths = [os.path.join(folder, f"{i}.npy") for i in range(len(self._features))]
        began = time.thread_time()
        for path, feature in zip(paths, self._features, strict=True):
            self._files.save(Path(path), feature)
        self.cpu.append(time.thread_time() - began)
        self.last = folder


def hold_np_save_bytes(folder: Path, features: np.ndarray) -> bool:
    for i, feature in enumerate(features):
        buffer = io.BytesIO()
        np.save(buffer, feature, allow_pickle=False)
        if (folder / f"{i}.npy").read_bytes() != buffer.getvalue():
            return False
    return len(list(folder.iterdir())) == len(features)  # no temporaries left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="files per round (default 4096)")
    parser.add_argument("--dim", type=int, default=384, help="float32 values per feature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=6, help="rounds (default 6)")
    add_work_option(parser)
    args = parser.parse_args()

    from ducho_fast.outputs.atomic import NpyFiles

    work = work_folder(args.work, "ducho-bench-writer-")
    rng = np.random.default_rng(args.seed)
    features = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    system = file_system(work)
    print(f"{args.n} features of {args.dim} float32 per round, in {work} ({system})")
    probe = NpyFiles()
    probe.save(work / "probe.npy", features[0])  # does this file system take unnamed files?
    unnamed_here = probe.unnamed_in(work)
    if not unnamed_here:
        print("this file system takes no unnamed files: both systems write named temporaries")
    saves = {
        "unnamed": Saves(work / "rounds", "unnamed", True, features),
        "named": Saves(work / "rounds", "named", False, features),
    }
    systems: dict[str, Callable[[], None]] = dict(saves)
    seconds, _ = rounds(args.repeats, systems)
    agree = all(s.last is not None and hold_np_save_bytes(s.last, features) for s in saves.values())
    rates = median_rates(args.n, seconds)
    ratios = {"unnamed_vs_named": paired(seconds, "unnamed", "named")}
    cpu_ms = {k: float(np.median(s.cpu)) / args.n * 1e3 for k, s in saves.items()}
    cpu_ratios = [n / u for u, n in zip(saves["unnamed"].cpu, saves["named"].cpu, strict=True)]
    report(
        [(k, v, f"({cpu_ms[k]:.4f} ms of CPU per file)") for k, v in rates.items()],
        {
            "benchmark": "writer",
            "n": args.n,
            "dim": args.dim,
            "rounds": args.repeats,
            "file_system": system,
            "unnamed_files_here": unnamed_here,
            "items_per_second": {k: round(v, 1) for k, v in rates.items()},
            "cpu_ms_per_file": {k: round(v, 4) for k, v in cpu_ms.items()},
            "cpu_ratio_named_over_unnamed": round(float(np.median(cpu_ratios)), 3),
            **ratio_summary(ratios),
            "outputs_agree": agree,
        },
        ratios,
    )
    if not agree:
        sys.exit("the files differ from what np.save writes")


if __name__ == "__main__":
    main()
