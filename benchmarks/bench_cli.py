"""``ducho-fast bench`` itself, on generated JPEGs: the command a user runs on a config, on a
device, with the settings to compare.

    python benchmarks/bench_cli.py --device cuda --n 4096 --vs runtime.readers=processes

Writes ``visual.py``'s N JPEGs (seed ``--seed``) and a config for each of ``--models``
(EfficientNet-Lite0's real weights, ResNet50 with random weights; 224 x 224, batches of
``--batch-size``) on ``--device``, exports them, and runs the real command, ``ducho-fast bench
CONFIG --items N --repeats R --json`` plus each ``--vs KEY=VALUE``, in a subprocess: extract
end to end against the session alone on the same batches (the pipeline's efficiency), and
extract with each setting changed, its features compared with extract's. What it prints is
the command's own report; its last line, the command's JSON line (one run per model). This
is how the GPU suite runs ``bench`` on a GPU (``benchmarks/gpu_suite.sh``, step ``bench``).

A job larger than bench's sample, and what bench says of it against what it takes:

    python benchmarks/bench_cli.py --device cuda --n 2048 --links 3 --items 2048 \
        --vs runtime.readers=processes --whole-job

``--links L`` puts L links to each JPEG beside it under other names (a job of N x (L + 1)
items, each read as its original), ``--items K`` makes bench's sample the job's first K, and
``--whole-job`` then runs extract over the whole job once per way (the config as it is, then
each ``--vs``), ``--repeats`` rounds in rotated order, each into a new folder, and prints each
way's items/s and its ratio to the config's (per round: median, range): what bench's "over the
job's N items" figure estimates from the sample. One more JSON line, ``whole_job``.

``--models minilm`` benches all-MiniLM-L6-v2 (fp32, the offline package) on ``text.py``'s N
generated product descriptions instead (``--links`` applies to the JPEGs only):

    python benchmarks/bench_cli.py --device cuda --models minilm --n 16384 --items 4096 \
        --vs runtime.spin_wait=on
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    NewFolders,
    add_device_option,
    add_work_option,
    check_device,
    median_rates,
    paired,
    ratio_summary,
    rounds,
    work_folder,
)
from text import descriptions, minilm_folder, write_descriptions
from text import write_config as text_config
from visual import models, write_config, write_jpegs

MODELS = ("efficientnet_lite0", "resnet50", "minilm")
TEXT = "minilm"  # the text model: the job is N descriptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=512, help="JPEGs (default 512)")
    parser.add_argument("--items", type=int, default=0, help="bench's sample (default: the job)")
    parser.add_argument(
        "--links", type=int, default=0, help="links to each JPEG beside it (default 0)"
    )
    parser.add_argument(
        "--whole-job", action="store_true", help="then extract the whole job once per way"
    )
    parser.add_argument("--models", default="efficientnet_lite0", help=f"of {','.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="bench's rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vs", action="append", default=[], help="KEY=VALUE, as bench takes it (repeatable)"
    )
    add_device_option(parser)
    add_work_option(parser)
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        sys.exit(f"--models: choose among {', '.join(MODELS)} (got {args.models!r})")
    check_device(args.device)

    from ducho_fast import api

    work = work_folder(args.work, "ducho-bench-cli-")
    images = [name for name in names if name != TEXT]
    if images:
        paths = write_jpegs(work / "images", args.n, args.seed)
        for path in paths:
            for k in range(1, args.links + 1):
                path.with_name(f"{path.stem}_{k}{path.suffix}").symlink_to(path.name)
        entries = models(work)
    if TEXT in names:
        write_descriptions(work, descriptions(args.n, args.seed))
    command = [sys.executable, "-m", "ducho_fast", "bench"]
    for name in names:
        if name == TEXT:
            job = args.n
            config = text_config(work, minilm_folder(work), "fp32", args.batch_size, args.device)
        else:
            job = args.n * (args.links + 1)
            config = write_config(
                work, name, entries[name]["entry"], args.batch_size, device=args.device
            )
        api.export(config)
        items = str(args.items or job)
        bench = [*command, str(config), "--items", items, "--repeats", str(args.repeats)]
        bench += [f"--vs={v}" for v in args.vs] + ["--json"]
        print("$ ducho-fast", " ".join(bench[3:]), flush=True)
        done = subprocess.run(bench, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
        if done.returncode:
            sys.exit(f"ducho-fast bench exited with {done.returncode} on {name}")
        if args.whole_job:
            whole_job(api.extract, config, name, args.vs, args.repeats, job)


def whole_job(extract: Any, config: Path, name: str, vs: list[str], repeats: int, job: int) -> None:
    """Extract over the whole job once per way a round, each into a new folder."""
    key = f"{'textual' if name == TEXT else 'visual'}.items.output_path"
    ways: dict[str, Callable[[], Any]] = {"extract": NewFolders(extract, config, key, "whole")}
    for setting in vs:
        new = NewFolders(lambda c, o, s=setting: extract(c, [s, *o]), config, key, "whole")
        ways[f"extract {setting}"] = new
    print(f"whole job: {job} items, extract once per way, {repeats} round(s)", flush=True)
    seconds, _ = rounds(repeats, ways)
    rates = median_rates(job, seconds)
    ratios = {
        f"{way} vs extract": paired(seconds, way, "extract") for way in ways if way != "extract"
    }
    for way, rate in rates.items():
        print(f"  {way:40s} {rate:8.1f} items/s", flush=True)
    for way, r in ratios.items():
        print(f"  {way:40s} {r['median']:.2f}x (rounds {r['min']:.2f}-{r['max']:.2f})")
    line = {"whole_job": name, "items": job, "items_per_second": rates, **ratio_summary(ratios)}
    print(json.dumps(line, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
