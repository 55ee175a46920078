"""A batch on its way through a model: its graph inputs built by a reader, run on a model
lane (item by item where the batch fails as a whole, to find the items at fault; in parts
where it runs out of memory, see ``Embedder.run_prepared``), and its outputs collected on the
writer's thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ducho_fast.data.items import Item
from ducho_fast.errors import DuchoError, out_of_memory
from ducho_fast.runtime.embedder import Embedder, ItemOutputs, Launched, Prepared


@dataclass
class Batch:
    items: list[Item]
    payloads: list[Any]
    skipped: int = 0  # items of this chunk that failed to load (for progress)
    ticks: int | None = None  # how far writing it moves the progress; None: items + skipped
    prepared: Prepared | None = None  # graph inputs built (and staged) by the reader


def prepare(embedder: Embedder, batch: Batch, batch_size: int = 0) -> Prepared | None:
    """The batch's graph inputs, built by the reader (a smaller last batch padded to the run's
    ``batch_size`` where the session pads one: ``Embedder.prepare_batch``); None: the model
    thread finds out why."""
    if not batch.items:
        return None
    try:
        return embedder.prepare_batch(batch.payloads, batch_size)
    except Exception:
        return None  # launch() runs it through infer(), which names the bad items


def launch(embedder: Embedder, batch: Batch, lane: int = 0) -> Launched | list[ItemOutputs | str]:
    """Run a batch on a model lane's thread. Launched: the writer collects its outputs (from
    the device, with I/O binding) while the next batch runs. Otherwise the batch failed as a
    whole and was run again item by item: each item's outputs, or why it failed."""
    if batch.prepared is not None and embedder.memory_splits.fits(len(batch.payloads)):
        try:
            launched = embedder.launch(batch.prepared, lane)
        except DuchoError:
            raise
        except Exception as e:
            if out_of_memory(e) and len(batch.payloads) > 1:  # infer() runs it in parts,
                # without trying it whole again (an item alone: infer() says why it failed)
                embedder.ran_out_of_memory(len(batch.payloads), e)
            # else infer() below finds the item at fault
        else:
            embedder.memory_splits.ran(len(batch.payloads))
            return launched
    return infer(embedder, batch)


def collect(
    embedder: Embedder, batch: Batch, ran: Launched | list[ItemOutputs | str]
) -> list[ItemOutputs | str]:
    """Per-item outputs of what :func:`launch` returned (on the writer's thread)."""
    if not isinstance(ran, Launched):
        return ran
    try:
        return list(embedder.collect(ran))
    except DuchoError:
        raise
    except Exception as e:
        reason = f"copying the model's outputs back failed: {type(e).__name__}: {e}"
        return [reason] * len(batch.items)


def infer(embedder: Embedder, batch: Batch) -> list[ItemOutputs | str]:
    """Per-item outputs of one batch; a string is why the model failed on that item."""
    try:
        return list(embedder.run_prepared(batch.payloads))
    except DuchoError:
        raise
    except Exception:
        # One bad input can fail a whole batch; run items alone to find it.
        return [_infer_one(embedder, p) for p in batch.payloads]


def _infer_one(embedder: Embedder, payload: Any) -> ItemOutputs | str:
    try:
        return embedder.run_prepared([payload])[0]
    except Exception as e:
        return f"the model failed on this item: {type(e).__name__}: {e}"
