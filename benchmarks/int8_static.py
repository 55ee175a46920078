"""Static int8 for image models, measured: ducho-fast does not offer it (README, "Where the
targets stand"); this says what it would give, on generated JPEGs or on your own photos.

    python benchmarks/int8_static.py --n 256 --calibration 64 [--images FOLDER]

Each model (``visual.py``'s entries) is exported by ducho-fast in fp32, then quantized by ONNX
Runtime's ``quantize_static``: QDQ, int8 weights per output channel, uint8 activations, after
``quant_pre_process``, calibrated (``--method``: MinMax or Percentile) on the first
``--calibration`` images, decoded and resized as extract does. The other images are the test:
the cosine of each one's int8 features against the fp32 graph's (the least, which the int8
bound of ``precision`` is about, cosine >= 0.99; and the median), and both graphs' sessions
on the same batches (decoded beforehand), one batch at a time, rounds rotated.

``--images FOLDER``: JPEGs of your own (real photos), instead of N generated ones (sinusoids
and noise, ``visual.py``'s). The speed ratio depends on the CPU: int8 products are fast with
VNNI (AVX-512 VNNI, AVX-VNNI), and uint8 x int8 ones can saturate on AVX2 CPUs without it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_work_option, cosines, paired, report, rounds, work_folder
from visual import bare_batches, models, write_config, write_jpegs

METHODS = ("MinMax", "Percentile")


def quantized(
    fp32: Path, folder: Path, calibration: list[dict[str, np.ndarray]], method: str
) -> Path:
    """The fp32 graph quantized statically on the calibration feeds, as ``folder/int8.onnx``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    whole = folder / "fp32.onnx"  # one file: the pre-processing cannot follow external data
    onnx.save(onnx.load(str(fp32)), str(whole))
    prepared = folder / "fp32.pre.onnx"
    quant_pre_process(str(whole), str(prepared), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    out = folder / "int8.onnx"
    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[method],
    )
    return out


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(sess: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The first output of every batch, one row per image."""
    rows = [sess.run(None, f)[0] for f in feeds]
    return np.concatenate([r.reshape(len(r), -1) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="generated JPEGs (default 256)")
    parser.add_argument("--images", type=Path, help="a folder of your own JPEGs instead")
    parser.add_argument("--calibration", type=int, default=64, help="images (default 64)")
    parser.add_argument("--method", choices=METHODS, default="MinMax")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    add_work_option(parser)
    args = parser.parse_args()
    # torchvision's notes on tracing (train- vs eval-mode nodes), as `ducho-fast export` drops them
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")

    from ducho_fast import api
    from ducho_fast.artifact import find_artifact
    from ducho_fast.runtime.cpu import cpu_quota

    work = work_folder(args.work, "ducho-bench-int8-")
    if args.images is not None:
        (work / "images").symlink_to(args.images.resolve(), target_is_directory=True)
        paths = sorted(
            p for p in (work / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg")
        )
    else:
        paths = write_jpegs(work / "images", args.n, args.seed)
    if len(paths) <= args.calibration:
        sys.exit(f"{len(paths)} JPEGs: more than --calibration {args.calibration} are needed")
    threads = cpu_quota()
    test = paths[args.calibration :]
    print(
        f"{len(paths)} JPEGs ({args.calibration} to calibrate, {len(test)} to compare), "
        f"{args.method}, batch size {args.batch_size}, {threads} CPUs, in {work}"
    )
    rows: list[tuple[str, float, str]] = []
    summary: dict[str, Any] = {
        "benchmark": "int8_static",
        "images": len(paths),
        "calibration": args.calibration,
        "method": args.method,
        "generated": args.images is None,
        "rounds": args.repeats,
        "cpus": threads,
        "models": {},
    }
    ratios: dict[str, dict[str, float]] = {}
    specs = models(work)
    for name in args.models.split(","):
        config = write_config(work, name, specs[name]["entry"], args.batch_size)
        api.export(config)
        cfg = api.as_config(config)
        artifact = find_artifact(cfg.store, cfg.graphs()[0])
        calibration = bare_batches(artifact, paths[: args.calibration], 8)
        folder = work / f"int8_{name}"
        folder.mkdir(exist_ok=True)
        int8 = quantized(artifact.model_path, folder, calibration, args.method)
        feeds = bare_batches(artifact, test, args.batch_size)
        fp32_session, int8_session = session(artifact.model_path, threads), session(int8, threads)
        cos = cosines(outputs(int8_session, feeds), outputs(fp32_session, feeds))
        outputs(fp32_session, feeds[:1]), outputs(int8_session, feeds[:1])  # warm-up
        seconds, _ = rounds(
            args.repeats,
            {
                f"{name} fp32": partial(outputs, fp32_session, feeds),
                f"{name} int8": partial(outputs, int8_session, feeds),
            },
        )
        ratio = paired(seconds, f"{name} int8", f"{name} fp32")
        ratios[f"{name} int8 / fp32"] = ratio
        for system, times in seconds.items():
            rows.append((system, len(test) / float(np.median(times)), "session alone"))
        least, median = float(cos.min()), float(np.median(cos))
        print(f"{name}: int8 against fp32, cosine least {least:.5f}, median {median:.5f}")
        summary["models"][name] = {
            "min_cosine": round(least, 6),
            "median_cosine": round(median, 6),
            "meets_int8_bound": least >= 0.99,
            "int8_over_fp32": round(ratio["median"], 3),
        }
    report(rows, summary, ratios)


if __name__ == "__main__":
    main()
