"""Writes the HEIC files beside this script, which the HEIC tests read (run by hand, with
pillow-heif installed: pi-heif, which the tests use, decodes only).

    python -m tests.data.heic.make

- ``tile.heic``: :func:`source` (64 x 48 pixels), upright.
- ``turned.heic``: the same pixels with EXIF orientation 6 (shown turned 90 degrees
  clockwise), which pillow-heif writes as the container's rotation: read, 48 x 64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def source() -> np.ndarray:
    """A 48 x 64 RGB image (H x W) of smooth gradients and one bright block at the top left,
    which HEVC at quality 95 keeps within a few levels."""
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    image[:12, :16] = (250, 250, 250)
    return image


def main() -> None:
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    image = Image.fromarray(source())
    image.save(HERE / "tile.heic", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(HERE / "turned.heic", quality=95, exif=exif.tobytes())


if __name__ == "__main__":
    main()
