"""What every framework adapter shares: the export flow, ONNX conversion and the parity check.

An adapter (``pt.py``, ``hf.py``, ``st.py``) only says how to build the truncated model as a
torch module with uint8/int64 inputs, how the source framework computes the reference for one
item, and what to write into the manifest. Everything else lives here, once.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast import __version__
from ducho_fast.artifact import (
    MODEL_FILE,
    SCHEMA_VERSION,
    Artifact,
    exporting,
    graph_key,
    load_artifact,
    new_build_dir,
    slug_for,
    write_artifact,
)
from ducho_fast.config.model import ModelSpec, RuntimeOptions
from ducho_fast.errors import (
    ArtifactError,
    DuchoError,
    ExportError,
    ParityError,
    memory_lines,
    out_of_memory,
)
from ducho_fast.exporters.compat import import_torch
from ducho_fast.exporters.graphs import load_graph, save_graph, scratch
from ducho_fast.exporters.precision import MIN_COSINE, apply_precision
from ducho_fast.runtime.embedder import Embedder

OPSET = 17
REL_DIFF_BOUND = 1e-4  # fp32 only; reduced precisions are bounded by cosine alone


@dataclass
class Built:
    """A truncated model ready for conversion, and what the manifest says about it."""

    module: Any
    example: tuple[Any, ...]
    input_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    outputs: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    preprocessing: dict[str, Any]
    source: dict[str, Any]
    files: dict[str, Any] = field(default_factory=dict)  # name -> callable(path) writing it
    reference: Any = None  # whatever the adapter's reference() needs (the eager model)
    modality: str | None = None  # the graph's input modality when not the spec's (towers)


@dataclass(frozen=True)
class ExportResult:
    spec: ModelSpec
    artifact: Artifact
    reused: bool
    seconds: float


class Exporter(ABC):
    """A framework adapter."""

    reference_name: str = ""
    eager_name: str = "PyTorch eager"  # what :meth:`eager` runs

    @abstractmethod
    def build(self, spec: ModelSpec) -> Built:
        """Load the source model, truncate it and wrap it for conversion."""

    @abstractmethod
    def samples(self, spec: ModelSpec, built: Built) -> list[Any]:
        """Raw inputs (uint8 images or texts) for the parity check."""

    @abstractmethod
    def reference(self, built: Built, payload: Any) -> dict[str, np.ndarray]:
        """The source framework's per-item output ``{layer: array}`` for one input."""

    def calibration(self, spec: ModelSpec, built: Built) -> list[Any]:
        """Raw inputs that int8 calibrates on; text adapters give their own, apart from
        the parity samples."""
        return self.samples(spec, built)

    def convert(self, built: Built, path: Path) -> None:
        """Write the ONNX model; torch adapters share :func:`to_onnx`."""
        to_onnx(built, path)

    def reference_item(self, built: Built, raw: Any, payload: Any) -> dict[str, np.ndarray]:
        """The reference for one sample; adapters whose framework decodes ``raw`` itself
        (an image processor's own resize) override this."""
        return self.reference(built, payload)

    def eager(self, built: Built) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        """The built module run eagerly in its framework on one batch of the graph's inputs
        (``{input name: array}``, as ONNX Runtime takes them), its outputs in the graph's
        order: what ``ducho-fast bench --source`` times beside the session. Torch adapters
        share this; the Keras adapter runs its model."""
        torch = import_torch()
        module, names = built.module, built.input_names

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            with torch.inference_mode():
                out = module(*[torch.from_numpy(feeds[n]) for n in names])
            return [o.numpy() for o in (out if isinstance(out, tuple | list) else (out,))]

        return run


def build_with_kwargs(
    builder: Any,
    spec: ModelSpec,
    name: str,
    kwargs: dict[str, Any],
    *,
    refused: tuple[type[Exception], ...] = (TypeError,),
) -> Any:
    """``builder(**kwargs)`` for a model entry (``kwargs`` a dict, so that any name can be
    an argument, ``name`` included). An argument the builder does not take, or one
    it misses (``refused``: also a value it rejects, where no weights are fetched that could
    fail the same way), is the config's ``architecture_kwargs`` at fault: an error naming
    that key, not a traceback."""
    try:
        return builder(**kwargs)
    except refused as e:
        given = spec.architecture_kwargs or {}
        raise ExportError(
            f"'{spec.key_path}': {name} cannot be built with architecture_kwargs {given} "
            f"({type(e).__name__}: {e}). Check '{spec.key_path}.architecture_kwargs' against "
            f"{name}'s arguments."
        ) from e


def image_output(name: str, layer: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """The manifest record of one image-model output; saved squeezed, as Ducho does."""
    squeezed = [d for d in shape if d != 1]
    return {
        "name": name,
        "layer": layer,
        "item_shape": list(shape),
        "dim": int(math.prod(squeezed)),
        "squeeze": True,
        "per_token": False,
        "pooling": None,
    }


def export_with(exporter: Exporter, spec: ModelSpec, store: Path, *, force: bool) -> ExportResult:
    start = time.perf_counter()
    slug = slug_for(spec)
    with exporting(store, slug):  # another process exporting it: wait, then reuse its artifact
        if not force:
            existing = _valid_existing(store / slug)
            if existing is not None:
                return ExportResult(spec, existing, True, time.perf_counter() - start)
        return _export(exporter, spec, store, slug, start)


def _export(
    exporter: Exporter, spec: ModelSpec, store: Path, slug: str, start: float
) -> ExportResult:
    with _memory_named(spec):
        built = exporter.build(spec)
        build_dir = new_build_dir(store, slug)
        try:
            artifact = _convert_and_check(exporter, spec, built, build_dir, slug, store)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
    return ExportResult(spec, artifact, False, time.perf_counter() - start)


@contextmanager
def _memory_named(spec: ModelSpec) -> Iterator[None]:
    """An allocation that fails while a model is built, converted or checked becomes an
    ExportError naming the model and its input size; it was a framework's traceback."""
    try:
        yield
    except DuchoError:
        raise
    except Exception as e:
        said = memory_lines(e)
        if not out_of_memory(e):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = "".join(f": {line}" for line in (said or lines)[:1])  # not torch.fx's code
        size = f" at reshape {list(spec.reshape)}" if spec.reshape else ""
        raise ExportError(
            f"{spec.key_path} ({spec.model_name}): the export ran out of memory{size} "
            f"({type(e).__name__}{reason}). Exporting runs the model on example "
            "batches of 2 items; free memory or export on a machine with more"
            + (", or check that reshape is the model's input size." if size else ".")
        ) from e


def _valid_existing(path: Path) -> Artifact | None:
    if not path.exists():
        return None
    try:
        artifact = load_artifact(path)
    except ArtifactError:
        return None
    return artifact if artifact.manifest.get("parity", {}).get("passed") else None


def _convert_and_check(
    exporter: Exporter, spec: ModelSpec, built: Built, build_dir: Path, slug: str, store: Path
) -> Artifact:
    with scratch(build_dir) as raw:  # with whatever files the converter writes beside it
        exporter.convert(built, raw / MODEL_FILE)
        save_graph(load_graph(raw / MODEL_FILE), build_dir / MODEL_FILE)
    for name, write in built.files.items():
        write(build_dir / name)
    manifest = _manifest(spec, built, slug)

    def calibration() -> list[dict[str, np.ndarray]]:
        fp32 = Embedder(Artifact(build_dir, {**manifest, "schema_version": SCHEMA_VERSION}))
        return [fp32.batch_feeds([fp32.prepare(x)]) for x in exporter.calibration(spec, built)]

    try:
        reduced = apply_precision(build_dir / MODEL_FILE, spec.precision, calibration)
    except ExportError as e:
        raise ExportError(f"'{spec.key_path}.precision' ({spec.model_name}): {e}") from e
    if reduced:
        manifest["precision_details"] = reduced
    draft = Artifact(build_dir, {**manifest, "schema_version": SCHEMA_VERSION})
    manifest["parity"] = check_parity(exporter, spec, built, draft)
    return write_artifact(store, slug, build_dir, manifest)


def _manifest(spec: ModelSpec, built: Built, slug: str) -> dict[str, Any]:
    return {
        "ducho_fast_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "modality": built.modality or spec.modality,
        "tower": spec.tower,
        "source": {"backend": spec.backend, "model_name": spec.model_name, **built.source},
        "key": graph_key(spec),
        "layers": spec.layer_labels(),
        "inputs": built.inputs,
        "outputs": built.outputs,
        "preprocessing": built.preprocessing,
        "opset": OPSET,
        "precision": spec.precision,
    }


def to_onnx(built: Built, path: Path) -> None:
    """Convert with the TorchScript-based exporter (fast, dynamic axes by name)."""
    torch = import_torch()
    names = sorted({o["name"] for o in built.outputs}, key=[o["name"] for o in built.outputs].index)
    try:
        with torch.no_grad(), warnings.catch_warnings(), eager_attention(built.module):
            warnings.simplefilter("ignore")
            module = built.module
            if any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
                # The exporter cannot trace into a loaded TorchScript submodule; a traced
                # wrapper it can (the parity check runs a batch of another size afterwards).
                module = torch.jit.trace(module, built.example)
            torch.onnx.export(
                module,
                built.example,
                str(path),
                input_names=built.input_names,
                output_names=names,
                dynamic_axes=built.dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except DuchoError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX conversion failed: {type(e).__name__}: {e}") from e


@contextmanager
def eager_attention(module: Any) -> Iterator[None]:
    """Trace Transformers models with their plain ("eager") attention, then switch back.

    The SDPA path traces into masking ops (Where, IsNaN) that ONNX Runtime cannot fuse; the
    eager one gives MatMul-Softmax-MatMul, which ORT's CPU and CUDA fusions recognise.
    Measured on all-MiniLM-L6-v2 (2 cores): 114 -> 184 texts/s, same outputs within 1.2e-7.
    The parity check compares the result with the source model as it was loaded.
    """
    switched: list[tuple[Any, str]] = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current == "sdpa" and hasattr(sub, "set_attn_implementation"):
            try:
                sub.set_attn_implementation("eager")
            except (ValueError, ImportError, AttributeError):
                continue
            switched.append((sub, current))
    try:
        yield
    finally:
        for sub, previous in reversed(switched):
            sub.set_attn_implementation(previous)


def check_parity(
    exporter: Exporter, spec: ModelSpec, built: Built, draft: Artifact
) -> dict[str, Any]:
    """Run the graph through the ducho-fast runtime and compare with the source framework."""
    # bf16 runs on the CPU, where it is checked even on a GPU machine (auto would take CUDA)
    options = (
        RuntimeOptions(device="cpu", allow_fallback=False) if spec.precision == "bf16" else None
    )
    embedder = Embedder(draft, options)
    raws = exporter.samples(spec, built)
    payloads = [embedder.prepare(x) for x in raws]
    ours = embedder.run_prepared(payloads)
    refs = _references(exporter, spec, built, raws, payloads)
    bounds = parity_bounds(spec.precision)
    per_layer = {layer: _compare(ours, refs, layer, bounds) for layer in embedder.layers}
    passed = all(r["passed"] for r in per_layer.values())
    result = {
        "reference": exporter.reference_name,
        "precision": spec.precision,
        # where the graph ran for the check (device auto: CUDA on a GPU machine); fp16 graphs
        # are made for GPUs, and a CPU's fp16 kernels round differently
        "provider": embedder.info.provider,
        "samples": len(payloads),
        "bounds": bounds,
        "layers": per_layer,
        "passed": passed,
    }
    if not passed:
        lines = [
            f"  {layer}: max |onnx - ref| / max |ref| = {r['max_rel_diff']:.3g}, "
            f"min cosine = {r['min_cosine']:.6f}, shapes ok = {r['shapes_match']}"
            for layer, r in per_layer.items()
        ]
        hint = (
            ""
            if spec.precision == "fp32"
            else f"\nHint: precision {spec.precision} loses too much on this model; use a "
            "higher precision (fp16 on GPUs, fp32 on CPUs)."
        )
        raise ParityError(
            f"'{spec.key_path}' ({spec.model_name}): the {spec.precision} ONNX graph disagrees "
            f"with {exporter.reference_name} beyond its bounds ({_bounds_text(bounds)}):\n"
            + "\n".join(lines)
            + hint
        )
    return result


def parity_bounds(precision: str) -> dict[str, float | None]:
    """fp32: cosine and relative max diff; fp16 and int8: cosine against the fp32 source."""
    rel = REL_DIFF_BOUND if precision == "fp32" else None
    return {"min_cosine": MIN_COSINE[precision], "max_rel_diff": rel}


def _bounds_text(bounds: dict[str, float | None]) -> str:
    text = f"cosine >= {bounds['min_cosine']}"
    if bounds["max_rel_diff"] is not None:
        text += f", relative max diff <= {bounds['max_rel_diff']}"
    return text


def _references(
    exporter: Exporter, spec: ModelSpec, built: Built, raws: list[Any], payloads: list[Any]
) -> list[dict[str, np.ndarray]]:
    try:
        with import_torch().no_grad():
            refs = [
                exporter.reference_item(built, r, p) for r, p in zip(raws, payloads, strict=True)
            ]
    except Exception as e:
        raise ExportError(
            f"'{spec.key_path}' ({spec.model_name}): {exporter.reference_name} failed on a parity "
            f"sample ({type(e).__name__}: {e}). Check that the model loads and runs in its "
            "own framework."
        ) from e
    for layer in refs[0] if refs else {}:
        if not all(np.isfinite(r[layer]).all() for r in refs):
            raise ExportError(
                f"'{spec.key_path}' ({spec.model_name}): the source model itself returns NaN or "
                f"infinite values for layer '{layer}' on the parity samples; nothing to check "
                "the export against. Check the weights."
            )
    return refs


def _compare(
    ours: list[dict[str, np.ndarray]],
    refs: list[dict[str, np.ndarray]],
    layer: str,
    bounds: dict[str, float | None],
) -> dict[str, Any]:
    shapes_match = all(o[layer].shape == r[layer].shape for o, r in zip(ours, refs, strict=True))
    if not shapes_match:
        return {
            "max_rel_diff": float("inf"),
            "min_cosine": -1.0,
            "shapes_match": False,
            "passed": False,
        }
    scale = max(float(np.abs(r[layer]).max()) for r in refs) or 1.0
    diff = max(float(np.abs(o[layer] - r[layer]).max()) for o, r in zip(ours, refs, strict=True))
    cosine = min(_cosine(o[layer], r[layer]) for o, r in zip(ours, refs, strict=True))
    rel = diff / scale
    return {
        "max_abs_diff": diff,
        "max_rel_diff": rel,
        "min_cosine": cosine,
        "shapes_match": True,
        "passed": bool(
            cosine >= (bounds["min_cosine"] or 0.0)
            and (bounds["max_rel_diff"] is None or rel <= bounds["max_rel_diff"])
        ),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
