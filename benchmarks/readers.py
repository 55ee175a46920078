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
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, report
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
    parser.add_argument("--repeats", type=int, default=3, help="best of (default 3)")
    parser.add_argument("--work", type=Path, default=None, help="folder (default: a temp one)")
    args = parser.parse_args()

    from ducho_fast.runtime.cpu import cpu_quota

    work = args.work or Path(tempfile.mkdtemp(prefix="ducho-bench-readers-"))
    paths = write_jpegs(work / "images", args.n, args.seed)
    workers = cpu_quota()
    print(f"{args.n} JPEGs to 224 x 224, {workers} workers, in {work}")
    reference = [load(p) for p in paths]  # warm-up: page cache
    rates: dict[str, float] = {}
    seconds, _ = best_of(args.repeats, lambda: [load(p) for p in paths])
    rates["serial"] = args.n / seconds
    agree = True
    with ThreadPoolExecutor(workers) as threads, ProcessPoolExecutor(workers) as processes:
        list(processes.map(load, paths[:workers]))  # start the workers, import everything
        for name, pool, chunk in (("threads", threads, 1), ("processes", processes, 4)):
            seconds, arrays = best_of(args.repeats, mapped(pool, paths, chunk))
            rates[name] = args.n / seconds
            agree &= all(np.array_equal(a, b) for a, b in zip(arrays, reference, strict=True))
    report(
        [(k, v, "") for k, v in rates.items()],
        {
            "benchmark": "readers",
            "n": args.n,
            "workers": workers,
            "items_per_second": {k: round(v, 1) for k, v in rates.items()},
            "ratios": {
                "threads_vs_serial": round(rates["threads"] / rates["serial"], 3),
                "processes_vs_serial": round(rates["processes"] / rates["serial"], 3),
                "threads_vs_processes": round(rates["threads"] / rates["processes"], 3),
            },
            "outputs_agree": agree,
        },
    )
    if not agree:
        sys.exit("decoded arrays differ")


if __name__ == "__main__":
    main()
