"""Whether the Hugging Face hub can serve a model name now, asked once before loading it.

Without network, the libraries retry every file of a hub name with growing pauses: exporting
``sentence-transformers/all-MiniLM-L6-v2`` on a machine without network printed ten retry
warnings and failed after 75 s. One connection attempt to the hub tells that in at most
:data:`PROBE_SECONDS`; where it fails, the name is loaded from the local Hugging Face cache only
(``local_files_only``), which either finds it there or fails at once.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

PROBE_SECONDS = 5.0
DEFAULT_ENDPOINT = "https://huggingface.co"
# With a proxy set, a direct connection says nothing of whether the libraries can download.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
TRUE = {"1", "on", "yes", "true"}


def unreachable(source: str) -> str | None:
    """Why the hub cannot serve ``source`` now, or None: ``source`` is a local path (a hub name
    is ``name`` or ``namespace/name``), offline mode is already set (``HF_HUB_OFFLINE``: the
    libraries then read the cache at once), a proxy is set, or the hub answers."""
    if Path(source).expanduser().exists() or not is_hub_name(source):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        return None
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    return _probe(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)


def is_hub_name(source: str) -> bool:
    """Whether ``source`` could be a hub name: ``name`` or ``namespace/name``, never
    absolute, never starting with '.' or '~'."""
    return not (source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source)


def options(reason: str | None) -> dict[str, bool]:
    """The loaders' keyword arguments for a hub that :func:`unreachable` found so."""
    return {"local_files_only": True} if reason else {}


def cache_fix(source: str, reason: str) -> str:
    """What to do when ``source`` was not in the cache of a machine that cannot reach the hub."""
    return (
        f"{reason[:1].upper()}{reason[1:]}, and '{source}' is not in this machine's Hugging Face "
        "cache (HF_HOME, ~/.cache/huggingface by default). Give a local model folder: download "
        f"it where there is network (hf download {source} --local-dir DIR), copy DIR here and "
        "set model_name to it."
    )


@functools.cache
def _probe(endpoint: str) -> str | None:
    parts = urlsplit(endpoint)
    host = parts.hostname or endpoint
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as e:
        return f"the Hugging Face hub ({host}:{port}) cannot be reached ({e.strerror or e})"
