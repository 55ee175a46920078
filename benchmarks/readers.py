"""Readers: decoding in threads vs in processes, the choice the pipeline makes.

    python benchmarks/readers.py --n 256

N generated JPEGs (240 to 1200 px, as benchmarks/visual.py) read, decoded, converted and
resized to 224 x 224 by the pipeline's own image loader, with one worker per usable CPU:
- ``serial``: one thread, the reference;
- ``threads``: a ThreadPoolExecutor, as the pipeline's readers;
- ``processes``: a ProcessPoolExecutor (already started: its start-up is not counted), the
  decoded arrays sent back to the parent as a pipeline's would be.
Both pools map in input order, best of ``--repeats``; arrays are checked equal to serial's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_rates, paired, ratio_summary, report, rounds, work_folder
from visual import write_jpegs

PRE = {"resize": [224, 224], "interpolation": "bicubic"}


def load(path: Path) -> np.ndarray:
    from ducho_fast.config.model import InputOptions
    from ducho_fast.data.items import Item
    from ducho_fast.data.sources import ImageLoader

    return ImageLoader(PRE, InputOptions())(Item(path.stem, str(path), path))


def mapped(pool: Executor, paths: list[Path], chunksize: int) -> Callable[[], list[Any]]:
    return lambda: list(pool.map(load, paths, chunksize=chunksize))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="images (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder, kept (default: a temp one, removed)"
    )
    args = parser.parse_args()

    from ducho_fast.runtime.cpu import cpu_quota

    work = work_folder(args.work, "ducho-bench-readers-")
    paths = write_jpegs(work / "images", args.n, args.seed)
    workers = cpu_quota()
    print(f"{args.n} JPEGs to 224 x 224, {workers} workers, in {work}")
    reference = [load(p) for p in paths]  # warm-up: page cache
    with ThreadPoolExecutor(workers) as threads, ProcessPoolExecutor(workers) as processes:
        list(processes.map(load, paths[:workers]))  # start the workers, import everything
        seconds, values = rounds(
            args.repeats,
            {
                "serial": lambda: [load(p) for p in paths],
                "threads": mapped(threads, paths, 1),
                "processes": mapped(processes, paths, 4),
            },
        )
    agree = all(
        np.array_equal(a, b)
        for name in ("threads", "processes")
        for a, b in zip(values[name], reference, strict=True)
    )
    rates = median_rates(args.n, seconds)
    pairs = {
        "threads_vs_serial": ("threads", "serial"),
        "processes_vs_serial": ("processes", "serial"),
        "threads_vs_processes": ("threads", "processes"),
    }
    ratios = {k: paired(seconds, *pair) for k, pair in pairs.items()}
    report(
        [(k, v, "") for k, v in rates.items()],
        {
            "benchmark": "readers",
            "n": args.n,
            "workers": workers,
            "rounds": args.repeats,
            "items_per_second": {k: round(v, 1) for k, v in rates.items()},
            **ratio_summary(ratios),
            "outputs_agree": agree,
        },
        ratios,
    )
    if not agree:
        sys.exit("decoded arrays differ")


if __name__ == "__main__":
    main()
