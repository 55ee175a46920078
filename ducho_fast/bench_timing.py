"""How ``ducho-fast bench`` and the scripts in ``benchmarks/`` time things: systems side by
side in rotated rounds, a session alone as extract runs its model, CPU time with the decoder
processes'."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from ducho_fast.config.model import RuntimeOptions
from ducho_fast.errors import DuchoError, allocation_said, out_of_memory
from ducho_fast.runtime.cpu import family_cpu_time
from ducho_fast.runtime.embedder import Embedder, Prepared
from ducho_fast.runtime.memory import within_limit
from ducho_fast.runtime.stages import finish, wait_for


def alone(options: RuntimeOptions) -> RuntimeOptions:
    """The session alone: its threads spin between ops, as nothing shares their CPUs; on
    CUDA, ``session.run`` on host batches, so its time includes the copies that extract's
    I/O binding overlaps with the model."""
    return replace(options, spin_wait="on", io_binding="off")


def session_alone(embedder: Embedder, batches: list[Prepared]) -> Callable[[], None]:
    """A call that runs ``embedder``'s session alone on ``batches`` (built beforehand) as
    extract runs its model: as many batches at once as it has lanes, each lane taking the
    next batch. The first batch runs once here, untimed (warm-up). A batch that runs out of
    memory runs in parts, as extract runs it (its batches under ``runtime.memory_limit`` fit
    one at a time, but two at once may not). A lane that fails otherwise stops the others,
    and the call raises its error: a lane that ended on an error had left its batches
    untimed, and the session's rate too high."""
    count = embedder.lanes
    if batches:
        launch(embedder, batches[0], 0)

    def run() -> None:
        todo = iter(batches)
        lock = threading.Lock()
        stop = threading.Event()
        errors: list[Exception] = []

        def lane(k: int) -> None:
            while not stop.is_set():
                with lock:
                    batch = next(todo, None)
                if batch is None:
                    return
                try:
                    launch(embedder, batch, k)
                except Exception as e:
                    errors.append(e)
                    stop.set()

        if count == 1:  # on the calling thread
            lane(0)
        else:
            threads = [threading.Thread(target=lane, args=(k,)) for k in range(count)]
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    wait_for(t)  # not join: see wait_for
            finally:  # stopped (Ctrl-C): the lanes end with their batch under way, not after
                stop.set()  # every batch left, which went on after bench said it stopped
                finish(*(partial(wait_for, t) for t in threads))
        if errors:
            raise alone_failed(embedder, errors[0], count) from errors[0]

    return run


def launch(embedder: Embedder, batch: Prepared, lane: int) -> None:
    """Run one batch of the session alone; in parts where it runs out of memory."""
    try:
        embedder.launch(batch, lane)
    except Exception as e:
        payloads = getattr(batch, "payloads", ())
        if not out_of_memory(e) or len(payloads) < 2:
            raise
        embedder.ran_out_of_memory(len(payloads), e)
        embedder.run_prepared(payloads)


def alone_failed(embedder: Embedder, error: Exception, lanes: int) -> Exception:
    """What to raise when the session alone fails on a batch that extract ran: a DuchoError
    where it ran out of memory (extract runs such a batch in parts), else ``error``."""
    if not out_of_memory(error):
        return error
    limit = embedder.info.memory_limit
    within = f" {within_limit(limit, '')}" if limit else ""
    return DuchoError(
        f"{embedder.name}: the session alone ran out of memory{within} "
        f"with {lanes} "
        f"batch{'es' if lanes > 1 else ''} at once ({allocation_said(error)}), on batches "
        "that fitted when it ran them first. Bench with a smaller batch_size for this model "
        "(--set with its key, such as visual.items.model.0.batch_size=N), or with --set "
        "runtime.concurrent_batches=1."
    )


def cpu_seconds() -> float:
    """The CPU time this process has used so far, all its threads, and its child processes
    (:func:`~ducho_fast.runtime.cpu.family_cpu_time`): the decoder processes of
    ``runtime.readers: processes``."""
    return family_cpu_time()


def rounds(
    repeats: int,
    systems: dict[str, Callable[[], Any]],
    cpu: dict[str, list[float]] | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Every system timed once per round, ``repeats`` rounds, the order rotated each round.

    A machine's speed can drift by a quarter within minutes (shared VMs); timing the systems
    side by side, round after round, lets that drift fall on all of them alike, so ratios are
    taken within a round. Returns the seconds per round of each system, and the value of each
    system's last run. ``cpu``, if given, gets each system's CPU seconds per round
    (:func:`cpu_seconds` before and after: every thread of the process, those that the
    libraries start included). ``on_round``, if given, is called after each round with its
    number (from 1) and its seconds per system, in the systems' order: a long run says what
    it has measured so far, and a run stopped before its end has said it.
    """
    names = list(systems)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    values: dict[str, Any] = {}
    for r in range(max(1, repeats)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            began, start = cpu_seconds(), time.perf_counter()
            values[name] = systems[name]()
            seconds[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(cpu_seconds() - began)
        if on_round is not None:
            on_round(r + 1, {name: seconds[name][-1] for name in names})
    return seconds, values
