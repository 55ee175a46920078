"""Reading one item for the models of a pipeline: what the reader threads and the decoder
worker processes (:mod:`ducho_fast.runtime.decoders`) both run. It imports no ONNX Runtime,
so a worker process starts without it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ducho_fast.data.items import FileStamp, Item
from ducho_fast.data.sources import Loader
from ducho_fast.errors import DuchoError, UnreadableFile


@dataclass(frozen=True)
class Failed:
    """An item its loader could not decode, and why; ``stamp`` for an unreadable file."""

    reason: str
    stamp: FileStamp | None = None


def load_one(load: Callable[[Item], Any], item: Item) -> Any:
    """The decoded item, or :class:`Failed` with the reason."""
    try:
        return load(item)
    except DuchoError as e:
        return failed(item, e)


def load_each(loaders: Sequence[Loader], item: Item) -> list[Any]:
    """``item`` for each of ``loaders`` (which share their ``decode_key``), decoded once and
    finished once per distinct ``finish_key``; a :class:`Failed` where it could not be."""
    try:
        decoded = loaders[0].decode(item)
    except DuchoError as e:
        return [failed(item, e)] * len(loaders)
    finished: dict[Any, Any] = {}
    for loader in loaders:
        if loader.finish_key not in finished:
            try:
                finished[loader.finish_key] = loader.finish(decoded, item)
            except DuchoError as e:
                finished[loader.finish_key] = failed(item, e)
    return [finished[loader.finish_key] for loader in loaders]


def failed(item: Item, error: DuchoError) -> Failed:
    """``error`` as the :class:`Failed` of ``item``: its reason without the item's origin."""
    stamp = error.stamp if isinstance(error, UnreadableFile) else None
    return Failed(str(error).removeprefix(f"{item.origin}: "), stamp)
