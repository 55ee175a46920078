"""The batch pipeline: readers -> bounded queue -> ONNX Runtime -> writer threads.

Readers decode a batch on a thread pool (PIL and tokenizers release the GIL; images and audio
in worker processes with ``runtime.readers: processes``, see :mod:`decoders`) and build its
graph inputs (on CUDA: staged on the device) while the model runs the previous one; a writer
copies a batch's outputs back and saves them while the model runs the next (more writers
take batches at once where they fall behind the model: :func:`writer_plan`). Several models
over the same items share the readers: each item is decoded once, in windows that hold a
whole number of each model's windows. A bad item is recorded and skipped (or, with
``on_error: fail``, stops the run); the items around it go on.

Items are read in windows cut at fixed positions of the full item list: one batch for images
and audio, ``TEXT_WINDOW_BATCHES`` batches for texts, which are tokenized by the readers and
sorted by length inside their window into batches within a token budget (dynamic padding
wastes little). A resumed run skips the windows whose items are all complete and runs the
others whole, so every feature comes from the same batch an uninterrupted run would have put
it in: the files end byte-identical.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from ducho_fast.data.items import FileStamp, Item, ItemError
from ducho_fast.data.sources import ImageLoader, Loader
from ducho_fast.data.text.deferred import TableTexts
from ducho_fast.errors import ConfigError, DataError, DuchoError
from ducho_fast.progress import ProgressFn
from ducho_fast.runtime.batcher import (
    AHEAD_ITEMS_PER_WORKER,
    AUTO_TOKENS_PER_ROW,
    Batcher,
    window_size,
)
from ducho_fast.runtime.batches import Batch, collect, launch, prepare
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.decoders import (
    DecoderPool,
    DecoderStartError,
    items_processable,
    loaders_processable,
)
from ducho_fast.runtime.embedder import Embedder, ItemOutputs
from ducho_fast.runtime.loading import Failed, failed, load_each
from ducho_fast.runtime.shard import Shard
from ducho_fast.runtime.stages import (
    DONE,
    Lane,
    Timing,
    Worker,
    Writers,
    finish,
    merge_timing,
    put,
    wait_for,
)

LoadFn = Callable[[Item], Any]
WriteFn = Callable[[str, ItemOutputs], None]


@dataclass
class RunResult:
    """What one model's run over one input did."""

    written: int = 0
    reused: int = 0  # complete from an earlier run, skipped
    errors: list[ItemError] = field(default_factory=list)
    seconds: float = 0.0
    timing: Timing | None = None  # None where not measured (Ray runs models in actors)

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
    sort_window: int = 0  # text: batches per length-sorted window; 0: TEXT_WINDOW_BATCHES
    readers: str = "threads"  # images, audio: threads | processes (see use_processes)
    writers: int = 0  # threads saving features; 0: as many as needed (writer_plan)


def use_processes(readers: str, loaders: Sequence[Loader]) -> bool:
    """Whether the readers decode in worker processes (:mod:`ducho_fast.runtime.decoders`):
    with ``readers: processes``, for image and audio files; texts are always tokenized in
    threads."""
    return readers == "processes" and loaders_processable(loaders)


# Models share decoding when a window holding a whole number of each one's windows (their
# least common multiple) is at most this many times the largest: batch sizes 32 and 64 share
# windows of 64; 7 and 9 (63 > 4 x 9) run apart.
SHARED_WINDOW_FACTOR = 4


class WindowedRun:
    """What both engines share: items read in windows at fixed positions of the item list
    (all of them, or a shard's), batched as ``batcher`` says."""

    def __init__(self, batcher: Batcher, options: PipelineOptions):
        self._batcher = batcher
        self._opts = _own_options(options, options.batch_size)

    @property
    def window(self) -> int:
        """Items per window: one batch, or ``sort_window`` batches of texts."""
        return window_size(
            self._batcher.sorts_by_length, self._opts.batch_size, self._opts.sort_window
        )

    def windows(self, items: Sequence[Item]) -> Iterator[Sequence[Item]]:
        """This run's windows of ``items``, in order."""
        shard = self._opts.shard
        for w, begin in enumerate(range(0, len(items), self.window)):
            if shard is None or shard.owns(w):
                yield items[begin : begin + self.window]


def shared_window(windows: Sequence[int]) -> int | None:
    """The window of models whose own windows are ``windows``: the smallest that holds a
    whole number of each, so every model gets the batches it would get alone; None when that
    is over ``SHARED_WINDOW_FACTOR`` times the largest (they run apart)."""
    common = math.lcm(*windows)
    return common if common <= SHARED_WINDOW_FACTOR * max(windows) else None


@dataclass
class Member:
    """One model of a :class:`Pipeline`: its session, how its inputs are read, its writer."""

    embedder: Embedder
    loader: Loader
    write: WriteFn
    done: Set[str] = frozenset()  # ids complete from an earlier run
    result: RunResult = field(default_factory=RunResult)
    batch_size: int = 0  # 0: the pipeline's


class Pipeline(WindowedRun):
    """Models over one list of items, with decode, model and write overlapped.

    The models of one pipeline share their decoding: items are read in windows holding a
    whole number of each model's own windows (:func:`shared_window`); each item is read and
    decoded once (``Loader.decode``), then finished (resized, resampled, cleaned) once per
    distinct ``Loader.finish_key``. Each model cuts the window into its own windows and
    batches, so it gets the batches it would get alone and writes the files of a separate run.
    """

    def __init__(self, members: Sequence[Member], options: PipelineOptions) -> None:
        if not members:
            raise ValueError("a pipeline needs at least one model")
        super().__init__(members[0].embedder.batcher, options)
        self._member_opts = [
            _own_options(options, m.batch_size or options.batch_size) for m in members
        ]
        self._member_windows = [
            window_size(m.embedder.batcher.sorts_by_length, o.batch_size, o.sort_window)
            for m, o in zip(members, self._member_opts, strict=True)
        ]
        shared = shared_window(self._member_windows)
        if shared is None or len({m.loader.decode_key for m in members}) != 1:
            raise ValueError("the models of one pipeline must share their windows and decoding")
        self._shared_window = shared
        self.members = list(members)
        self._lock = threading.Lock()
        self._progress_lock = threading.Lock()
        self._writer_cpu = 0.0  # the writer threads' CPU time in the last run

    @property
    def window(self) -> int:
        """Items per window: a whole number of each model's windows."""
        return self._shared_window

    @property
    def providers(self) -> list[str]:
        """What each model's session really runs on."""
        return [m.embedder.info.provider for m in self.members]

    def run(
        self,
        items: Sequence[Item],
        progress: ProgressFn | None = None,
        table: TableTexts | None = None,
    ) -> list[RunResult]:
        """Embed and write ``items`` with every model; per model, windows whose ids are all
        in its ``done`` are skipped. Progress counts items once, however many models.
        ``table``: where the texts of items that hold their digests are read (see
        :class:`TableTexts`), as their windows come."""
        start = time.perf_counter()
        batches: queue.Queue[Any] = queue.Queue(maxsize=self._opts.prefetch)
        writes: queue.Queue[Any] = queue.Queue(maxsize=self._opts.prefetch)
        read = partial(self._read, table=table)
        reader = Worker(read, items, batches, "ducho-reader")
        writers = Writers(self._drain, writes, progress, cpus=cpu_quota())
        self._writer_cpu = 0.0
        reader.start()
        lanes: list[Lane] = []
        stop = threading.Event()
        written = start  # when the writers had written every batch
        try:
            for member in self.members:
                # A session created ahead of the run fails here, not as a failed batch.
                member.embedder.ready()
            writers.start(*writer_plan(self._opts.writers))
            count = min(m.embedder.lanes for m in self.members)
            stages = (batches, reader, writers)
            lanes = [Lane(k, start, stages, stop, launch) for k in range(count)]
            for lane in lanes[1:]:
                lane.start()
            lanes[0].run()  # on this thread
        finally:
            stop.set()
            reader.stop()

            def writers_done() -> None:
                nonlocal written
                writers.wait()
                written = time.perf_counter()

            finish(
                *(partial(wait_for, lane) for lane in lanes[1:]),
                writers.end,
                writers_done,
                partial(wait_for, reader),
            )
        for lane in lanes:
            lane.reraise()
        writers.reraise()
        seconds = time.perf_counter() - start
        waits = merge_timing([lane.waits for lane in lanes])
        for member in self.members:
            busy = sum(lane.busy.get(id(member), 0.0) for lane in lanes) / len(lanes)
            ups = [w for lane in lanes if (w := lane.warm_up(id(member))) is not None]
            member.result.seconds = seconds
            member.result.timing = replace(
                waits,
                model=busy,
                writer_cpu=self._writer_cpu,
                writers=len(writers.threads),
                writers_added=writers.added,
                last_writes=max(0.0, written - max((lane.ended for lane in lanes), default=start)),
                warm_up=sum(ups) / len(ups) if ups else None,
            )
        # Lanes finish batches out of order, and texts are batched by length.
        sort_errors([m.result for m in self.members], items)
        return [m.result for m in self.members]

    # -- stages ----------------------------------------------------------------------------

    def _read(
        self,
        items: Sequence[Item],
        out: queue.Queue[Any],
        stop: threading.Event,
        table: TableTexts | None = None,
    ) -> None:
        """Read, decode and cut windows into batches, ahead of the queue: the next windows
        (:meth:`windows_ahead`) are read by ``pool``'s workers, each for a thread of its own,
        while this one's batches wait for room. A text window is 64 batches; read one after
        the other, the next one's tokenizing would start only when ``prefetch`` batches were
        left to run, and a model faster than that (a GPU) would wait for it at every window.
        An image window is one batch, whose slowest items the workers would otherwise idle
        beside: images are read several windows ahead. A window that some model embeds gets
        its texts from ``table`` first, if its items hold their digests."""
        decoders = self._decoders(len(items))
        texts = table.cursor() if table is not None else None
        depth = self.windows_ahead()
        workers = ThreadPoolExecutor(
            max_workers=self._opts.workers, thread_name_prefix="ducho-decode"
        )
        ahead = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="ducho-window")
        try:
            with workers as pool, ahead:
                pending: deque[Future[list[tuple[Member, Batch]]]] = deque()
                for chunk in self.windows(items):
                    if stop.is_set():
                        break
                    windows = list(self._own_windows(chunk))
                    if texts is not None and any(known is None for *_, known in windows):
                        chunk = texts.fill(chunk)
                        windows = [
                            (k, at, chunk[at : at + len(own)], known)
                            for k, at, own, known in windows
                        ]
                    pending.append(ahead.submit(self._assemble, chunk, windows, pool, decoders))
                    if len(pending) > depth:
                        self._queue(pending.popleft().result(), out, stop)
                while pending and not stop.is_set():
                    self._queue(pending.popleft().result(), out, stop)
            put(out, DONE, stop)  # the model need not wait for the decoder processes' end
        finally:
            if texts is not None:
                texts.close()
            if decoders is not None:
                decoders.close()

    def windows_ahead(self) -> int:
        """Windows read beside the one whose batches are being queued: for images enough to
        give each worker ``AHEAD_ITEMS_PER_WORKER`` items, so the workers that finish a
        window's fast items go on with the next windows' while its slowest finish; one for
        texts (a window is ``sort_window`` batches) and audio (a clip can be minutes long:
        38 MB for ten minutes at 16 kHz, and reading audio ahead was not measured)."""
        if not all(isinstance(m.loader, ImageLoader) for m in self.members):
            return 1
        return max(1, math.ceil(self._opts.workers * AHEAD_ITEMS_PER_WORKER / self.window))

    def _decoders(self, items: int) -> DecoderPool | None:
        """Worker processes for the readers where :func:`use_processes` says so, started, no
        more than there are ``items`` (each costs a Python start: 200 took 24 s for 9
        images); None: threads. Processes that cannot start stop the run, saying why."""
        if not use_processes(self._opts.readers, [m.loader for m in self.members]):
            return None
        pool = DecoderPool(max(1, min(self._opts.workers, items)))
        try:
            pool.start()
        except DecoderStartError as e:
            raise ConfigError(
                f"runtime.readers: processes: the decoder processes could not start ({e}; "
                "their error is printed above).\nHint: set runtime.readers: threads."
            ) from e
        return pool

    def _queue(
        self, batches: list[tuple[Member, Batch]], out: queue.Queue[Any], stop: threading.Event
    ) -> None:
        for member, batch in batches:
            if stop.is_set():
                return
            # Built (on CUDA: staged on the device) just before it is queued, so at most
            # ``prefetch`` + 1 batches hold inputs, however long the window.
            batch.prepared = prepare(
                member.embedder, batch, member.batch_size or self._opts.batch_size
            )
            put(out, (member, batch), stop)

    def todo(self, items: Sequence[Item]) -> int:
        """How many of this run's items some model still embeds: the progress counts these,
        not the items complete from an earlier run."""
        count = 0
        for chunk in self.windows(items):
            used = [False] * len(chunk)
            for _, start, own, known in self._own_windows(chunk):
                if known is None:
                    used[start : start + len(own)] = [True] * len(own)
            count += sum(used)
        return count

    def _own_windows(self, chunk: Sequence[Item]) -> Iterator[OwnWindow]:
        """Each model's own windows within ``chunk``: (model, start, items, settled), where
        settled is None for a window the model still needs (see :func:`settled`)."""
        for k, (member, size) in enumerate(zip(self.members, self._member_windows, strict=True)):
            for start in range(0, len(chunk), size):
                own = chunk[start : start + size]
                yield k, start, own, settled(own, member.done, member.loader)

    def _assemble(
        self,
        chunk: Sequence[Item],
        windows: list[OwnWindow],
        pool: ThreadPoolExecutor,
        decoders: DecoderPool | None = None,
    ) -> list[tuple[Member, Batch]]:
        """Decode a window once for the models that need its items, then cut each model's
        windows into batches as it wants. An item moves the progress once: with the batch of
        the last model that needs it (not at all when none does, see :meth:`todo`). A model's
        settled windows are not read: their items count as reused or fail as they did."""
        users: list[list[int]] = [[] for _ in chunk]
        for k, start, own, known in windows:
            if known is None:
                for position in range(start, start + len(own)):
                    users[position].append(k)

        def load(position: int) -> dict[int, Any]:
            ks = users[position]
            loaders = [self.members[k].loader for k in ks]
            return dict(zip(ks, load_each(loaders, chunk[position]), strict=True))

        needed = [position for position, ks in enumerate(users) if ks]
        if decoders is not None and items_processable([chunk[p] for p in needed]):
            pairs = [([self.members[k].loader for k in users[p]], chunk[p]) for p in needed]
            results = decoders.map(pairs, slice_size(len(needed), self._opts.workers))
            decoded = [
                dict(zip(users[p], each, strict=True))
                for p, each in zip(needed, results, strict=True)
            ]
        else:
            decoded = map_in_slices(pool, load, needed, self._opts.workers)
        by_position = dict(zip(needed, decoded, strict=True))
        loaded = [by_position.get(position, {}) for position in range(len(chunk))]
        last = {id(item): max(ks, default=-1) for item, ks in zip(chunk, users, strict=True)}
        out: list[tuple[Member, Batch]] = []
        for k, start, own, known in windows:  # failures recorded in input order
            member, options = self.members[k], self._member_opts[k]
            if known is not None:
                with self._lock:
                    member.result.reused += len(own) - len(known)
                for item, failed in known:
                    self._fail(member, item, failed.reason, failed.stamp)
                continue
            payloads = [loaded[start + i][k] for i in range(len(own))]
            batches, failures = assemble(own, payloads, member.embedder.batcher, options)
            for item, failed in failures:
                self._fail(member, item, failed.reason, failed.stamp)
            for batch in batches:
                batch.ticks = sum(last[id(item)] == k for item in batch.items)
            batches[0].ticks = (batches[0].ticks or 0) + sum(
                last[id(item)] == k for item, _ in failures
            )
            out += [(member, b) for b in batches]
        return out

    def _drain(self, writes: queue.Queue[Any], progress: ProgressFn | None, _: Any) -> None:
        began = time.thread_time()
        try:
            while (entry := writes.get()) is not DONE:
                member, batch, ran = entry
                outs = collect(member.embedder, batch, ran)
                for item, out in zip(batch.items, outs, strict=True):
                    if isinstance(out, str):
                        self._fail(member, item, out)
                    elif self._write_one(member, item, out):
                        with self._lock:
                            member.result.written += 1
                ticks = len(batch.items) + batch.skipped if batch.ticks is None else batch.ticks
                if progress and ticks:
                    with self._progress_lock:
                        progress(ticks)
        finally:
            with self._lock:
                self._writer_cpu += time.thread_time() - began

    def _write_one(self, member: Member, item: Item, out: ItemOutputs) -> bool:
        reason = write_checked(member.write, item, out)
        if reason is not None:
            self._fail(member, item, reason)
        return reason is None

    def _fail(
        self, member: Member, item: Item, reason: str, stamp: FileStamp | None = None
    ) -> None:
        with self._lock:
            record_failure(member.result, item, reason, self._opts.on_error, stamp)


def settled(
    window: Sequence[Item], done: Set[str], loader: Loader
) -> list[tuple[Item, Failed]] | None:
    """None if the window must be read and run; else it is settled: each item is complete
    from an earlier run, or fails without reading anything (``Loader.check_listed``: a row
    with no text, an empty or missing file, a file recorded as unreadable and unchanged since),
    and those are returned with why. Without this, one blank text among 512 made every resumed
    run embed its window again."""
    known = []
    for item in window:
        if item.item_id in done:
            continue
        try:
            loader.check_listed(item)
        except DuchoError as e:
            known.append((item, failed(item, e)))
            continue
        return None
    return known


# Writer threads that ``runtime.writers: 0`` may grow to: one thread saving one file at a
# time bounded a run on a GPU (benchmarks/RESULTS.md, "On a GPU again"), and on 2 CPUs beside
# 8 decoding threads 8 writers saved 2.1x the files/s of one, 4 writers 1.9x. The 8 is also
# written in config/defaults.yml, the README and config.options' refusal message.
AUTO_WRITERS = 8


def writer_plan(writers: int) -> tuple[int, int]:
    """The writer threads of a run, at its start and at most: ``runtime.writers`` threads,
    or for 0, one, to which the lanes add more (:meth:`Writers.grow`) up to ``AUTO_WRITERS``
    while they find the writers behind and CPUs idle. On the CPUs a model is mostly slower
    than one writer, whose CPU time is taken from the model's, and one stays."""
    return (writers, writers) if writers else (1, AUTO_WRITERS)


def _own_options(options: PipelineOptions, batch_size: int) -> PipelineOptions:
    """A model's options in a shared pipeline: its batch size, and the token budget that
    goes with it when none is set."""
    budget = options.token_budget or batch_size * AUTO_TOKENS_PER_ROW
    return replace(options, batch_size=batch_size, token_budget=budget)


def write_checked(write: WriteFn, item: Item, out: ItemOutputs) -> str | None:
    """Write one item's outputs; the reason when they are not finite or cannot be written."""
    if not all(np.isfinite(v).all() for v in out.values()):
        return "the model returned NaN or infinite values"
    try:
        write(item.item_id, out)
    except DataError as e:
        return str(e)
    return None


def sort_errors(results: Sequence[RunResult], items: Sequence[Item]) -> None:
    """Put each result's failures in input order (``items``'), however they were recorded."""
    if not any(r.errors for r in results):
        return
    position = {item.item_id: k for k, item in reversed(list(enumerate(items)))}
    for result in results:
        result.errors.sort(key=lambda e: position.get(e.item_id, len(items)))


def record_failure(
    result: RunResult, item: Item, reason: str, on_error: str, stamp: FileStamp | None = None
) -> None:
    """Count a bad item (``stamp``: an unreadable file's, see :class:`ItemError`); with
    ``on_error: fail`` the run stops here."""
    result.errors.append(ItemError(item.item_id, item.origin, reason, stamp))
    if on_error == "fail":
        raise DataError(
            f"item {item.item_id!r} ({item.origin}): {reason}\n"
            "Hint: set runtime.on_error: skip to record bad items and go on."
        )


# A model's own window within a shared one: (model, start, items, settled).
OwnWindow = tuple[int, int, Sequence[Item], list[tuple[Item, Failed]] | None]


# Tasks per reader worker per window, at most: a window of 2048 texts (microseconds each to
# read) goes to the pool in slices of 64, not as 2048 tasks (14 us of CPU each here, against
# 0.4 us in slices); a window of 32 images (milliseconds each) still goes one per task.
TASKS_PER_WORKER = 16


def slice_size(count: int, workers: int) -> int:
    """Items per task when ``count`` items go to ``workers``: see ``TASKS_PER_WORKER``."""
    return max(1, count // (max(workers, 1) * TASKS_PER_WORKER))


def map_in_slices(
    pool: ThreadPoolExecutor, fn: Callable[[int], Any], values: Sequence[int], workers: int
) -> list[Any]:
    """``[fn(v) for v in values]`` run on ``pool``, in at most ``TASKS_PER_WORKER`` tasks
    per worker, each a slice of consecutive values."""
    size = slice_size(len(values), workers)
    slices = [values[i : i + size] for i in range(0, len(values), size)]
    parts = pool.map(lambda part: [fn(v) for v in part], slices)
    return [out for part in parts for out in part]


def assemble(
    chunk: Sequence[Item], loaded: Sequence[Any], batcher: Batcher, options: PipelineOptions
) -> tuple[list[Batch], list[tuple[Item, Failed]]]:
    """A decoded window cut into batches as the model wants, and its items that failed."""
    ok = [(i, p) for i, p in zip(chunk, loaded, strict=True) if not isinstance(p, Failed)]
    failures = [(i, p) for i, p in zip(chunk, loaded, strict=True) if isinstance(p, Failed)]
    payloads = batcher.tokenize([p for _, p in ok])
    plan = batcher.plan(payloads, options.batch_size, options.token_budget)
    batches = [Batch([ok[i][0] for i in idx], [payloads[i] for i in idx]) for idx in plan]
    if not batches:
        return [Batch([], [], len(failures))], failures
    batches[0].skipped = len(failures)
    return batches, failures
