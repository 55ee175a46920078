"""Load a YAML config: defaults, overrides, Ducho spellings, validation, resolution.

Everything a user can get wrong in a config is found here, before any model is loaded or any
file is read, and reported with the file, the key path, what was found and what is allowed.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ducho_fast.config import compat
from ducho_fast.config.fusion import fusion_specs
from ducho_fast.config.model import Config, Job, Layer, ModelSpec, OutputOptions, RuntimeOptions
from ducho_fast.config.model_checks import check_applies, check_model, entry_keys
from ducho_fast.config.options import apply_gpu_list, checked_input, word_switches
from ducho_fast.config.overrides import apply_override
from ducho_fast.config.paths import absent, no_path, resolved, working_folder
from ducho_fast.config.schema import MODALITIES, ORIGINS, Checker
from ducho_fast.config.unique_keys import DuplicateKey, load_unique
from ducho_fast.errors import ConfigError, NotSupportedYet

RUNS_NOW = {
    ("visual", "items"),
    ("textual", "items"),
    ("visual_textual", "items"),
    ("audio", "items"),
    ("visual", "interactions"),
    ("textual", "interactions"),
    ("audio", "interactions"),
}
NEEDS_LAYERS = {"torch", "sentence_transformers"}
NOT_YET = {("visual", "transformers")}


def load_defaults() -> dict[str, Any]:
    text = resources.files("ducho_fast.config").joinpath("defaults.yml").read_text("utf-8")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


STDIN = "-"  # a config read from standard input: ``envsubst < c.yml | ducho-fast extract -``


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``'s loader, a key given twice refused."""
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; give the YAML file in it.")
    if not path.exists():  # a named pipe (a shell's <(...)) is read once, as a file
        raise ConfigError(f"config file '{path}' {absent(path)}.")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"config file '{path}' cannot be read ({e.strerror or e}); check its permissions."
        ) from e
    return _parse(text, str(path))


def read_config(source: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """A config file's mapping and the name its errors give, read once: a named pipe or
    standard input (``-``) cannot be read again, as ``bench --vs`` does for each variant."""
    if os.fspath(source) != STDIN:
        return read_yaml(Path(source)), str(source)
    name = "<stdin>"
    stream = sys.stdin
    if stream is None or stream.closed:
        raise ConfigError(f"config '{STDIN}' reads standard input, which this process has not.")
    if stream.isatty():
        raise ConfigError(
            f"config '{STDIN}' reads the YAML from standard input, which is a terminal here: "
            "pipe it in (envsubst < config.yml | ducho-fast extract -), or give the file's "
            "path (./- for a file named '-')."
        )
    try:
        text = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    except OSError as e:
        raise ConfigError(f"{name}: cannot be read ({e.strerror or e}).") from e
    return _parse(text, name), name


def _parse(text: str | bytes, name: str) -> dict[str, Any]:
    try:
        data = load_unique(text.decode("utf-8") if isinstance(text, bytes) else text)
    except DuplicateKey as e:
        raise ConfigError(f"{name}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: {_yaml_error(e)}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text ({e}).") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping, found {type(data).__name__}.")
    return data


def _yaml_error(error: yaml.YAMLError) -> str:
    """PyYAML's reason with the line and column first, the offending line and its caret after,
    and the fix for the common case (a tab in the indentation)."""
    mark = getattr(error, "problem_mark", None)
    if not isinstance(error, yaml.MarkedYAMLError) or mark is None:
        return f"not valid YAML: {error}"
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context = error.context or ""
    began = error.context_mark
    if context and began is not None and (began.line, began.column) != (mark.line, mark.column):
        context += f" that starts at line {began.line + 1}, column {began.column + 1}"
    said = f"not valid YAML at {where}: {error.problem}" + (f" ({context})." if context else ".")
    if "'\\t'" in (error.problem or ""):
        said += " YAML indents with spaces only: replace the tab with spaces."
    snippet = mark.get_snippet() or ""
    return f"{said}\n{snippet}" if snippet.strip(" ^\n") else said


def load_config(
    source: str | Path | dict[str, Any],
    overrides: Iterable[str] | None = (),
    *,
    cwd: Path | None = None,
    name: str | None = None,
) -> Config:
    """Build a validated :class:`Config` from a YAML file (or an in-memory mapping).

    Args:
        source: path of the YAML file (``-``: read from standard input), or the mapping
            itself.
        overrides: ``a.b.c=VALUE`` strings (``--`` prefix allowed), applied in order; None:
            none.
        cwd: directory relative paths start from; the working directory by default.
        name: what errors call a mapping (the file it was read from); ``<config>`` by
            default.
    """
    if not isinstance(source, str | os.PathLike | dict) or source == "":
        raise ConfigError(
            "a config is the path of a YAML file, a mapping of its keys, or a Config; found "
            f"{'an empty path' if source == '' else type(source).__name__}."
        )
    if isinstance(source, dict):
        raw, name = copy.deepcopy(source), name or "<config>"
    else:
        raw, name = read_config(source)
    for text in _override_list(overrides):
        apply_override(raw, text)
    raw = compat.normalize(raw, name)
    Checker(name).check(raw)
    written = entry_keys(raw)  # before the model defaults join each entry
    merged = _with_defaults(raw)
    cfg = _resolve(merged, name, (cwd or working_folder()).resolve())
    for spec in cfg.models():
        check_applies(spec, written.get(spec.key_path, set()), name)
    return cfg


def _override_list(overrides: Iterable[str] | None) -> list[str]:
    """Overrides given in code: a list of ``a.b.c=VALUE`` strings, or None (one string alone
    would be read as its characters)."""
    if overrides is None:
        return []
    if isinstance(overrides, str | bytes) or not isinstance(overrides, Iterable):
        fix = f": pass [{overrides!r}]" if isinstance(overrides, str) else ""
        raise ConfigError(
            f"overrides are a list of a.b.c=VALUE strings; found {type(overrides).__name__}{fix}."
        )
    texts = list(overrides)
    for text in texts:
        if not isinstance(text, str):
            raise ConfigError(
                f"override {text!r} is not a string ({type(text).__name__}); write it as "
                "'a.b.c=VALUE'."
            )
    return texts


def _with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    merged = load_defaults()
    model_defaults = {**merged.pop("model"), **raw.get("model", {})}
    for key, value in raw.items():
        if key in ("runtime", "output", "input"):
            merged[key] = {**merged.get(key, {}), **value}
        elif key != "model":
            merged[key] = value
    for modality in MODALITIES:
        for block in (merged.get(modality) or {}).values():
            if isinstance(block, dict) and isinstance(block.get("model"), list):
                block["model"] = [{**model_defaults, **m} for m in block["model"]]
    return merged


def _resolve(data: dict[str, Any], name: str, cwd: Path) -> Config:
    dataset_path = resolved(cwd / data.get("dataset_path", "."), name, "dataset_path")
    jobs = tuple(
        _job(data[m][o], m, o, name, dataset_path, cwd)
        for m in MODALITIES
        if isinstance(data.get(m), dict)
        for o in ORIGINS
        if o in data[m]
    )
    if not jobs and not data.get("fusion"):
        raise ConfigError(
            f"{name}: nothing to extract. Add a block such as 'visual.items' or 'textual.items' "
            "with input_path, output_path and model."
        )
    runtime = RuntimeOptions(**word_switches(data["runtime"]))
    runtime = apply_gpu_list(runtime, data.get("gpu list"), name)
    fusions = fusion_specs(data.get("fusion") or [], jobs, name, dataset_path)
    return Config(
        fusions=fusions,
        source=name,
        dataset_path=dataset_path,
        store=resolved(cwd / data["store"], name, "store"),
        jobs=jobs,
        runtime=runtime,
        output=_output(data["output"], name, dataset_path),
        input=checked_input(data["input"], name),
        resolved=data,
    )


def _output(raw: dict[str, Any], name: str, dataset: Path) -> OutputOptions:
    layouts = tuple(dict.fromkeys(raw["layouts"]))
    if "ducho" not in layouts:
        raise ConfigError(
            f"{name}: key 'output.layouts' is {list(raw['layouts'])!r}; it must include 'ducho'. "
            "The per-item files are the parts a matrix is assembled from and what a resumed "
            "run skips. Use layouts: [ducho, matrix]."
        )
    id_order = raw.get("id_order")
    return OutputOptions(
        squeeze=raw["squeeze"],
        layouts=layouts,
        dtype=raw["dtype"],
        id_order=resolved(dataset / id_order, name, "output.id_order") if id_order else None,
        resume=raw["resume"],
    )


def _job(
    block: dict[str, Any], modality: str, origin: str, name: str, dataset: Path, cwd: Path
) -> Job:
    where = f"{modality}.{origin}"
    for key in ("input_path", "output_path", "model"):
        if block.get(key) in (None, [], ""):
            raise ConfigError(f"{name}: '{where}' needs the key '{where}.{key}'.")
    if (modality, origin) not in RUNS_NOW:
        raise NotSupportedYet(
            f"{name}: '{where}' is understood but not supported yet by this version of "
            "ducho-fast (it runs items and interactions of visual, textual and audio, and "
            "visual_textual.items). "
            "Remove the block to go on."
        )
    paths = _paths(block, modality, where, name, dataset)
    models = tuple(
        _model(m, modality, origin, f"{where}.model.{i}", name, dataset, cwd)
        for i, m in enumerate(block["model"])
    )
    return Job(
        modality=modality,
        origin=origin,
        models=models,
        item_column=block.get("item_column"),
        text_column=block.get("text_column"),
        interaction_columns=_interaction_columns(block, modality, origin, where, name),
        unpaired=block.get("unpaired", "skip"),
        **paths,
    )


def _interaction_columns(
    block: dict[str, Any], modality: str, origin: str, where: str, name: str
) -> tuple[str, str] | None:
    value = block.get("interaction_columns")
    if origin == "interactions" and modality == "textual" and "item_column" in block:
        raise ConfigError(
            f"{name}: key '{where}.item_column' does not apply to interactions, whose id is "
            "a (user, item) pair. Use interaction_columns: [USER_COLUMN, ITEM_COLUMN]."
        )
    if value is None:
        return None
    if (modality, origin) != ("textual", "interactions"):
        raise ConfigError(
            f"{name}: key '{where}.interaction_columns' applies to textual.interactions only; "
            "visual and audio interactions take their ids from file names (<user>__<item>.ext)."
        )
    if len(value) != 2 or value[0] == value[1]:
        raise ConfigError(
            f"{name}: key '{where}.interaction_columns' is {value!r}; it must name two "
            "different columns, the user's and the item's: [USER_COLUMN, ITEM_COLUMN]."
        )
    return (value[0], value[1])


def _paths(
    block: dict[str, Any], modality: str, where: str, name: str, dataset: Path
) -> dict[str, Path]:
    """Input and output paths; a visual_textual block gives ``{visual: …, textual: …}``."""
    two = modality == "visual_textual"
    for key in ("input_path", "output_path"):
        value = block[key]
        if two and not (isinstance(value, dict) and set(value) == {"visual", "textual"}):
            raise ConfigError(
                f"{name}: key '{where}.{key}' must map both modalities, e.g. "
                f"{{visual: images, textual: descriptions.tsv}}; found {value!r}."
            )
        if two and not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{name}: the values of '{where}.{key}' must be strings.")
        if not two and not isinstance(value, str):
            raise ConfigError(
                f"{name}: key '{where}.{key}' must be a string for {modality} blocks "
                f"(a {{visual, textual}} mapping is for visual_textual blocks); found {value!r}."
            )
    if not two:
        return {
            key: resolved(dataset / block[key], name, f"{where}.{key}")
            for key in ("input_path", "output_path")
        }
    return {
        f"{prefix}{key}": resolved(
            dataset / block[key][modality], name, f"{where}.{key}.{modality}"
        )
        for prefix, modality in (("", "visual"), ("text_", "textual"))
        for key in ("input_path", "output_path")
    }


def _model(
    m: dict[str, Any], modality: str, origin: str, where: str, name: str, dataset: Path, cwd: Path
) -> ModelSpec:
    if "model_name" not in m:
        raise ConfigError(f"{name}: '{where}' needs the key '{where}.model_name'.")
    for key in ("model_name", "tokenizer_name", "image_processor"):
        check_name(m.get(key), f"{name}: key '{where}.{key}'")
    backend_dir = m.get("backend") or _default_backend(modality)
    backend = backend_dir.replace("-", "_")
    if (modality, backend) in NOT_YET:
        use = "torch" if modality == "visual" else "transformers"
        raise NotSupportedYet(
            f"{name}: '{where}.backend' is '{backend}' for {modality} models, which is not "
            f"supported yet by this version of ducho-fast. Use backend: {use} for {modality} "
            "models."
        )
    _check_backend_fits(backend, modality, where, name)
    if "weights" in (m.get("architecture_kwargs") or {}):
        raise ConfigError(
            f"{name}: key '{where}.architecture_kwargs' holds 'weights'; say which weights "
            f"with the key '{where}.weights' (default, none or a file)."
        )
    layers = _layers(m.get("output_layers"), modality, backend, where, name)
    spec = ModelSpec(
        modality=modality,
        origin=origin,
        key_path=where,
        model_name=m["model_name"],
        backend=backend,
        backend_dir=backend_dir,
        output_layers=layers,
        batch_size=m["batch_size"],
        reshape=_reshape(m.get("reshape"), where, name),
        preprocessing=m.get("preprocessing"),
        mean=tuple(float(x) for x in m.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(x) for x in m.get("std", (0.229, 0.224, 0.225))),
        clear_text=m["clear_text"],
        tokenizer_name=m.get("tokenizer_name"),
        weights=m.get("weights"),
        architecture=m.get("architecture"),
        architecture_kwargs=dict(m.get("architecture_kwargs") or {}),
        trust=m["trust"],
        max_length=m.get("max_length"),
        local_path=find_local(m["model_name"], dataset, cwd),
        weights_path=_weights_path(m.get("weights"), where, name, dataset, cwd),
        fusion=m.get("fusion"),
        image_processor=m.get("image_processor"),
        pooling=None if m.get("pooling") in (None, "none") else m["pooling"],
        max_seconds=float(m["max_seconds"]) if m.get("max_seconds") is not None else None,
        sample_rate=m.get("sample_rate"),
        precision=m.get("precision", "fp32"),
    )
    check_model(spec, m, name)
    return spec


def _default_backend(modality: str) -> str:
    # Ducho tries transformers first for text and torch for images.
    return "torch" if modality == "visual" else "transformers"


def _check_backend_fits(backend: str, modality: str, where: str, name: str) -> None:
    fits = {
        "visual": ("torch", "tensorflow"),
        "textual": ("transformers", "sentence_transformers"),
        "visual_textual": ("transformers",),
        "audio": ("torch", "transformers"),
    }
    if backend not in fits.get(modality, (backend,)):
        raise ConfigError(
            f"{name}: '{where}.backend' is '{backend}', which does not extract {modality} "
            f"features. Allowed for {modality}: {', '.join(fits[modality])}."
        )


def _layers(
    value: list[Any] | None, modality: str, backend: str, where: str, name: str
) -> tuple[Layer, ...]:
    if not value:
        # Ducho's two-tower default: the projected embeddings.
        if modality == "audio" and backend == "transformers":
            return ("last_hidden_state",)
        if modality == "audio":
            raise ConfigError(
                f"{name}: '{where}' needs the key '{where}.output_layers' (for example "
                "output_layers: [12], Ducho's extract_features(num_layers=12))."
            )
        return (1,) if modality == "visual_textual" else _default_layers(backend, where, name)
    layers: list[Layer] = []
    for i, layer in enumerate(value):
        if not isinstance(layer, dict):
            layers.append(layer)
        elif modality != "visual_textual" or set(layer) != {"visual", "textual"}:
            raise ConfigError(
                f"{name}: key '{where}.output_layers.{i}' is a mapping {layer!r}; only "
                "visual_textual models take one, with both keys: {visual: PATH, textual: PATH}."
            )
        else:
            layers.append((layer["visual"], layer["textual"]))
    return tuple(layers)


def _default_layers(backend: str, where: str, name: str) -> tuple[str, ...]:
    if backend in NEEDS_LAYERS:
        example = "avgpool" if backend == "torch" else "1"
        raise ConfigError(
            f"{name}: '{where}' needs the key '{where}.output_layers' "
            f"(for example output_layers: {example})."
        )
    return ("pooler_output",)


def _reshape(value: list[int] | None, where: str, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or any(v < 1 for v in value):
        raise ConfigError(
            f"{name}: key '{where}.reshape' is {value!r}; it must be two positive integers "
            "[width, height]."
        )
    if any(v > MAX_RESHAPE_SIDE for v in value):  # a typo: exporting it ended in a traceback
        raise ConfigError(  # from torch's allocator (100000 x 100000 asked for 60 GB)
            f"{name}: key '{where}.reshape' is {value!r}; each side must be at most "
            f"{MAX_RESHAPE_SIDE} pixels. It is the size images are resized to for the model "
            "(224 x 224 for most ImageNet CNNs)."
        )
    return (value[0], value[1])


# The longest side a model's input may have: 8192 x 8192 is 1,337 times a 224 x 224 input.
MAX_RESHAPE_SIDE = 8192


def check_name(value: Any, what: str) -> None:
    """A ConfigError saying ``what`` (a config's key, an argument) is, where a model's name is
    neither a path a file system takes nor a name (it ended a load in an OSError traceback
    where the libraries look for it as a path)."""
    if isinstance(value, str) and no_path(value):
        shown = repr(value if len(value) <= 80 else value[:80] + "...")
        raise ConfigError(
            f"{what} is {shown}, which no file system takes as a path (it holds "
            "a NUL character, a name over 255 bytes or 4096 bytes or more in all) and no hub or "
            "library names a model so: give the model's file or folder, or its name."
        )


def find_local(model_name: str, dataset: Path, cwd: Path) -> Path | None:
    """A model given as a path: tried under dataset_path first, then the working directory."""
    for base in (dataset, cwd):
        candidate = (base / model_name).expanduser()
        if not no_path(candidate) and candidate.exists():
            return candidate.resolve()
    return None


def _weights_path(
    weights: str | None, where: str, name: str, dataset: Path, cwd: Path
) -> Path | None:
    if weights is None or weights.lower() in ("default", "none", "imagenet"):
        return None
    found = find_local(weights, dataset, cwd)
    if found is None or not found.is_file():
        raise ConfigError(
            f"{name}: key '{where}.weights' is '{weights}', which is neither 'default', 'none' "
            f"nor a file (looked in {dataset} and {cwd})."
        )
    return found
