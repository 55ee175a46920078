"""Loaders for tests/runtime/test_decoders.py, importable by the decoder processes too."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from ducho_fast.data.items import Item
from ducho_fast.data.sources import ImageLoader


class CrashingLoader(ImageLoader):
    """Kills its process (as a decoder crashing on a file would) on items whose id starts with
    ``crash``; raises a plain bug on ``bug``; decodes the rest as :class:`ImageLoader`."""

    def decode(self, item: Item) -> Any:
        if item.item_id.startswith("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if item.item_id.startswith("bug"):
            raise ValueError("a bug in a loader, not a bad file")
        return super().decode(item)


class ChattyLoader(ImageLoader):
    """Prints while it decodes, from Python and straight to file descriptor 1 (as a C
    library's warning would)."""

    def decode(self, item: Item) -> Any:
        print(f"python says {item.item_id}")
        os.write(1, f"C says {item.item_id}\n".encode())
        return super().decode(item)


class HangingLoader(ImageLoader):
    """Never returns on items whose id starts with ``hang`` (a decoder stuck on a file)."""

    def decode(self, item: Item) -> Any:
        if item.item_id.startswith("hang"):
            while True:
                time.sleep(1)
        return super().decode(item)
