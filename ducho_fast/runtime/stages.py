"""The pipeline's stage threads and the queues between them: reader and writer workers (one
reader, one or more writers: :class:`Writers`), and the model lanes, each running one batch at
a time (several at once with ``runtime.concurrent_batches``); how long each waited
(:class:`Timing`)."""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ducho_fast.runtime.cpu import family_cpu_time

DONE = object()  # the last entry of a queue
LaunchFn = Callable[[Any, Any, int], Any]  # (embedder, batch, lane) -> what the writer takes


@dataclass
class Timing:
    """Where a local pipeline's time went, in seconds: until its first batch ran (the
    session made, the first window read), in one model's runs, and waiting after that for the
    readers (reading, decoding, tokenizing) or the writer, and ``last_writes``: from the end
    of the lanes' last batches until the writers had written them (a slow file system, or a
    run of few batches that never filled the writers' queue). ``warm_up``: how much longer
    each lane's first batch of the model ran than its later ones on average (the mean over the
    lanes that ran two or more; None where none did, as nothing then tells): what a session's
    first run does once, such as cuDNN's search for each convolution's algorithm on CUDA
    (``cudnn_conv_algo_search: EXHAUSTIVE``), or texts and clips of other lengths.
    ``writer_cpu``: the CPU time the writer threads used (their own clocks), for every model
    of the pipeline: taken from the CPUs the model runs on, mostly the file system creating one
    file per item, it makes the model slower rather than making it wait."""

    first_batch: float = 0.0
    model: float = 0.0
    inputs: float = 0.0
    writer: float = 0.0
    lanes: int = 1  # batches run at once: model, inputs and writer are the lanes' means
    writer_cpu: float = 0.0
    writers: int = 1  # writer threads at the end (``runtime.writers: 0`` adds them as needed)
    writers_added: int = 0  # of those, added during the run (:meth:`Writers.grow`, ``end``)
    last_writes: float = 0.0
    warm_up: float | None = None


def warm_up(first: float, busy: float, runs: int) -> float | None:
    """How much longer the first of ``runs`` batches ran (``first`` seconds) than the later
    ones on average, ``busy`` seconds being all of theirs; None: fewer than two ran."""
    if runs < 2:
        return None
    return max(0.0, first - (busy - first) / (runs - 1))


class Lane(threading.Thread):
    """Runs batches from the readers' queue, one at a time, with ``launch`` (embedder, batch,
    lane), and hands them to the writer; ``k``: which of the embedders' lanes
    (:attr:`Embedder.lanes`). Lane 0 runs on the pipeline's own thread. A lane that fails, or
    finds the writer gone, sets ``stop``: the others end after their current batch, and the
    run raises what the lane raised."""

    def __init__(
        self, k: int, start: float, stages: Stages, stop: threading.Event, launch: LaunchFn
    ) -> None:
        super().__init__(daemon=True, name=f"ducho-lane-{k}")
        self.k = k
        self._launch = launch
        self._start_time = start
        self._stages = stages
        self._halt = stop
        self.waits = Timing(first_batch=math.inf)
        self.ended = start  # when it handed its last batch to the writers
        self.busy: dict[int, float] = {}  # seconds in each model's runs, by id(member)
        self.runs: dict[int, int] = {}  # each model's batches run (those with items)
        self.first_run: dict[int, float] = {}  # seconds each model's first batch ran
        self.error: BaseException | None = None

    def run(self) -> None:
        batches, reader, writer = self._stages
        try:
            mark = None
            while (entry := next_entry(batches, self._halt)) is not DONE:
                member, batch = entry
                began = time.perf_counter()
                if mark is None:
                    self.waits.first_batch = began - self._start_time
                else:
                    self.waits.inputs += began - mark
                ran = self._launch(member.embedder, batch, self.k) if batch.items else []
                mark = time.perf_counter()
                key = id(member)
                self.busy[key] = self.busy.get(key, 0.0) + mark - began
                if batch.items:
                    self.first_run.setdefault(key, mark - began)
                    self.runs[key] = self.runs.get(key, 0) + 1
                if not writer.put((member, batch, ran)):
                    self._halt.set()  # the writer failed: the run raises its error
                    return
                now = time.perf_counter()
                self.waits.writer += now - mark
                mark = self.ended = now
            if not self._halt.is_set():
                batches.put_nowait(DONE)  # the last entry: passed on to the other lanes
                reader.reraise()
        except BaseException as e:
            self._halt.set()
            self.error = e
            if self.k == 0:
                raise

    def warm_up(self, key: int) -> float | None:
        """How much longer this lane's first batch of the model ``key`` (its ``id``) ran
        than its later ones (:func:`warm_up`); None: fewer than two ran here."""
        runs = self.runs.get(key, 0)
        return warm_up(self.first_run.get(key, 0.0), self.busy.get(key, 0.0), runs)

    def reraise(self) -> None:
        if self.error is not None and self.k != 0:
            raise self.error


class Alive(Protocol):
    """A stage a queue feeds: a thread, or :class:`Writers`."""

    def is_alive(self) -> bool: ...


# What a model lane reads from and writes to: the batches queue and its reader, and the
# writers (their queue in them).
Stages = tuple[queue.Queue[Any], "Worker", "Writers"]


def next_entry(batches: queue.Queue[Any], stop: threading.Event) -> Any:
    """The next entry of ``batches``, or ``DONE`` once ``stop`` is set."""
    while not stop.is_set():
        try:
            return batches.get(timeout=0.1)
        except queue.Empty:
            continue
    return DONE


def merge_timing(waits: list[Timing]) -> Timing:
    """One timing for the lanes of a run: the first batch of any, the rest their mean."""
    if not waits:
        return Timing()
    first = min(w.first_batch for w in waits)
    n = len(waits)
    return Timing(
        first_batch=0.0 if math.isinf(first) else first,
        inputs=sum(w.inputs for w in waits) / n,
        writer=sum(w.writer for w in waits) / n,
        lanes=n,
    )


class Worker(threading.Thread):
    """A stage thread that keeps its exception for the main thread to re-raise; ``name``
    tells it apart in profilers and thread dumps (``ducho-reader``, ``ducho-writer``)."""

    def __init__(self, target: Callable[..., None], source: Any, sink: Any, name: str) -> None:
        super().__init__(daemon=True, name=name)
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
                put(self._args[1], DONE, threading.Event())

    def stop(self) -> None:
        self.stop_event.set()

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


def put(q: queue.Queue[Any], value: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(value, timeout=0.1)
            return
        except queue.Full:
            continue


# Writer threads are added no more often than this, in seconds: each new one gets time to
# show whether the writers still fall behind.
GROW_SPACING = 0.05


class Writers:
    """The writer threads of a run: :class:`Worker` s taking batches from one queue, each
    running ``target(writes, progress, stop)``. One thread saves one file at a time, and each
    of the file system calls of a file gives Python's GIL away: where reader threads keep the
    GIL busy, each call waits up to a switch interval (5 ms) to get it back, and on a GPU one
    writer thread bounded the run. A slow file system (NFS) makes each call wait too. Several
    writers wait at once.

    ``start(count, most)``: ``count`` writers, and up to ``most`` as :meth:`grow` and
    :meth:`end` add them.
    Alive while every writer is: one that failed stops the lanes, as a lone writer's end did;
    the others write what is queued before their end mark."""

    def __init__(
        self,
        target: Callable[..., None],
        writes: queue.Queue[Any],
        progress: Any,
        cpus: int = 1,
        wall: Callable[[], float] = time.perf_counter,
        cpu_time: Callable[[], float] = family_cpu_time,
    ):
        """``wall`` and ``cpu_time``: the clocks :meth:`grow` reads (seconds; CPU seconds of
        this process and its decoder processes)."""
        self._target = target
        self._writes = writes
        self._progress = progress
        self._cpus = cpus
        self._wall = wall
        self._cpu_time = cpu_time
        self._lock = threading.Lock()
        self._most = 0
        self._ended = False
        self._mark = (self._wall(), self._cpu_time())
        self.added = 0
        self.threads: list[Worker] = []

    def start(self, count: int, most: int | None = None) -> None:
        self._most = max(count, most or count)
        names = [self._name(k) for k in range(count)]
        threads = [Worker(self._target, self._writes, self._progress, n) for n in names]
        for thread in threads:
            thread.start()
        self.threads = threads
        self._mark = (self._wall(), self._cpu_time())

    def _name(self, k: int) -> str:
        return "ducho-writer" if self._most == 1 else f"ducho-writer-{k}"

    def grow(self) -> bool:
        """Add a writer where the lanes find the writers behind (the writes queue full): at
        most one every ``GROW_SPACING`` seconds, up to ``most``, and only while the process
        and its child processes (decoder processes) used at least one CPU less than it may
        (``cpus``; half of one where it may use one) since the last look. Writers short
        of the GIL or waiting on the file system leave CPUs idle, and another one helps; where
        the CPUs are all busy (a small model on a few CPUs), another one would only take CPU
        from the model and the readers. Whether one was added."""
        with self._lock:
            if self._ended or len(self.threads) >= self._most:
                return False
            wall = self._wall()
            since_wall = wall - self._mark[0]
            if since_wall < GROW_SPACING:
                return False
            cpu = self._cpu_time()  # here: reading the children's costs ~0.3 ms
            since_cpu = cpu - self._mark[1]
            self._mark = (wall, cpu)
            if since_cpu / since_wall > max(self._cpus - 1, 0.5):
                return False
            self._add()
            return True

    def _add(self) -> None:
        thread = Worker(self._target, self._writes, self._progress, self._name(len(self.threads)))
        thread.start()
        self.threads = [*self.threads, thread]  # a new list: others may be iterating
        self.added += 1

    def put(self, value: Any) -> bool:
        """Queue ``value`` for the writers, adding one first where they are behind (the queue
        full: the caller is about to wait, see :meth:`grow`); False if a writer has died."""
        if self._writes.full():
            self.grow()
        return put_alive(self._writes, value, self)

    def is_alive(self) -> bool:
        threads = self.threads
        return bool(threads) and all(t.is_alive() for t in threads)

    def end(self) -> None:
        """Queue an end mark for each writer, while any is left to take one; none is added
        after this. First, where more batches wait than there are writers (the model is done
        and the rest is writing: a slow file system, or a run of so few batches that the
        queue never filled and :meth:`grow` never ran), add writers up to one a batch, within
        ``most``: with the model done, they take no CPU from it."""
        with self._lock:
            backlog = min(self._most, self._writes.qsize()) - len(self.threads)
            for _ in range(max(0, backlog)):
                self._add()
            self._ended = True
        anyone = _AnyAlive(self.threads)
        for _ in self.threads:
            if not put_alive(self._writes, DONE, anyone):
                return

    def wait(self) -> None:
        for thread in self.threads:
            wait_for(thread)

    def reraise(self) -> None:
        for thread in self.threads:
            thread.reraise()


class _AnyAlive:
    def __init__(self, threads: list[Worker]) -> None:
        self._threads = threads

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)


def finish(*steps: Callable[[], Any]) -> None:
    """Run each clean-up step (a :func:`wait_for`, a last put) to its end, even where Ctrl-C
    lands in one: its KeyboardInterrupt is kept, the step run again, and raised after the
    last. Otherwise a stop that came as a run ended (the main thread waiting for the writer)
    or while the main thread waited for the other lanes left threads running and queued
    features unwritten, after the command had said it stopped. A second KeyboardInterrupt is
    raised at once: one in the same clean-up, or one while the clean-up runs for a
    KeyboardInterrupt already on its way (in a ``finally``). The CLI ends the process at a
    second signal before that; a script calling the API gets its second Ctrl-C."""
    stopping = isinstance(sys.exc_info()[1], KeyboardInterrupt)
    interrupted: KeyboardInterrupt | None = None
    for step in steps:
        while True:
            try:
                step()
                break
            except KeyboardInterrupt as e:
                if stopping or interrupted is not None:
                    raise
                interrupted = e
    if interrupted is not None:
        raise interrupted


def wait_for(thread: threading.Thread) -> None:
    """Wait until ``thread`` ends, where a KeyboardInterrupt may land and the wait be run
    again. Not ``Thread.join``: in Python 3.11 a join that a KeyboardInterrupt interrupts
    marks the live thread as ended (bpo-45274's clean-up releases its lock), so a second join
    returns at once, with the thread still running. Polls ``is_alive`` every 1 ms at first,
    50 ms at most."""
    delay = 0.001
    while thread.is_alive():
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


def put_alive(q: queue.Queue[Any], value: Any, consumer: Alive) -> bool:
    """Put unless the consumer has died (its error is re-raised by the caller)."""
    while consumer.is_alive():
        try:
            q.put(value, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
