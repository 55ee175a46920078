"""Readers in processes (``runtime.readers: processes``): image and audio files decoded by
worker processes beside the pipeline.

What it is for: a file that crashes its decoder (a native library's fault on a malformed image
or audio file) kills a worker, not the run: the item fails alone and the run goes on. With
reader threads the whole process dies.

What it is not, measured: faster. On 16 CPUs (the device tool's H100 machines; one machine
per figure), 16 processes decoded and resized 2.7x the JPEGs/s of 16 threads given 512
images at once (a ProcessPoolExecutor), and these workers 1.25x given 256 (0.93x and 1.05x
with 4 and 8 workers; ``benchmarks/readers.py``). But inside ``extract`` (1024 JPEGs to a
GPU, alternated with threads on the same machine) they ran 0.43-0.60x the threads'
images/s: 1.1 s went to starting 16 interpreters, and about as long to ending them one after
the other before the run could end (now all at once, after the last batch is queued; not
measured on that machine since). Threads stay the default.

The workers are plain subprocesses of this Python running :func:`main`, not
``multiprocessing``'s: its ``spawn`` and ``forkserver``
workers import the user's ``__main__`` script again (a script calling ``ducho_fast.extract``
without an ``if __name__ == "__main__"`` guard would run again in each), and ``fork`` copies
a process whose other threads may hold ONNX Runtime's and CUDA's locks. A worker reads tasks
from its stdin: (loaders, [(loader indices, item)]) as a pickle behind its length. It writes
each item's :func:`~ducho_fast.runtime.loading.load_each` results the same way on a copy of
its stdout. Its own stdout is pointed at stderr, so nothing a library prints can get into
them.

A worker that dies during a task (a decoder crashing on a file) is replaced. The task's items
are decoded again one per task: the item that kills a worker alone fails as a bad item, and
the items around it are kept.
"""

from __future__ import annotations

import copy
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from concurrent.futures import Future
from typing import IO, Any

from ducho_fast.data.items import Item
from ducho_fast.data.sources import AudioLoader, ImageLoader, Loader

HEADER = struct.Struct("<Q")
READY = b"ducho-fast decoder ready"
# Not ``-m`` this module: importing the package imports it first, and runpy would warn. The
# current folder that ``-c`` puts first on ``sys.path`` is taken off before anything is
# imported: a ``PIL`` or ``numpy.py`` (or another ducho_fast checkout) in the folder a run
# starts from is not what the worker should import. The worker's path is this process's
# (``DecoderPool._spawn``).
WORKER = (
    "import sys; sys.path[:] = [p for p in sys.path if p]; "
    "from ducho_fast.runtime.decoders import main; main()"
)

# The loaders whose items a worker process can decode: files named by path, no state shared
# with the pipeline. Texts are tokenized by the readers' threads (the tokenizer is Rust, and a
# text is microseconds of work: sending it would cost more).
PROCESS_LOADERS = (ImageLoader, AudioLoader)

Task = tuple[tuple[Loader, ...], list[tuple[tuple[int, ...], Item]]]


class DecoderStartError(RuntimeError):
    """The worker processes could not start (their error is on stderr above)."""


class WorkerDied(Exception):
    """A worker's pipe closed during a task: it crashed or was killed."""


def loaders_processable(loaders: Sequence[Loader]) -> bool:
    """Whether worker processes can decode for ``loaders``: image or audio loaders."""
    return all(isinstance(loader, PROCESS_LOADERS) for loader in loaders)


def items_processable(items: Sequence[Item]) -> bool:
    """Whether worker processes can read ``items``: files named by path."""
    return all(isinstance(item.raw, os.PathLike) for item in items)


class DecoderPool:
    """``workers`` decoder processes, each served by a thread of this process that sends it
    one task at a time. :meth:`map` decodes items in order; :meth:`close` ends the processes."""

    def __init__(self, workers: int, command: Sequence[str] | None = None) -> None:
        """``command``: how a worker starts (default: this Python running :func:`main`)."""
        self.workers = max(1, workers)
        self._command = list(command or [sys.executable, "-c", WORKER])
        self._tasks: queue.SimpleQueue[tuple[Task, Future[list[list[Any]]]] | None]
        self._tasks = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * self.workers
        self._lock = threading.Lock()
        self._closed = False
        self._stripped: dict[int, Loader] = {}
        self.restarts = 0

    def start(self) -> None:
        """Start every worker and wait until each has imported what it needs; raise
        :class:`DecoderStartError` where one could not."""
        starting = [self._spawn() for _ in range(self.workers)]
        errors = []
        for k, proc in enumerate(starting):
            try:
                _handshake(proc)
                self._procs[k] = proc
            except WorkerDied as e:
                errors.append(str(e))
        if errors:
            self.close()
            raise DecoderStartError(errors[0])
        for k in range(self.workers):
            thread = threading.Thread(
                target=self._serve, args=(k,), name=f"ducho-decoder-{k}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def map(self, pairs: Sequence[tuple[Sequence[Loader], Item]], per_task: int) -> list[Any]:
        """``[load_each(loaders, item) for loaders, item in pairs]``, decoded by the workers in
        tasks of ``per_task`` items."""
        size = max(1, per_task)
        futures = [self.submit(pairs[begin : begin + size]) for begin in range(0, len(pairs), size)]
        return [out for future in futures for out in future.result()]

    def submit(self, pairs: Sequence[tuple[Sequence[Loader], Item]]) -> Future[list[list[Any]]]:
        """One task: its items' ``load_each`` results, in order, when done."""
        table: list[Loader] = []
        where: dict[int, int] = {}
        entries = []
        for loaders, item in pairs:
            indices = []
            for loader in loaders:
                if id(loader) not in where:
                    where[id(loader)] = len(table)
                    table.append(self._strip(loader))
                indices.append(where[id(loader)])
            entries.append((tuple(indices), item))
        future: Future[list[list[Any]]] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoder processes were closed")
            self._tasks.put(((tuple(table), entries), future))
        return future

    def close(self) -> None:
        """End the workers (each at its next task, or now) and their threads: every worker's
        stdin is closed first, so they shut down at once, not one after the other."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._tasks.put(None)
        for k, thread in enumerate(self._threads):
            thread.join(timeout=5)
            proc = self._procs[k]
            if thread.is_alive() and proc is not None:
                proc.kill()  # stuck in a task (a decoder that hangs): its read ends now
                thread.join(timeout=5)
        procs = [proc for proc in self._procs if proc is not None]
        self._procs = [None] * self.workers
        for proc in procs:
            _close_pipes(proc)
        for proc in procs:
            _end(proc)

    def __enter__(self) -> DecoderPool:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the threads that serve the workers ------------------------------------------------

    def _serve(self, k: int) -> None:
        while (entry := self._tasks.get()) is not None:
            task, future = entry
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._run(k, task))
            except BaseException as e:  # a worker's own error, or one that cannot restart
                future.set_exception(e)

    def _run(self, k: int, task: Task) -> list[list[Any]]:
        try:
            return _exchange(self._worker(k), task)
        except WorkerDied as died:
            self._replace(k)
            table, entries = task
            if len(entries) == 1:
                ((indices, item),) = entries
                return [[_crashed(item, died)] * len(indices)]
            return [self._run(k, (table, [entry]))[0] for entry in entries]

    def _worker(self, k: int) -> subprocess.Popen[bytes]:
        proc = self._procs[k]
        if proc is None:
            if self._closed:  # killed by close(): not started again
                raise RuntimeError("the decoder processes were closed")
            proc = self._spawn()
            try:
                _handshake(proc)
            except WorkerDied as e:
                raise DecoderStartError(f"could not start again: {e}") from e
            self._procs[k] = proc
        return proc

    def _replace(self, k: int) -> None:
        proc = self._procs[k]
        self._procs[k] = None
        if proc is not None:
            _end(proc)
        self.restarts += 1

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = worker_path()
        return subprocess.Popen(
            self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )

    def _strip(self, loader: Loader) -> Loader:
        """``loader`` as a worker needs it: without the files an earlier run could not read,
        which only the pipeline consults (``check_listed``), and which can be many."""
        if id(loader) not in self._stripped:
            light = copy.copy(loader)
            light.unreadable = {}
            self._stripped[id(loader)] = light
        return self._stripped[id(loader)]


def worker_path() -> str:
    """A worker's ``PYTHONPATH``: this process's ``sys.path``, so that it imports ducho_fast
    (and the loaders' modules) from where this process does, installed or not. An empty entry
    (the current folder, for ``python -c`` or a prompt) is named by its absolute path."""
    return os.pathsep.join(p or os.getcwd() for p in sys.path)


def _crashed(item: Item, died: WorkerDied) -> Any:
    from ducho_fast.runtime.loading import Failed

    return Failed(
        f"the decoder process died while reading this file ({died}): a file that crashes "
        "the decoder; check or remove it"
    )


def _handshake(proc: subprocess.Popen[bytes]) -> None:
    """Wait until a new worker says it is ready; :class:`WorkerDied` if it ends first."""
    assert proc.stdout is not None
    try:
        ready = _receive(proc.stdout) == READY
    except WorkerDied:
        ready = False
    if not ready:
        _end(proc)
        raise WorkerDied(f"a decoder process ended before it was ready ({_how(proc)})")


def _how(proc: subprocess.Popen[bytes]) -> str:
    code = proc.wait()
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _exchange(proc: subprocess.Popen[bytes], task: Task) -> list[list[Any]]:
    assert proc.stdin is not None and proc.stdout is not None
    try:
        _send(proc.stdin, pickle.dumps(task, protocol=5))
        status, value = pickle.loads(_receive(proc.stdout))
    except (BrokenPipeError, WorkerDied) as e:
        raise WorkerDied(_how(proc)) from e
    if status != "ok":
        raise RuntimeError(f"a decoder process failed:\n{value}")
    return value


def _send(pipe: IO[bytes], data: bytes) -> None:
    pipe.write(HEADER.pack(len(data)))
    pipe.write(data)
    pipe.flush()


def _receive(pipe: IO[bytes]) -> bytes:
    head = pipe.read(HEADER.size)
    if len(head) < HEADER.size:
        raise WorkerDied("its pipe closed")
    (size,) = HEADER.unpack(head)
    data = pipe.read(size)
    if len(data) < size:
        raise WorkerDied("its pipe closed")
    return data


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    """Close a worker's pipes: it ends at its next read."""
    for pipe in (proc.stdin, proc.stdout):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Close a worker's pipes, then make sure it is gone."""
    _close_pipes(proc)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    """A worker: decode tasks from stdin until it closes."""
    from ducho_fast.runtime.loading import load_each

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the pipeline, which ends us
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed, by Python or a library, goes to stderr
    inp = sys.stdin.buffer
    _send(out, READY)
    while True:
        try:
            table, entries = pickle.loads(_receive(inp))
        except WorkerDied:
            return  # the pipeline closed our stdin: done
        try:
            reply: tuple[str, Any] = (
                "ok",
                [load_each([table[i] for i in indices], item) for indices, item in entries],
            )
        except Exception:
            reply = ("error", traceback.format_exc())
        _send(out, pickle.dumps(reply, protocol=5))
