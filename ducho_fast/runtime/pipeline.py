"""The batch pipeline: readers -> bounded queue -> ONNX Runtime -> writer thread.

Readers decode a batch on a thread pool (PIL and tokenizers release the GIL) while the model
runs the previous one; the writer saves a batch while the model runs the next. A bad item is
recorded and skipped (or, with ``on_error: fail``, stops the run); the items around it go on.

Items are read in windows cut at fixed positions of the full item list: one batch for images
and audio, ``TEXT_WINDOW_BATCHES`` batches for texts, which are tokenized by the readers and
sorted by length inside their window into batches within a token budget (dynamic padding
wastes little). A resumed run skips the windows whose items are all complete and runs the
others whole, so every feature comes from the same batch an uninterrupted run would have put
it in: the files end byte-identical.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ducho_fast.data.items import Item, ItemError
from ducho_fast.errors import DataError, DuchoError
from ducho_fast.runtime.batcher import Batcher
from ducho_fast.runtime.embedder import Embedder, ItemOutputs
from ducho_fast.runtime.shard import Shard

LoadFn = Callable[[Item], Any]
WriteFn = Callable[[str, ItemOutputs], None]
ProgressFn = Callable[[int], None]
_DONE = object()


@dataclass
class Batch:
    items: list[Item]
    payloads: list[Any]
    skipped: int = 0  # items of this chunk that failed to load (for progress)


@dataclass
class RunResult:
    """What one model's run over one input did."""

    written: int = 0
    reused: int = 0  # complete from an earlier run, skipped
    errors: list[ItemError] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def items_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PipelineOptions:
    batch_size: int
    prefetch: int
    workers: int
    on_error: str
    token_budget: int = 0  # text: rows x padded length per batch; 0: batch_size x 64
    shard: Shard | None = None  # a job array's task: only its windows


# Texts are sorted by length within windows of this many batches, cut at fixed positions of the
# item list: long enough that buckets fill, short enough that the first batch comes quickly.
TEXT_WINDOW_BATCHES = 16
AUTO_TOKENS_PER_ROW = 64


class WindowedRun:
    """What both engines share: a model's items read in windows at fixed positions of the
    item list (all of them, or a shard's), decoded by ``load``, written by ``write``."""

    def __init__(self, batcher: Batcher, load: LoadFn, write: WriteFn, options: PipelineOptions):
        self._batcher = batcher
        self._load = load
        self._write = write
        budget = options.token_budget or options.batch_size * AUTO_TOKENS_PER_ROW
        self._opts = replace(options, token_budget=budget)

    @property
    def window(self) -> int:
        """Items per window: one batch, or ``TEXT_WINDOW_BATCHES`` batches of texts."""
        size = self._opts.batch_size
        return size * TEXT_WINDOW_BATCHES if self._batcher.sorts_by_length else size

    def size(self, total: int) -> int:
        """How many of ``total`` items this run embeds: all, or its shard's."""
        shard = self._opts.shard
        return total if shard is None else shard.size(total, self.window)

    def windows(self, items: Sequence[Item]) -> Iterator[Sequence[Item]]:
        """This run's windows of ``items``, in order."""
        shard = self._opts.shard
        for w, begin in enumerate(range(0, len(items), self.window)):
            if shard is None or shard.owns(w):
                yield items[begin : begin + self.window]


class Pipeline(WindowedRun):
    """One model over one list of items, with decode, model and write overlapped."""

    def __init__(
        self, embedder: Embedder, load: LoadFn, write: WriteFn, options: PipelineOptions
    ) -> None:
        super().__init__(embedder.batcher, load, write, options)
        self._embedder = embedder
        self._result = RunResult()
        self._lock = threading.Lock()
        self._done: Set[str] = frozenset()

    @property
    def provider(self) -> str:
        """What the session really runs on."""
        return self._embedder.info.provider

    def run(
        self,
        items: Sequence[Item],
        progress: ProgressFn | None = None,
        done: Set[str] = frozenset(),
    ) -> RunResult:
        """Embed and write ``items``; batches whose ids are all in ``done`` are skipped."""
        start = time.perf_counter()
        self._done = done
        batches: queue.Queue[Any] = queue.Queue(maxsize=self._opts.prefetch)
        writes: queue.Queue[Any] = queue.Queue(maxsize=self._opts.prefetch)
        reader = _Worker(self._read, items, batches)
        writer = _Worker(self._drain, writes, progress)
        reader.start()
        writer.start()
        try:
            for batch in _until_done(batches, reader):
                outputs = self._infer(batch) if batch.items else []
                if not _put_alive(writes, (batch, outputs), writer):
                    break
        finally:
            reader.stop()
            _put_alive(writes, _DONE, writer)
            writer.join()
            reader.join()
        writer.reraise()
        self._result.seconds = time.perf_counter() - start
        return self._result

    # -- stages ----------------------------------------------------------------------------

    def _read(self, items: Sequence[Item], out: queue.Queue[Any], stop: threading.Event) -> None:
        with ThreadPoolExecutor(max_workers=self._opts.workers) as pool:
            for chunk in self.windows(items):
                if stop.is_set():
                    break
                if all(item.item_id in self._done for item in chunk):
                    with self._lock:
                        self._result.reused += len(chunk)
                    _put(out, Batch([], [], len(chunk)), stop)
                    continue
                for batch in self._assemble(chunk, pool):
                    _put(out, batch, stop)
        _put(out, _DONE, stop)

    def _assemble(self, chunk: Sequence[Item], pool: ThreadPoolExecutor) -> list[Batch]:
        """Decode a window of items in parallel and cut it into batches as the model wants."""
        loaded = list(pool.map(lambda item: load_one(self._load, item), chunk))
        batches, failures = assemble(chunk, loaded, self._batcher, self._opts)
        for item, reason in failures:  # recorded here, in input order
            self._fail(item, reason)
        return batches

    def _infer(self, batch: Batch) -> list[ItemOutputs | None]:
        outputs = infer(self._embedder, batch)
        for item, out in zip(batch.items, outputs, strict=True):
            if isinstance(out, str):
                self._fail(item, out)
        return [None if isinstance(out, str) else out for out in outputs]

    def _drain(self, writes: queue.Queue[Any], progress: ProgressFn | None, _: Any) -> None:
        while (entry := writes.get()) is not _DONE:
            batch, outputs = entry
            for item, out in zip(batch.items, outputs, strict=True):
                if out is not None and self._write_one(item, out):
                    with self._lock:
                        self._result.written += 1
            if progress:
                progress(len(batch.items) + batch.skipped)

    def _write_one(self, item: Item, out: ItemOutputs) -> bool:
        reason = write_checked(self._write, item, out)
        if reason is not None:
            self._fail(item, reason)
        return reason is None

    def _fail(self, item: Item, reason: str) -> None:
        with self._lock:
            record_failure(self._result, item, reason, self._opts.on_error)


def write_checked(write: WriteFn, item: Item, out: ItemOutputs) -> str | None:
    """Write one item's outputs; the reason when they are not finite or cannot be written."""
    if not all(np.isfinite(v).all() for v in out.values()):
        return "the model returned NaN or infinite values"
    try:
        write(item.item_id, out)
    except DataError as e:
        return str(e)
    return None


def record_failure(result: RunResult, item: Item, reason: str, on_error: str) -> None:
    """Count a bad item; with ``on_error: fail`` the run stops here."""
    result.errors.append(ItemError(item.item_id, item.origin, reason))
    if on_error == "fail":
        raise DataError(
            f"item {item.item_id!r} ({item.origin}): {reason}\n"
            "Hint: set runtime.on_error: skip to record bad items and go on."
        )


@dataclass(frozen=True)
class Failed:
    """An item its loader could not decode, and why."""

    reason: str


def load_one(load: LoadFn, item: Item) -> Any:
    """The decoded item, or :class:`Failed` with the reason."""
    try:
        return load(item)
    except DuchoError as e:
        return Failed(str(e).removeprefix(f"{item.origin}: "))


def assemble(
    chunk: Sequence[Item], loaded: Sequence[Any], batcher: Batcher, options: PipelineOptions
) -> tuple[list[Batch], list[tuple[Item, str]]]:
    """A decoded window cut into batches as the model wants, and its items that failed."""
    ok = [(i, p) for i, p in zip(chunk, loaded, strict=True) if not isinstance(p, Failed)]
    failures = [(i, p.reason) for i, p in zip(chunk, loaded, strict=True) if isinstance(p, Failed)]
    payloads = batcher.tokenize([p for _, p in ok])
    plan = batcher.plan(payloads, options.batch_size, options.token_budget)
    batches = [Batch([ok[i][0] for i in idx], [payloads[i] for i in idx]) for idx in plan]
    if not batches:
        return [Batch([], [], len(failures))], failures
    batches[0].skipped = len(failures)
    return batches, failures


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


class _Worker(threading.Thread):
    """A stage thread that keeps its exception for the main thread to re-raise."""

    def __init__(self, target: Callable[..., None], source: Any, sink: Any) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self._args = (source, sink)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn(*self._args, self.stop_event)
        except BaseException as e:
            self.error = e
            if isinstance(self._args[1], queue.Queue):
                _put(self._args[1], _DONE, threading.Event())

    def stop(self) -> None:
        self.stop_event.set()

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


def _put(q: queue.Queue[Any], value: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(value, timeout=0.1)
            return
        except queue.Full:
            continue


def _put_alive(q: queue.Queue[Any], value: Any, consumer: threading.Thread) -> bool:
    """Put unless the consumer has died (its error is re-raised by the caller)."""
    while consumer.is_alive():
        try:
            q.put(value, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _until_done(batches: queue.Queue[Any], reader: _Worker) -> Iterator[Batch]:
    while (batch := batches.get()) is not _DONE:
        yield batch
    reader.reraise()
