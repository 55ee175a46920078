"""Layer discovery and selection, shared by the CLI's ``layers`` command and the exporters."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from ducho_fast.errors import ExportError, did_you_mean


def torch_layer_names(module: Any) -> list[str]:
    """torch.fx node names of a model in eval mode, as Ducho and torchvision name layers.

    Module names (``layer4``) are selectable too: they stand for the module's last node.
    """
    from ducho_fast.exporters.compat import import_torchvision

    import_torchvision()
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        nodes = list(get_graph_node_names(module.eval())[1])
    except Exception as e:
        raise ExportError(
            f"torch.fx cannot trace {type(module).__name__} to list its layers "
            f"({type(e).__name__}: {e})."
        ) from e
    known = set(nodes)
    modules = [n for n, _ in module.named_modules() if n and n not in known]
    return nodes + modules


def layers_command(
    backend: str,
    model: str,
    *,
    architecture: str | None = None,
    architecture_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> str:
    """The ``ducho-fast layers`` command line that lists a config entry's layers: a state
    dict loads only into its architecture, built with its arguments, and with trust."""
    words = ["ducho-fast", "layers", backend, shlex.quote(model)]
    if architecture:
        words += ["--architecture", shlex.quote(architecture)]
    if architecture_kwargs:
        words += ["--architecture-kwargs", shlex.quote(json.dumps(dict(architecture_kwargs)))]
    if trust:
        words.append("--trust")
    return " ".join(words)


def check_layers(
    wanted: Sequence[str | int],
    available: Sequence[str],
    *,
    model: str,
    backend: str,
    command: str | None = None,
) -> None:
    """Raise with near matches and the discovery command (``command``, by default
    :func:`layers_command` of the model alone) for every unknown layer."""
    known = set(available)
    for layer in wanted:
        if str(layer) not in known:
            raise ExportError(
                f"model '{model}' has no layer '{layer}'.{did_you_mean(str(layer), available)}\n"
                f"Hint: run `{command or layers_command(backend, model)}` to list its layers."
            )
