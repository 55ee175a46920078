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
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_option, add_work_option, check_device, work_folder
from visual import models, write_config, write_jpegs

MODELS = ("efficientnet_lite0", "resnet50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=512, help="JPEGs, all timed (default 512)")
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
    write_jpegs(work / "images", args.n, args.seed)
    entries = models(work)
    command = [sys.executable, "-m", "ducho_fast", "bench"]
    for name in names:
        config = write_config(
            work, name, entries[name]["entry"], args.batch_size, device=args.device
        )
        api.export(config)
        bench = [*command, str(config), "--items", str(args.n), "--repeats", str(args.repeats)]
        bench += [f"--vs={v}" for v in args.vs] + ["--json"]
        print("$ ducho-fast", " ".join(bench[3:]), flush=True)
        done = subprocess.run(bench, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
        if done.returncode:
            sys.exit(f"ducho-fast bench exited with {done.returncode} on {name}")


if __name__ == "__main__":
    main()
