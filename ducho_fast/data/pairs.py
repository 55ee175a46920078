"""Two-tower inputs: an image folder and a TSV, paired by item id (never by position).

Ducho pairs image i of the sorted folder with TSV row i, which silently mismatches items when
one modality has a missing or extra entry. Here an id present in only one modality is reported
(count and a sample) and, by the block's ``unpaired`` rule, skipped or made an error before any
work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ducho_fast.config.model import Job
from ducho_fast.data.items import Item, ItemError
from ducho_fast.data.sources import check_ids, output_folding
from ducho_fast.data.text.tsv import read_text_items
from ducho_fast.data.visual.images import list_images
from ducho_fast.errors import DataError

SAMPLE = 5


@dataclass
class Pairs:
    """Items of both modalities for the ids they share, in the image folder's order."""

    images: list[Item] = field(default_factory=list)
    texts: list[Item] = field(default_factory=list)
    bad: list[ItemError] = field(default_factory=list)
    unpaired: list[ItemError] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)


def paired_items(job: Job) -> Pairs:
    assert job.text_input_path is not None
    listing = list_images(job.input_path)
    folding = output_folding(job)
    images = check_ids(listing.items, listing.ignored, folding=folding)
    rows = read_text_items(job.text_input_path, job.item_column, job.text_column)
    texts = check_ids(rows, [], folding=folding)
    by_id = {item.item_id: item for item in texts.good}
    image_ids = {item.item_id for item in images.good}
    pairs = Pairs(bad=images.bad + texts.bad, ignored=images.ignored, folders=listing.folders)
    text_name = job.text_input_path.name
    for image in images.good:
        if image.item_id in by_id:
            pairs.images.append(image)
            pairs.texts.append(by_id[image.item_id])
        else:
            reason = f"unpaired: an image but no row in {text_name}"
            pairs.unpaired.append(ItemError(image.item_id, image.origin, reason))
    for text in texts.good:
        if text.item_id not in image_ids:
            reason = f"unpaired: a row in {text_name} but no image in {job.input_path.name}/"
            pairs.unpaired.append(ItemError(text.item_id, text.origin, reason))
    if pairs.unpaired and job.unpaired == "fail":
        raise DataError(unpaired_message(job, pairs.unpaired))
    return pairs


def unpaired_message(job: Job, unpaired: list[ItemError]) -> str:
    shown = ", ".join(repr(e.item_id) for e in unpaired[:SAMPLE])
    more = f" and {len(unpaired) - SAMPLE} more" if len(unpaired) > SAMPLE else ""
    return (
        f"'{job.name}': {len(unpaired)} id(s) are in only one modality ({shown}{more}); "
        f"images in {job.input_path}, texts in {job.text_input_path}.\n"
        "Hint: set unpaired: skip on the block to extract the ids both modalities share."
    )
