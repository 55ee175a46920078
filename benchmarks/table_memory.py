"""Peak memory of extract over a large text table, per row: one task of a job array, a plain
run, and the plain run that completes a job array.

    python benchmarks/table_memory.py --rows 100000,300000 --shards 8 --work /dev/shm/tm

For each size in ``--rows``, a generated interaction table (user, item and a review of 3-100
words of a small vocabulary, about 290 bytes a row; seed 0) is embedded with a random tiny BERT
(``capacity.py``'s, 1 layer of width 32: the model's own memory is small and the same at every
size), Ducho's layout only (no matrix), each system as its own ``ducho-fast extract`` process,
whose peak RSS is read from the kernel when it ends (``wait4``):

- ``shard``: ``--shard 0/K`` (``--shards``) into an empty folder;
- ``plain``: one process over the whole table, into an empty folder;
- ``final``: the same again over ``plain``'s folder, where every window is written already:
  what the plain run that completes a job array holds (it embeds nothing).

Printed: each peak, the process's own (a 1000-row table, ``shard`` and ``plain`` alike), and
for each system the growth from the smallest size to the largest in bytes a row: what each
further row costs, so about what a table of 100M rows would take on top. A single size gives
the bytes a row above the process's own instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_work_option, cpu_model, work_folder

SYSTEMS = ("shard", "plain", "final")
# fmt: off
WORDS = (
    "the", "a", "great", "product", "works", "well", "battery", "life", "quality", "price",
    "shipping", "fast", "slow", "broke", "returned", "love", "hate", "size", "fits", "small",
    "large", "color", "nice", "cheap", "value", "would", "buy", "again", "recommend",
)
# fmt: on


def write_table(path: Path, rows: int, seed: int) -> None:
    """``rows`` interactions: a 12-digit user, a 10-character item, a review of 3-100 words."""
    rng = random.Random(seed)
    with path.open("w") as f:
        f.write("user_id\titem_id\treview\n")
        for _ in range(rows):
            words = max(3, min(100, int(rng.lognormvariate(3.5, 0.8))))
            review = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(f"A{rng.randrange(10**12):012d}\tB0{rng.randrange(10**8):08d}\t{review}\n")


def write_config(work: Path, model: Path, table: str, output: str) -> Path:
    config = {
        "dataset_path": str(work),
        "store": str(work / "store"),
        "output": {"layouts": ["ducho"]},
        "textual": {
            "interactions": {
                "input_path": table,
                "interaction_columns": ["user_id", "item_id"],
                "text_column": "review",
                "output_path": output,
                "model": [
                    {"model_name": str(model), "output_layers": ["pooler_output"], "batch_size": 64}
                ],
            }
        },
    }
    path = work / f"{output}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def prepare(work: Path) -> Path:
    """The tiny BERT, made and exported in child processes: a child's peak RSS starts from
    its parent's (Linux keeps it across fork and exec), so this process never loads torch."""
    make = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from pathlib import Path; from capacity import tiny_bert; "
        f"print(tiny_bert(Path({str(work)!r}), 1, 32))"
    )
    made = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True)
    if made.returncode != 0:
        sys.exit(f"making the tiny BERT failed:\n{made.stderr}")
    model = Path(made.stdout.strip().splitlines()[-1])
    config = write_config(work, model, "none.tsv", "export")
    export = [sys.executable, "-m", "ducho_fast", "export", str(config)]
    exported = subprocess.run(export, capture_output=True, text=True)
    if exported.returncode != 0:
        sys.exit(f"{' '.join(export)} failed:\n{exported.stderr}")
    return model


def peak_rss(args: list[str]) -> int:
    """The peak RSS in bytes of ``ducho-fast extract ARGS``, run to its end (exit 0)."""
    command = [sys.executable, "-m", "ducho_fast", "extract", *args, "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{errors.decode(errors='replace')}")
    return int(usage.ru_maxrss) * 1024  # KiB on Linux


def run_size(work: Path, model: Path, rows: int, shards: int, seed: int) -> dict[str, int]:
    """Each system's peak RSS over a table of ``rows`` rows."""
    table = f"reviews-{rows}.tsv"
    write_table(work / table, rows, seed)
    peaks = {}
    for system in SYSTEMS:
        output = "plain" if system == "final" else system
        if system != "final":
            shutil.rmtree(work / output, ignore_errors=True)
        config = write_config(work, model, table, output)
        extra = ["--shard", f"0/{shards}"] if system == "shard" else []
        peaks[system] = peak_rss([str(config), *extra])
    for output in ("shard", "plain"):
        shutil.rmtree(work / output, ignore_errors=True)
    (work / table).unlink()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        default="100000,300000",
        help="table sizes, comma-separated (default 100000,300000)",
    )
    parser.add_argument("--shards", type=int, default=8, help="K of the shard task 0/K (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    add_work_option(parser)
    args = parser.parse_args()
    sizes = sorted({int(n) for n in args.rows.split(",")})
    if sizes[0] < 1 or args.shards < 2:
        sys.exit("--rows must be positive and --shards 2 or more")

    work = work_folder(args.work, "ducho-bench-table-memory-")
    model = prepare(work)
    base = run_size(work, model, 1000, args.shards, args.seed)
    own = max(base["shard"], base["plain"])
    peaks = {rows: run_size(work, model, rows, args.shards, args.seed) for rows in sizes}
    first, last = sizes[0], sizes[-1]
    per_row = {
        system: (
            (peaks[last][system] - peaks[first][system]) / (last - first)
            if last > first
            else (peaks[last][system] - own) / last
        )
        for system in SYSTEMS
    }
    print(f"the process's own: {own / 2**20:.0f} MiB (1000 rows)")
    for rows in sizes:
        said = ", ".join(f"{s} {peaks[rows][s] / 2**20:.0f} MiB" for s in SYSTEMS)
        print(f"{rows} rows: {said}")
    rows_said = f"from {first} to {last} rows" if last > first else "above the process's own"
    print(f"bytes a row ({rows_said}):")
    for system in SYSTEMS:
        at_scale = per_row[system] * 1e8 / 2**30
        print(f"  {system:<5}  {per_row[system]:6.0f}  ({at_scale:.1f} GiB at 100M rows)")
    print(f"on {cpu_model()}")
    summary = {
        "rows": sizes,
        "shards": args.shards,
        "own_bytes": own,
        "peak_bytes": {str(rows): peaks[rows] for rows in sizes},
        "bytes_per_row": {s: round(v) for s, v in per_row.items()},
        "cpu_model": cpu_model(),
    }
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
