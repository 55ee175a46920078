"""Readers: decoding in threads vs in processes, the choice the pipeline makes.

    python benchmarks/readers.py --n 256 [--workers 16]

N generated JPEGs (240 to 1200 px, as benchmarks/visual.py) read, decoded, converted and
resized to 224 x 224 by the pipeline's own image loader, with ``--workers`` workers (default:
one per usable CPU):
- ``serial``: one thread, the reference;
- ``threads``: a ThreadPoolExecutor, as the pipeline's readers with ``runtime.readers:
  threads``;
- ``processes``: the pipeline's decoder processes (``runtime.readers: processes``,
  ducho_fast.runtime.decoders.DecoderPool; already started: its start-up is not counted), the
  decoded arrays sent back to this process as the pipeline gets them.
Both map in input order, in the tasks the pipeline would cut a window of N items into;
items/s are medians over ``--repeats`` rounds; arrays are checked equal to serial's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_work_option, median_rates, paired, ratio_summary, report, rounds, work_folder
from visual import write_jpegs

PRE = {"resize": [224, 224], "interpolation": "bicubic"}


def loader() -> Any:
    from ducho_fast.config.model import InputOptions
    from ducho_fast.data.sources import ImageLoader

    return ImageLoader(PRE, InputOptions())


def item(path: Path) -> Any:
    from ducho_fast.data.items import Item

    return Item(path.stem, str(path), path)


def load(path: Path) -> np.ndarray:
    return loader()(item(path))


def decoded(pool: Any, paths: list[Path], per_task: int) -> Callable[[], list[Any]]:
    """The pipeline's decoder processes on ``paths``: each image's array."""
    images = loader()
    pairs = [([images], item(p)) for p in paths]
    return lambda: [each[0] for each in pool.map(pairs, per_task)]


def mapped(pool: Executor, paths: list[Path], chunksize: int) -> Callable[[], list[Any]]:
    return lambda: list(pool.map(load, paths, chunksize=chunksize))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="images (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--workers", type=int, default=0, help="0: one per usable CPU")
    add_work_option(parser)
    args = parser.parse_args()

    from ducho_fast.runtime.cpu import cpu_quota
    from ducho_fast.runtime.decoders import DecoderPool
    from ducho_fast.runtime.pipeline import slice_size

    work = work_folder(args.work, "ducho-bench-readers-")
    paths = write_jpegs(work / "images", args.n, args.seed)
    workers = args.workers or cpu_quota()
    print(f"{args.n} JPEGs to 224 x 224, {workers} workers, in {work}")
    reference = [load(p) for p in paths]  # warm-up: page cache
    per_task = slice_size(args.n, workers)
    with ThreadPoolExecutor(workers) as threads, DecoderPool(workers) as processes:
        seconds, values = rounds(
            args.repeats,
            {
                "serial": lambda: [load(p) for p in paths],
                "threads": mapped(threads, paths, per_task),
                "processes": decoded(processes, paths, per_task),
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
