"""What every modality's reader yields: items with ids, and the record of bad ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Item:
    """One thing to embed: its id (the output file stem), where it came from, its raw input."""

    item_id: str
    origin: str
    raw: Any


@dataclass(frozen=True)
class ItemError:
    """A bad item: recorded, counted and reported; the items around it go on."""

    item_id: str
    origin: str
    reason: str
