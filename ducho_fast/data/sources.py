"""From a job's input path to checked items, and per-model loaders that decode one item."""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ducho_fast.config.model import InputOptions, Job, ModelSpec
from ducho_fast.data.audio.audio import audio_suffixes, decode_audio, finish_audio, list_audio
from ducho_fast.data.ids import EXACT, Folding, name_folding, unsafe_reason
from ducho_fast.data.items import ELSEWHERE, FileStamp, Item, ItemError
from ducho_fast.data.text.clean import clear_text
from ducho_fast.data.text.deferred import TableTexts, TextDigest, defer
from ducho_fast.data.text.tsv import (
    BadText,
    Reading,
    check_text_table,
    iter_interaction_items,
    iter_text_items,
    resolve_tsv,
)
from ducho_fast.data.visual.images import (
    check_files,
    decode_image,
    finish_image,
    image_suffixes,
    jpeg_draft,
    list_images,
)
from ducho_fast.errors import DataError, UnreadableFile
from ducho_fast.progress import Status

log = logging.getLogger("ducho_fast")


@dataclass
class Items:
    """A job's items with their ids checked: good ones, bad ones, files that were not inputs
    and subfolders that were not read."""

    good: list[Item] = field(default_factory=list)
    bad: list[ItemError] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    # Where the texts of a table read with ``defer_texts`` are read again (see TableTexts).
    texts: TableTexts | None = None


def job_items(
    job: Job,
    keep: Callable[[int], bool] | None = None,
    status: Status | None = None,
    *,
    defer_texts: bool = False,
) -> Items:
    """The job's items, ids checked. ``keep`` (a shard's): whether the good item at a position
    of ``Items.good`` is read by this run; a text job holds :data:`ELSEWHERE` at every other
    place as the table is read (see :func:`table_ids`), so a task holds only its own part of
    a large table. Files are listed whole either way. ``status``: told how far a table's read
    got (see :data:`Status`), and None at its end. ``defer_texts`` (a run without ``keep``):
    a text job's items hold their texts' digests (:class:`TextDigest`), and
    ``Items.texts`` reads the texts again for the windows a run embeds; a shard keeps its
    own texts, a share of the table too small to read it once more for."""
    interactions = job.origin == "interactions"
    folding = output_folding(job)
    if job.modality == "visual":
        listing = list_images(job.input_path)
    elif job.modality == "audio":
        listing = list_audio(job.input_path)
    else:
        path, column, text = job.input_path, job.item_column, job.text_column
        columns = job.interaction_columns

        def rows(reading: Reading | None) -> Iterator[Item]:
            if interactions:
                return iter_interaction_items(path, columns, text, reading)
            return iter_text_items(path, column, text, reading)

        def read(again: str) -> Iterator[Item]:
            return rows(_reading(status, path, again))

        deferred = defer_texts and keep is None
        try:
            if not deferred:
                return table_ids(read, keep, folding, interactions)
            items = table_ids(lambda why: defer(read(why)), keep, folding, interactions)
            items.texts = TableTexts(lambda: rows(None))
            return items
        finally:
            if status is not None:
                status(None)
    items = check_ids(listing.items, listing.ignored, folding=folding)
    items.folders = listing.folders
    if interactions:
        items = _interaction_names(items)
    return items


def output_folding(job: Job) -> Folding:
    """How the file systems of the job's output folders compare names (see ``check_ids``)."""
    roots = (
        [job.output_path]
        if job.text_output_path is None
        else [job.output_path, job.text_output_path]
    )
    return name_folding(roots)


def check_inputs(jobs: Sequence[Job]) -> None:
    """Raise one DataError naming every job whose input is missing, unreadable as a table
    (header, columns) or holds nothing to extract, before any job runs: a typo in the last
    job's path is found in seconds, not after the first jobs' hours of work. Only the start
    of each input is read; a bad row or file deep inside is found when its job runs."""
    problems = []
    for job in jobs:
        try:
            _check_input(job)
        except DataError as e:
            problems.append(f"{job.name}: {e}")
    if problems:
        raise DataError("\n".join(problems))


def _check_input(job: Job) -> None:
    if job.modality in ("visual", "visual_textual"):
        check_files(job.input_path, image_suffixes(), "image")
    elif job.modality == "audio":
        check_files(job.input_path, audio_suffixes(), "audio")
    if job.modality == "visual_textual":
        assert job.text_input_path is not None
        check_text_table(job.text_input_path, job.item_column, job.text_column)
    elif job.modality == "textual":
        interactions = job.origin == "interactions"
        columns = job.interaction_columns
        check_text_table(
            job.input_path, job.item_column, job.text_column, columns, interactions=interactions
        )


# What a run knows of a listed input file when it lists it: (size, st_mtime_ns).
Listed = tuple[int, int]

# Ticks of the file systems whose times are coarse, to which a copy (cp -a, rsync -t) floors
# the times it keeps: whole seconds (exFAT through FUSE, measured here; ext3), 2 s (FAT).
COARSE_TICKS_NS = (10**9, 2 * 10**9)


@dataclass(frozen=True)
class ListedFiles:
    """(size, modification time) of each listed input file of a list of items, by position,
    taken before any is read: recorded with the features (:mod:`ducho_fast.outputs.listed`),
    it tells a file changed while its item was in flight, which the times alone cannot. Two
    int64 arrays, 16 bytes an item, held for the whole run (a dict of tuples took 159 MB per
    million ids). A size of -1: not a file, or one that cannot be stat'ed, left to the reader
    to name the problem."""

    sizes: np.ndarray
    mtimes: np.ndarray

    @classmethod
    def of(cls, items: Sequence[Item]) -> ListedFiles:
        sizes = np.full(len(items), -1, dtype=np.int64)
        mtimes = np.zeros(len(items), dtype=np.int64)
        for k, item in enumerate(items):
            if isinstance(item.raw, os.PathLike):  # a listed file (FilePath), a Path
                try:
                    info = os.stat(item.raw)
                except OSError:
                    continue
                sizes[k], mtimes[k] = info.st_size, info.st_mtime_ns
        return cls(sizes, mtimes)

    def __len__(self) -> int:
        """How many of the items are listed files."""
        return int(np.count_nonzero(self.sizes >= 0))

    def get(self, k: int) -> Listed | None:
        """The item at position ``k``'s file as listed, None if it is no listed file."""
        size = int(self.sizes[k])
        return None if size < 0 else (size, int(self.mtimes[k]))

    def of_ids(self, items: Sequence[Item], ids: Container[str]) -> dict[str, Listed]:
        """``{id: (size, mtime_ns)}`` of the listed files among ``items`` (the list they were
        taken of) whose id is in ``ids``."""
        listed = {}
        for k, item in enumerate(items):
            if item.item_id in ids and (stamp := self.get(k)) is not None:
                listed[item.item_id] = stamp
        return listed


def same_listed(then: Listed, now: Listed) -> bool:
    """Whether a file listed as ``then`` is unchanged now: same size and modification time,
    or a finer time floored to a coarse tick (a copy that kept the times onto such a file
    system). A file changed since has a later time; one put back from an older copy an
    earlier one, even by one tick where times are coarse: a time listed in whole seconds is
    the same only when equal (so a copy from exFAT onto FAT reads its odd seconds as
    changed: embedded again, never reused stale)."""
    if then[0] != now[0]:
        return False
    mtime = now[1]
    if mtime == then[1]:
        return True
    if then[1] % COARSE_TICKS_NS[0] == 0:  # listed where times were coarse already
        return False
    return any(mtime % tick == 0 and mtime <= then[1] < mtime + tick for tick in COARSE_TICKS_NS)


def changed_files(
    listed: Mapping[str, Listed], written: Mapping[str, int], recorded: Mapping[str, Listed]
) -> set[str]:
    """Ids of ``written`` (id: when its feature was written, st_mtime_ns) whose input file
    (``listed`` now) changed since its feature was made: not as ``recorded`` when an earlier
    run listed it, or, with no record (features of an older ducho-fast, or of a run killed
    before it saved its record), modified after the feature was written, as ``make`` tells.
    An image or clip edited in place, whose feature is stale."""
    changed = set()
    for item_id, at in written.items():
        now = listed.get(item_id)
        if now is None:  # not listed now, or no file
            continue
        then = recorded.get(item_id)
        if (now[1] > at) if then is None else not same_listed(then, now):
            changed.add(item_id)
    return changed


def table_changed_after(job: Job, written: Mapping[str, int]) -> Path | None:
    """The job's TSV if it was modified after every feature of ``written`` was: a table does
    not say which rows changed, so a text edited under the same id cannot be found."""
    path = job.text_input_path if job.modality == "visual_textual" else job.input_path
    if path is None or not written:
        return None
    try:
        tsv = resolve_tsv(path)
        return tsv if tsv.stat().st_mtime_ns > max(written.values()) else None
    except (OSError, DataError):
        return None


def _interaction_names(items: Items) -> Items:
    """Ducho's rule for image and audio interactions: the file is ``<user>__<item>.<ext>``."""
    out = Items(bad=items.bad, ignored=items.ignored, folders=items.folders)
    for item in items.good:
        user, sep, rest = item.item_id.partition("__")
        if sep and user and rest:
            out.good.append(item)
            continue
        reason = (
            "bad id: an interaction file is named <user>__<item>.<extension> (two underscores "
            f"between the ids); rename {Path(item.origin).name!r}"
        )
        out.bad.append(ItemError(item.item_id, item.origin, reason))
    return out


def table_ids(
    read: Callable[[str], Iterable[Item]],
    keep: Callable[[int], bool] | None,
    folding: Folding,
    joined: bool = False,
) -> Items:
    """:func:`check_ids` over a table's rows (``read`` reads them from the start; given why
    it reads them again, after the first time). A shard (``keep``) holds nothing of the rows
    other tasks read, not even their ids: it follows duplicates by their names' hashes (8
    bytes a row), and only where two rows' hashes are equal does it read the table again,
    following those names alone. So its result is exactly a plain :func:`check_ids`'s, in
    one pass over a table without repeated ids."""
    if keep is None:
        return check_ids(read(""), [], None, folding, joined=joined)
    hashes: array[int] = array("q")
    rows = read("")
    items = check_ids(rows, [], keep, folding, joined=joined, follow=(), hashes=hashes)
    repeated = _repeated(hashes)
    if not repeated:
        return items
    del items, hashes  # the first pass's texts, before the second reads them again
    log.info("%d id(s) may repeat in the table: reading it again to find them", len(repeated))
    rows = read(f" again, for the {len(repeated)} id(s) that may repeat")
    return check_ids(rows, [], keep, folding, joined=joined, follow=repeated)


def _reading(status: Status | None, path: Path, again: str) -> Reading | None:
    """What tells ``status`` how far a read of the table at ``path`` got (``again``: why
    it is read again, if it is)."""
    if status is None:
        return None

    def said(done: int, size: int) -> None:
        share = 100 * done // size if size else 100
        read = f"{_megabytes(done)} of {_megabytes(size)} MB, {share}%"
        status(f"reading {path.name}{again}: {read}")

    return said


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.0f}" if count >= 10**7 else f"{count / 1e6:.1f}"


def check_ids(
    listed: Iterable[Item],
    ignored: list[Path],
    keep: Callable[[int], bool] | None = None,
    folding: Folding = EXACT,
    *,
    joined: bool = False,
    follow: Container[int] | None = None,
    hashes: array[int] | None = None,
) -> Items:
    """Unsafe and duplicate ids become bad items; the first of duplicates is kept. ``keep``:
    see :func:`job_items`. ``folding``: how the output folders' file system takes names;
    ids it takes as one (``Photo`` and ``photo`` where it ignores case) are duplicates, as
    their feature files would be one file, and ids holding characters it refuses are bad.
    ``joined``: the ids are a table's ``<user>__<item>``, which two different pairs can make
    (``a__b`` and ``c``, ``a`` and ``b__c``); a duplicate's error then says so.
    ``follow``: the hashes (:func:`name_hash`) of the only names checked for duplicates
    (None: all); ``hashes``: where each safe id's name's hash is appended (see
    :func:`table_ids`)."""
    out = Items(ignored=ignored)
    key = folding.key()
    first_seen: dict[str, str] = {}  # id (or its key) -> where it was first seen
    first_ids: dict[str, str] = {}  # with a key: key -> the id first seen under it
    for item in listed:
        item_id = item.item_id
        reason = unsafe_reason(item_id) or folding.refusal(item_id)
        name = item_id if key is None or reason is not None else key(item_id)
        if reason is None and hashes is not None:
            hashes.append(name_hash(name))
        followed = reason is None and (follow is None or name_hash(name) in follow)
        if followed and name in first_seen:
            first = first_ids.get(name, item_id)
            reason = _duplicate(item_id, first, first_seen[name], folding, joined)
        if reason is not None:
            out.bad.append(ItemError(item_id, item.origin, f"bad id: {reason}"))
            continue
        if followed:
            first_seen[name] = item.origin
            if key is not None:
                first_ids[name] = item_id
        out.good.append(item if keep is None or keep(len(out.good)) else ELSEWHERE)
    return out


def name_hash(name: str) -> int:
    """The hash :func:`table_ids` follows names by: Python's own, which a str caches (equal
    for equal names within a process; two names may share one, hence the second pass)."""
    return hash(name)


def _repeated(hashes: array[int]) -> set[int]:
    """The values found more than once in ``hashes`` (sorted in place)."""
    values = np.frombuffer(hashes, dtype=np.int64)
    values.sort()
    same = values[1:] == values[:-1]
    return set(values[1:][same].tolist())


def _duplicate(item_id: str, first: str, origin: str, folding: Folding, joined: bool) -> str:
    if first == item_id and joined and item_id.count("__") > 1:
        return (
            f"duplicate id; first seen at {origin}, which is kept (an interaction's id is "
            "<user>__<item>, so where a user or item id holds '__' two different pairs can "
            "make one id: rename one)"
        )
    if first == item_id:
        return f"duplicate id; first seen at {origin}, which is kept"
    return (
        f"its feature file would be that of {first!r} (first seen at {origin}, which is kept): "
        f"the output folder's file system {folding.describe()}; rename one of them"
    )


# The manifest keys that finishing reads (the rest, normalization, happens in the graph).
IMAGE_FINISH = ("resize", "resize_shortest_edge", "crop", "interpolation")
AUDIO_FINISH = ("sample_rate", "max_seconds", "min_samples")


class Loader:
    """Reads one item for one model in two steps: ``decode`` (read the file, decode it), which
    models with the same ``decode_key`` share, then ``finish`` (resize, resample, clean) for
    this model; models with the same ``finish_key`` share that too."""

    decode_key: Hashable = None
    finish_key: Hashable = None
    # Files an earlier run read and could not decode with this ``decode_key``: (origin, the
    # file's stamp then) -> why. One with the same stamp now fails unread (``check_listed``).
    unreadable: Mapping[tuple[str, FileStamp], str] = {}

    def decode(self, item: Item) -> Any:
        raise NotImplementedError

    def finish(self, decoded: Any, item: Item) -> Any:
        raise NotImplementedError

    def check_listed(self, item: Item) -> None:
        """Raise the error that reading ``item`` would raise where that costs no reading (a
        TSV row with no text, an image or audio file that is gone or empty, or one in
        ``unreadable`` and unchanged since), so a resumed run need not read its window again
        just to fail it. Other bad files must be read to tell."""

    def __call__(self, item: Item) -> Any:
        return self.finish(self.decode(item), item)


class ImageLoader(Loader):
    """Decodes and resizes as the artifact's manifest says (``preprocessing``)."""

    def __init__(self, preprocessing: Mapping[str, Any], options: InputOptions) -> None:
        self.preprocessing = preprocessing
        self.options = options
        self.draft = jpeg_draft(preprocessing, options)
        self.decode_key = ("image", options.exif_orientation, options.max_image_pixels)
        if self.draft:  # the scale depends on the model's size: shared only by equal sizes
            self.decode_key += ("reduced", self.draft)
        self.finish_key = _frozen([preprocessing.get(k) for k in IMAGE_FINISH])

    def decode(self, item: Item) -> Any:
        return decode_image(item.raw, self.options, self.draft)

    def check_listed(self, item: Item) -> None:
        _check_file(self, item)

    def finish(self, decoded: Any, item: Item) -> Any:
        return finish_image(decoded, self.preprocessing)


class AudioLoader(Loader):
    """Decodes, down-mixes, resamples and crops as the artifact's manifest says."""

    def __init__(self, preprocessing: Mapping[str, Any], options: InputOptions) -> None:
        self.preprocessing = preprocessing
        self.options = options
        self.crop = preprocessing.get("max_seconds")
        self.decode_key = ("audio", self.crop, options.max_audio_seconds)
        self.finish_key = _frozen([preprocessing.get(k) for k in AUDIO_FINISH])

    def decode(self, item: Item) -> Any:
        return decode_audio(item.raw, self.crop, self.options)

    def check_listed(self, item: Item) -> None:
        _check_file(self, item)

    def finish(self, decoded: Any, item: Item) -> Any:
        wave, rate = decoded
        return finish_audio(wave, rate, self.preprocessing, item.raw)


class TextLoader(Loader):
    def __init__(self, clean: bool) -> None:
        self.clean = clean
        self.decode_key = ("text",)
        self.finish_key = clean

    def decode(self, item: Item) -> Any:
        text = item.raw
        if isinstance(text, TextDigest):  # never a text to embed (see TextCursor.fill)
            raise RuntimeError(f"{item.origin}: the text was not read again before use")
        if isinstance(text, BadText):
            raise DataError(text.reason)
        if text is None:
            raise DataError("the row has no text column value")
        if not text.strip():
            raise DataError("the text is empty")
        return text

    def finish(self, decoded: Any, item: Item) -> Any:
        return clear_text(decoded) if self.clean else decoded

    def check_listed(self, item: Item) -> None:
        if isinstance(item.raw, TextDigest):
            return  # a text to embed, as it was read (see defer)
        self.decode(item)  # the text is in the listing: decoding reads nothing


def _check_file(loader: Loader, item: Item) -> None:
    """``Loader.check_listed`` for a file. One that is gone or empty (a failed download)
    fails as decoding it would, reading nothing; one recorded as unreadable with the stamp it
    has now fails with the recorded reason."""
    if not isinstance(item.raw, os.PathLike):  # a listed file (FilePath), a Path
        return
    try:
        stamp = FileStamp.of(item.raw)
    except OSError:
        loader.decode(item)
        return
    if stamp.size == 0:
        loader.decode(item)
    reason = loader.unreadable.get((item.origin, stamp))
    if reason is not None:
        raise UnreadableFile(f"{item.origin}: {reason}", stamp)


def _frozen(value: Any) -> Hashable:
    """A hashable copy of a manifest's preprocessing (equal settings, equal keys)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def loader_for(
    spec: ModelSpec, manifest: Mapping[str, Any], options: InputOptions | None = None
) -> Loader:
    """The reader of one model's inputs, from its config entry and its artifact's manifest."""
    if manifest["modality"] == "visual":
        return ImageLoader(manifest["preprocessing"], options or InputOptions())
    if manifest["modality"] == "audio":
        return AudioLoader(manifest["preprocessing"], options or InputOptions())
    return TextLoader(spec.clear_text)
