"""The model-level object: one artifact, in-memory inputs in, numpy arrays out.

For users who embed the runtime in their own pipelines (a web service, a Spark or Ray job)
with nothing but the core install: no files written, no framework imported.

    >>> emb = ducho_fast.load("local/models/torch-resnet50-…")
    >>> emb.embed(["a.jpg", "b.jpg"])          # (2, 2048) for a pooled layer
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from ducho_fast.artifact import Artifact, load_artifact, varies_per_item
from ducho_fast.config.model import InputOptions, RuntimeOptions
from ducho_fast.config.options import MAX_THREADS, runtime_options
from ducho_fast.config.options import input_options as checked_input_options
from ducho_fast.data.audio.audio import prepare_audio
from ducho_fast.data.text.clean import clear_text
from ducho_fast.data.text.tokenize import Tokens
from ducho_fast.data.visual.images import prepare_image
from ducho_fast.errors import ArtifactError, DataError, allocation_said
from ducho_fast.runtime.batcher import (
    AHEAD_ITEMS_PER_WORKER,
    AUTO_TOKENS_PER_ROW,
    Batcher,
    shape_groups,
    window_size,
)
from ducho_fast.runtime.binding import IOBinder, cuda_pinning
from ducho_fast.runtime.cpu import cpu_quota
from ducho_fast.runtime.memory import MemorySplits, run_fitting, within_limit
from ducho_fast.runtime.session import (
    CPU,
    CUDA,
    PendingSession,
    SessionInfo,
    cuda_device_id,
    for_artifact,
    make_session,
    pads_last_batch,
    requested_providers,
    spins,
)

ItemOutputs = dict[str, np.ndarray]

log = logging.getLogger("ducho_fast")


@dataclass
class Prepared:
    """A batch's graph inputs: per same-shape group, its positions and its feeds (numpy, or
    staged on the device); per item, its token count (texts) for per-token outputs; and
    what they were built from (to run it in parts where it runs out of memory)."""

    parts: list[tuple[list[int], Any]]
    lengths: list[int | None]
    payloads: Sequence[Any] = ()


@dataclass(frozen=True)
class _Ready:
    sessions: list[ort.InferenceSession]  # one per lane, or one all lanes share
    info: SessionInfo
    binder: IOBinder | None


@dataclass
class Launched:
    """A batch the session has run: per group, its positions and its outputs (numpy, or
    still on the device)."""

    parts: list[tuple[list[int], list[Any]]]
    lengths: list[int | None]


class Embedder:
    """Runs one exported model on batches of decoded images or texts."""

    def __init__(
        self,
        artifact: Artifact,
        options: RuntimeOptions | None = None,
        *,
        readers: bool = False,
        pending: PendingSession | None = None,
        lanes: int = 1,
        input_options: InputOptions | Mapping[str, Any] | None = None,
    ) -> None:
        """``readers``: a pipeline's decoding threads share the CPUs with the session.
        ``pending``: this artifact's session, already being created with the same spinning
        and lanes; the embedder waits for it when first used, or in :meth:`ready`.
        ``lanes``: how many batches a pipeline runs at once (:func:`batch_lanes`), each on
        its share of the threads: one session all share when that is one thread (ORT runs a
        one-thread session's work on the calling thread), else one session per lane.
        ``input_options``: how :meth:`prepare` reads files, checked as a config's ``input``
        section is."""
        self.artifact = artifact
        self.input_options = checked_input_options(input_options)
        self.manifest = artifact.manifest
        self._options = options = for_artifact(runtime_options(options), self.manifest)
        self.spinning = spins(options, artifact.modality, readers=readers)
        self._lanes = lanes
        if pending is not None and not pending.serves(
            artifact.model_path, spinning=self.spinning, lanes=lanes, options=options
        ):
            raise ValueError(f"{pending.model} is not the session {artifact.path} needs")
        self._pending = pending
        self._ready: _Ready | None = None
        self.memory_splits = MemorySplits()
        self._lock = threading.Lock()
        if pending is None:
            self.ready()
        self._outputs = list(self.manifest["outputs"])
        # Several layer labels may name one graph output (sentence-transformers).
        self._names = list(dict.fromkeys(str(o["name"]) for o in self._outputs))
        self.batcher = Batcher(artifact)

    def __repr__(self) -> str:
        """What a notebook or a log shows: the model, its layers, its inputs and what it runs
        on (once its session is made; asking does not wait for it)."""
        name = self.name
        made = self._ready
        runs = f"on {made.info.provider}" if made else "session being made"
        precision = self.manifest.get("precision", "fp32")
        return (
            f"<Embedder {name} [{', '.join(self.layers)}]: {self.modality}, {precision}, "
            f"{runs}; {self.artifact.path}>"
        )

    @property
    def name(self) -> str:
        """The model's name (its file's, for a local file), as a log line names it."""
        source = self.manifest.get("source") or {}
        return Path(str(source.get("model_name") or self.artifact.path.name)).name

    def ready(self) -> None:
        """Wait for the session; an error creating it is raised here."""
        self._made()

    def _made(self) -> _Ready:
        if self._ready is None:
            with self._lock:
                if self._ready is None:
                    self._ready = self._make()
        return self._ready

    def _make(self) -> _Ready:
        model, options = self.artifact.model_path, self._options

        def make() -> tuple[ort.InferenceSession, SessionInfo]:
            return make_session(model, options, spinning=self.spinning, lanes=self._lanes)

        session, info = make() if self._pending is None else self._pending.result()
        sessions = [session] * info.lanes
        if info.threads > 1:  # lanes of several threads each: a session (thread pool) each
            sessions[1:] = [make()[0] for _ in range(1, info.lanes)]
        return _Ready(sessions, info, _make_binder(session, info, options))

    @property
    def session(self) -> ort.InferenceSession:
        return self._made().sessions[0]

    @property
    def lanes(self) -> int:
        """How many batches may run at once: each ``launch`` with its own ``lane``."""
        return self._made().info.lanes

    @property
    def info(self) -> SessionInfo:
        return self._made().info

    @property
    def _binder(self) -> IOBinder | None:
        return self._made().binder

    @property
    def modality(self) -> str:
        return self.artifact.modality

    @property
    def layers(self) -> list[str]:
        return [str(o["layer"]) for o in self._outputs]

    @property
    def session_info(self) -> SessionInfo:
        return self.info

    # -- host-side preparation -------------------------------------------------------------

    def prepare(self, raw: Any, sample_rate: int | None = None) -> Any:
        """Decode one raw input (path, array, PIL image, waveform or text) as the readers do.

        Waveform arrays are taken at ``sample_rate`` (the model's when None) and resampled to
        the model's; files say their own rate.
        """
        if self.modality == "visual":
            return prepare_image(raw, self.manifest["preprocessing"], self.input_options)
        if self.modality == "audio":
            pre = self.manifest["preprocessing"]
            return prepare_audio(raw, pre, self.input_options, source_rate=sample_rate)
        if not isinstance(raw, str | Tokens):
            raise DataError(f"text inputs must be strings, found {type(raw).__name__}.")
        if isinstance(raw, str) and not raw.isascii():
            _check_unicode(raw)
        return raw

    def batch_feeds(self, payloads: Sequence[Any]) -> dict[str, np.ndarray]:
        """The graph's inputs for decoded items of one shape (texts: tokenized, padded)."""
        return self.batcher.feeds(payloads)

    # -- batch assembly (see :class:`Batcher`) ------------------------------------------------

    @property
    def sorts_by_length(self) -> bool:
        return self.batcher.sorts_by_length

    def tokenize(self, payloads: Sequence[Any]) -> list[Any]:
        return self.batcher.tokenize(payloads)

    def plan(self, payloads: Sequence[Any], batch_size: int, token_budget: int) -> list[list[int]]:
        return self.batcher.plan(payloads, batch_size, token_budget)

    # -- running: prepare (reader thread), launch (model thread), collect (writer thread) ----

    def prepare_batch(self, payloads: Sequence[Any], batch_size: int = 0) -> Prepared:
        """A batch's graph inputs, built (and with I/O binding, copied to the device) off the
        model's thread. Images or clips of different shapes form same-shape groups: padding
        would change what a convolution or a normalization over the clip sees. ``batch_size``:
        the run's, to which a smaller batch of one shape is padded where the session pads
        one (:func:`pads_last_batch`; rows past the batch's items are never read back)."""
        if self.modality in ("visual", "audio"):
            groups = shape_groups(payloads, range(len(payloads)))
            feeds = [self.batch_feeds([payloads[i] for i in idx]) for idx in groups]
            parts = [
                (idx, padded(f, self._rows(idx, batch_size)))
                for idx, f in zip(groups, feeds, strict=True)
            ]
            lengths: list[int | None] = [None] * len(payloads)
        else:
            tokens = self.tokenize(payloads)
            parts = [(list(range(len(tokens))), self.batch_feeds(tokens))]
            lengths = [len(t) for t in tokens]
        if self._binder is None:
            return Prepared(parts, lengths, payloads)
        staged = [(idx, self._binder.stage(feeds)) for idx, feeds in parts]
        return Prepared(staged, lengths, payloads)

    def _rows(self, group: Sequence[int], batch_size: int) -> int:
        """How many rows a same-shape group of a batch runs as: ``batch_size`` where it is
        smaller and the session pads it, else its own count."""
        if len(group) >= batch_size:
            return len(group)
        # A session asked for on the CPU runs there: no need to wait for it to tell.
        cpu = requested_providers(self._options.device)[0] == CPU
        provider = CPU if cpu else self.info.provider
        return batch_size if pads_last_batch(self._options, self.manifest, provider) else len(group)

    def launch(self, prepared: Prepared, lane: int = 0) -> Launched:
        """Run the session on a prepared batch; with I/O binding the outputs stay on the device.
        ``lane``: which of the :attr:`lanes` runs it (each lane one batch at a time)."""
        names = self._names
        session = self._made().sessions[lane]
        ran = []
        for idx, feeds in prepared.parts:
            if self._binder is None:
                ran.append((idx, session.run(names, feeds)))
            else:
                ran.append((idx, self._binder.run(names, feeds)))
        return Launched(ran, prepared.lengths)

    def collect(self, launched: Launched) -> list[ItemOutputs]:
        """Per-item outputs ``{layer: array}`` of a launched batch, in input order."""
        results: list[ItemOutputs | None] = [None] * len(launched.lengths)
        for idx, values in launched.parts:
            arrays = self._binder.fetch(values) if self._binder is not None else values
            by_name = dict(zip(self._names, arrays, strict=True))
            outputs = [np.asarray(by_name[o["name"]]) for o in self._outputs]
            for row, i in enumerate(idx):
                results[i] = self._item(outputs, row, launched.lengths[i])
        return [r for r in results if r is not None]

    def run_prepared(self, payloads: Sequence[Any]) -> list[ItemOutputs]:
        """Per-item outputs ``{layer: array}`` for decoded images or texts, in input order. A
        batch that runs out of memory runs in halves, and halves of those where they do too
        (:func:`run_fitting`); batches as big as one that did go to halves at once."""
        if not payloads:
            return []
        return run_fitting(self._run_whole, payloads, self.memory_splits, self._say_out_of_memory)

    def _run_whole(self, payloads: Sequence[Any]) -> list[ItemOutputs]:
        return self.collect(self.launch(self.prepare_batch(payloads)))

    def ran_out_of_memory(self, size: int, error: BaseException) -> None:
        """Note that a batch of ``size`` items ran out of memory; the first time, say so."""
        if self.memory_splits.failed(size):
            self._say_out_of_memory(size, error)

    def _say_out_of_memory(self, size: int, error: BaseException) -> None:
        limit = self.info.memory_limit
        within = within_limit(limit, "here")
        log.warning(
            "%s: a batch of %d items ran out of memory %s (%s: %s); batches this big now run "
            "in parts.",
            self.name,
            size,
            within,
            type(error).__name__,
            allocation_said(error),
        )

    def _item(self, outputs: list[np.ndarray], row: int, length: int | None) -> ItemOutputs:
        item: ItemOutputs = {}
        for spec, out in zip(self._outputs, outputs, strict=True):
            value = out[row]
            if spec.get("per_token") and length is not None:
                value = value[:length]
            if spec.get("squeeze"):
                value = np.squeeze(value)
            item[str(spec["layer"])] = np.ascontiguousarray(value, dtype=np.float32)
        return item

    # -- the one-call API ------------------------------------------------------------------

    def embed(
        self,
        inputs: Iterable[Any],
        layer: str | int | None = None,
        *,
        batch_size: int = 32,
        clean: bool = False,
        sample_rate: int | None = None,
        workers: int | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Embed in-memory inputs: images, audio clips or texts.

        Args:
            inputs: a list (or any iterable) of images (paths, open binary files, the
                bytes of image files, uint8 arrays, PIL images), waveforms (paths, arrays at
                ``sample_rate``) or strings, as the artifact takes; or one array stacking
                images (N, H, W, C) or waveforms (N, samples). A bad input raises a
                ``DataError`` that names it by its position, ``inputs[i]``.
            layer: which exported layer to return; the first by default.
            batch_size: items per ONNX Runtime call; texts as ``extract`` batches them,
                sorted by length (results in input order), at most this many per call and
                within ``batch_size`` x 64 tokens.
            clean: apply Ducho's ``clear_text`` to texts first.
            sample_rate: the rate of waveform arrays (audio models; the model's own when
                None), which are resampled to the model's as files are.
            workers: threads that decode and resize images or clips while the session runs
                the batch before (``runtime.workers`` when None, else the usable CPUs).
                Results do not depend on it. Texts are tokenized on the calling thread.

        Returns:
            An ``(N, ...)`` array, or a list of per-item arrays for token-level layers
            (their lengths differ).
        """
        key = str(layer) if layer is not None else self.layers[0]
        if key not in self.layers:
            raise DataError(f"this artifact has no layer {key!r}; it has {self.layers}.")
        self._check_embed_options(batch_size, clean, sample_rate, workers)
        items = self._input_list(inputs)
        if self.sorts_by_length:
            out = self._embed_texts(items, key, batch_size, clean)
        else:
            count = workers or self._options.workers or cpu_quota()
            out = self._embed_read(items, key, batch_size, sample_rate, count)
        spec = next(o for o in self._outputs if str(o["layer"]) == key)
        if varies_per_item(spec):
            return out  # token- or frame-level: one array per item, of its own length
        return np.stack(out) if out else np.empty((0, *_item_shape(spec)), np.float32)

    def _embed_read(
        self, items: list[Any], key: str, batch_size: int, sample_rate: int | None, workers: int
    ) -> list[np.ndarray]:
        """``key``'s output for each image or clip, in input order: ``workers`` threads
        prepare the items (decoding and resizing release the GIL) at most
        :func:`read_ahead` items ahead, so the next batch is being read while the session
        runs one on this thread. The first bad input in input order is raised, as reading
        them one by one would; the reading of those after it is cancelled. A PIL image or
        open file given more than once is read once (a lazily loaded image, or a file's
        position, is not safe to read from two threads at once)."""
        if len(items) == 1:  # nothing to read beside it: a thread would only add its wake-up
            return [
                item[key] for item in self.run_prepared([self._prepared(0, items[0], sample_rate)])
            ]
        out: list[np.ndarray] = []
        ahead = read_ahead(batch_size, workers)
        pending: deque[Future[Any]] = deque()
        submitted = 0
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ducho-embed")
        stateful: dict[int, Future[Any]] = {}  # by id: PIL images and open files

        def fill() -> None:
            nonlocal submitted
            while submitted < len(items) and len(pending) < ahead:
                raw = items[submitted]
                shared = isinstance(raw, Image.Image) or hasattr(raw, "read")
                if shared and id(raw) in stateful:  # one object twice: read once, not at once
                    pending.append(stateful[id(raw)])
                else:
                    pending.append(pool.submit(self._prepared, submitted, raw, sample_rate))
                    if shared:
                        stateful[id(raw)] = pending[-1]
                submitted += 1

        try:
            fill()
            while pending:
                chunk = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
                fill()  # the batches after this one are read while it runs
                out.extend(item[key] for item in self.run_prepared(chunk))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out

    def _embed_texts(
        self, items: list[Any], key: str, batch_size: int, clean: bool
    ) -> list[np.ndarray]:
        """``key``'s output for each text, batched by :meth:`text_batches`, in input order."""
        texts = [self._prepared(i, x) for i, x in enumerate(items)]  # every error up front
        if clean:
            texts = [clear_text(t) for t in texts]
        out: list[np.ndarray] = [np.empty(0)] * len(texts)
        for positions, tokens in self.text_batches(texts, batch_size):
            for i, item in zip(positions, self.run_prepared(tokens), strict=True):
                out[i] = item[key]
        return out

    def text_batches(
        self, texts: Sequence[Any], batch_size: int, sort_window: int = 0, token_budget: int = 0
    ) -> Iterator[tuple[list[int], list[Any]]]:
        """Texts batched as ``extract`` batches them: (positions in ``texts``, their tokens)
        per batch, in windows of ``sort_window`` batches (0: ``TEXT_WINDOW_BATCHES``), each
        window sorted by length and cut within ``token_budget`` tokens (0: ``batch_size`` x
        ``AUTO_TOKENS_PER_ROW``), as ``runtime.sort_window`` and ``token_budget`` say. In
        input order, a batch is padded to its longest text: 1024 generated descriptions
        (``benchmarks/text.py``'s) ran through ``embed`` at 38-41 texts/s that way, 130-140/s
        sorted (all-MiniLM-L6-v2, fp32, here)."""
        if not whole(batch_size):
            raise DataError(f"batch_size must be a whole number of 1 or more, not {batch_size!r}.")
        window = window_size(True, batch_size, sort_window)
        budget = token_budget or batch_size * AUTO_TOKENS_PER_ROW
        for begin in range(0, len(texts), window):
            tokens = self.tokenize(texts[begin : begin + window])
            for batch in self.plan(tokens, batch_size, budget):
                yield [begin + i for i in batch], [tokens[i] for i in batch]

    def _check_embed_options(
        self, batch_size: Any, clean: Any, sample_rate: Any, workers: Any
    ) -> None:
        if clean and self.modality != "textual":
            raise DataError(f"clean=True cleans texts; this is a {self.modality} model.")
        if sample_rate is not None:
            if self.modality != "audio":
                raise DataError(f"sample_rate is for waveforms; this is a {self.modality} model.")
            if not whole(sample_rate):
                raise DataError(f"sample_rate must be a whole number of Hz, not {sample_rate!r}.")
        if not whole(batch_size):
            raise DataError(f"batch_size must be a whole number of 1 or more, not {batch_size!r}.")
        if workers is not None and not (whole(workers) and workers <= MAX_THREADS):
            raise DataError(
                f"workers must be a whole number from 1 to {MAX_THREADS} (or None: the usable "
                f"CPUs), not {workers!r}."
            )

    def _input_list(self, inputs: Any) -> list[Any]:
        """``embed``'s inputs as a list: any iterable of inputs, or an array stacking them
        (images (N, H, W, C), waveforms (N, samples)); one input alone is an error, not an
        iterable of characters, pixel rows or samples."""
        if isinstance(inputs, np.ndarray):
            self._check_stack(inputs)
        if isinstance(inputs, str | bytes | bytearray | os.PathLike | Image.Image):
            raise DataError(
                f"embed takes a list of inputs, not one {type(inputs).__name__}: pass [input]."
            )
        if isinstance(inputs, Set | Mapping):
            raise DataError(
                f"embed takes an ordered list of inputs, not a {type(inputs).__name__}, so that "
                "row i of the result is inputs[i]: pass a list (sorted(...), or a mapping's "
                "list(values()))."
            )
        try:
            return list(inputs)
        except TypeError:
            raise DataError(
                f"embed takes a list of inputs ({self._takes()}); found {type(inputs).__name__}."
            ) from None

    def _check_stack(self, stack: np.ndarray) -> None:
        kind = {"visual": "image", "audio": "waveform"}.get(self.modality, "text")
        if stack.ndim != {"visual": 4, "audio": 2}.get(self.modality, 1):
            one = "a list of strings" if kind == "text" else f"one {kind} as [array]"
            raise DataError(
                f"embed takes a list of inputs; an array of shape {stack.shape} is not a stack "
                f"of {kind}s (one {kind} per row of its first axis). Pass {one}."
            )
        if kind == "waveform" and stack.shape[0] > stack.shape[1]:
            raise DataError(
                f"embed takes a list of inputs; an array of shape {stack.shape} looks like one "
                "clip, (samples, channels), not a stack of clips, (N, samples): pass [array]."
            )

    def _takes(self) -> str:
        if self.modality == "visual":
            return "image paths, uint8 arrays, PIL images or image file bytes"
        if self.modality == "audio":
            return "audio paths or waveform arrays"
        return "strings"

    def _prepared(self, index: int, raw: Any, sample_rate: int | None = None) -> Any:
        """:meth:`prepare` for ``embed``: an error names the input by its position."""
        try:
            return self.prepare(raw, sample_rate)
        except DataError as e:
            e.args = (f"inputs[{index}]: {e}", *e.args[1:])
            raise


def _check_unicode(text: str) -> None:
    """A DataError where ``text`` holds a lone surrogate, which no tokenizer takes (it raised
    a TypeError naming no input): what decoding bytes with ``errors="surrogateescape"``
    leaves of bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"the text holds {text[e.start]!r} at character {e.start}, half of a UTF-16 pair "
            "and no character (what decoding bytes with errors='surrogateescape' leaves of "
            "bytes that are not UTF-8): decode the text with its real encoding, or drop those "
            "characters."
        ) from e


def padded(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``feeds`` with their last row repeated up to ``rows`` rows; as they are where they
    have as many."""
    return {
        name: value
        if len(value) >= rows
        else np.concatenate([value, np.repeat(value[-1:], rows - len(value), axis=0)])
        for name, value in feeds.items()
    }


def read_ahead(batch_size: int, workers: int) -> int:
    """How many items ``embed`` has read or is reading at once, beside the batch the session
    runs: at least the next batch, and ``AHEAD_ITEMS_PER_WORKER`` a worker beyond the batch
    being gathered, so that no worker idles behind a slow item."""
    return max(2 * batch_size, batch_size + workers * AHEAD_ITEMS_PER_WORKER)


def whole(value: Any) -> bool:
    """Whether ``value`` is an int of 1 or more (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _item_shape(output: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one item's features of a fixed-size output, as :meth:`Embedder.embed`
    returns them (squeezed where the output is saved squeezed)."""
    shape = [int(d) for d in output.get("item_shape") or [output["dim"]]]
    return tuple(d for d in shape if d != 1) if output.get("squeeze") else tuple(shape)


def _make_binder(session: Any, info: SessionInfo, options: RuntimeOptions) -> IOBinder | None:
    """I/O binding: on for CUDA sessions unless ``io_binding: off``; ``on`` forces it on CPU
    too (what the tests use to run its logic without a GPU)."""
    if options.io_binding == "off":
        return None
    if info.provider == CUDA:
        return IOBinder(session, "cuda", cuda_device_id(options.device), pin=cuda_pinning())
    return IOBinder(session, "cpu") if options.io_binding == "on" else None


def load(
    path: str | Path,
    options: RuntimeOptions | None = None,
    input_options: InputOptions | Mapping[str, Any] | None = None,
) -> Embedder:
    """Load one exported artifact directory as an :class:`Embedder`. ``input_options`` (an
    :class:`InputOptions` or a mapping, checked as a config's ``input`` section) say how
    image and audio files are read: ``{"jpeg_decode": "reduced"}`` reads them as a config
    with that setting does."""
    if not isinstance(path, str | os.PathLike):
        raise ArtifactError(
            f"load takes the path of an exported artifact's folder; found {type(path).__name__}."
        )
    # readers: embed's worker threads decode images and audio beside the session
    return Embedder(load_artifact(Path(path)), options, readers=True, input_options=input_options)
