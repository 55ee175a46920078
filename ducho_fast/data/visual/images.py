"""Image items: a folder listed in Ducho's order, decoded to uint8 RGB and resized on the host.

The host only decodes and resizes (PIL, bicubic, as Ducho); casting, scaling and normalization
happen inside the graph, so a batch travels as uint8 NHWC.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import re
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import PIL
from PIL import ExifTags, Image, ImageOps, features

from ducho_fast.config.model import InputOptions
from ducho_fast.config.paths import absent
from ducho_fast.data.items import FilePath, FileStamp, Item, error_reason, source_name
from ducho_fast.errors import DataError, decode_error, stamped

# Formats Pillow's wheels read (AVIF from Pillow 11.2); a JPEG saved from a browser may end
# in .jfif or .jpe, a JPEG 2000 in .jp2 or .j2k.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    | {".avif", ".jp2", ".j2k", ".ppm", ".pgm"}
)
# HEIC/HEIF, phones' photo format, is read where a libheif plugin for Pillow is installed:
# pi-heif (decoding only: the `heif` extra) or pillow-heif, whichever is found first. libheif
# applies the container's rotation as it decodes, and the plugin then sets the EXIF
# orientation to upright, so a HEIC photo is turned once, whatever input.exif_orientation says.
HEIF_SUFFIXES = frozenset({".heic", ".heif"})
HEIF_PLUGINS = ("pi_heif", "pillow_heif")
HEIF_INSTALL = "pip install 'ducho-fast[heif]' (pi-heif, a libheif plugin for Pillow)"
# ISO base media "ftyp" brands of HEVC-coded HEIF files, for telling one from other bytes
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis")
_heif_lock = threading.Lock()
_heif_ready: list[bool] = []  # [whether a plugin was registered], once a process has looked


def heif_plugin() -> str | None:
    """The HEIF plugin installed here (its module's name), or None: found, not imported."""
    return next((name for name in HEIF_PLUGINS if importlib.util.find_spec(name)), None)


def image_suffixes() -> frozenset[str]:
    """The suffixes of the image files a folder's listing reads: :data:`IMAGE_SUFFIXES`, and
    HEIC/HEIF where a plugin reads them (:func:`heif_plugin`)."""
    return IMAGE_SUFFIXES | HEIF_SUFFIXES if heif_plugin() else IMAGE_SUFFIXES


def heif_hint(names: list[str]) -> str:
    """How to read HEIC/HEIF files where no plugin does, if ``names`` has one; else ''."""
    if heif_plugin() or not any(os.path.splitext(n)[1].lower() in HEIF_SUFFIXES for n in names):
        return ""
    return f" HEIC/HEIF photos are read with a HEIF plugin: {HEIF_INSTALL}."


def _register_heif() -> None:
    """Register the installed HEIF plugin with Pillow, once per process (importing it takes
    tens of milliseconds, so only when an image is first opened)."""
    if _heif_ready:
        return
    with _heif_lock:
        if not _heif_ready:
            name = heif_plugin()
            if name is not None:
                importlib.import_module(name).register_heif_opener()
            _heif_ready.append(name is not None)


def human_key(name: str) -> list[int | str]:
    r"""Ducho's natural sort: ``img2`` before ``img10``. A run of ``\d`` (decimal digits, of
    any script) is a number; a superscript or circled digit is a character, which Ducho's
    ``isdigit`` took for a number and ``int`` then refused (``1²2``: a ValueError)."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", name)]


def image_id(path: str | os.PathLike[str]) -> str:
    """Ducho's file stem rule: the file name up to its first '.'."""
    return os.path.basename(path).split(".")[0]


class Listing(NamedTuple):
    """A folder's files that are items, in Ducho's order, and what is not read: its other
    files (hidden ones included) and its subfolders, to be counted in the run's report."""

    items: list[Item]
    ignored: list[Path]
    folders: list[Path]


def list_images(folder: Path) -> Listing:
    """Items for every image file of ``folder`` in Ducho's order, and what is skipped."""
    return list_files(folder, image_suffixes(), "image")


def list_files(folder: Path, suffixes: frozenset[str], kind: str) -> Listing:
    """Items for the files of ``folder`` with one of ``suffixes``, in Ducho's natural order.

    Ids are Ducho's: the file name up to its first '.'. Subfolders are not read (as Ducho,
    which lists one folder); they and the other files are returned to be counted.
    """
    if not folder.exists():
        raise DataError(_missing(folder, kind))
    if folder.is_file():
        return Listing([Item(image_id(folder), str(folder), FilePath(str(folder)))], [], [])
    # A dangling link is listed, and so is a named pipe, socket or device: reading it reports
    # what it is instead of hiding it. A link to a folder too (it is no file either).
    # Names and path strings, not Path objects: a job holds one item per file (FilePath).
    files, folders = [], []
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    folders.append(e.name)
                else:
                    files.append((e.name, e.path))
    except OSError as e:
        raise DataError(_unlisted(folder, kind, e)) from e
    files.sort(key=lambda file: human_key(file[0]))
    chosen, ignored = [], []
    for name, path in files:
        if _listed(name, suffixes):
            chosen.append(Item(image_id(name), path, FilePath(path)))
        else:
            ignored.append(Path(path))
    return Listing(chosen, ignored, [folder / name for name in sorted(folders, key=human_key)])


def _listed(name: str, suffixes: frozenset[str]) -> bool:
    """Whether a file of a folder is an item: its suffix is one of ``suffixes`` and it is not
    hidden. A hidden file is no item: its id, the name up to its first '.', would be empty,
    and such files are mostly what macOS leaves beside copies (``._photo.jpg``)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes


def check_files(folder: Path, suffixes: frozenset[str], kind: str) -> None:
    """Raise a DataError naming ``folder`` if it is missing or holds no file with one of
    ``suffixes``: what a run checks of every job before any work. Scanning stops at the
    first such file, so a large folder costs little."""
    if not folder.exists():
        raise DataError(_missing(folder, kind))
    if folder.is_file():
        return
    others, folders = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.name)
                    continue
                if _listed(entry.name, suffixes):
                    return
                others.append(entry.name)
    except OSError as e:
        raise DataError(_unlisted(folder, kind, e)) from e
    found = (
        f"its {len(others)} file(s) ({_some(others)}) are not {kind} files of a format read"
        if others
        else "it has no files"
    )
    if folders:
        found += (
            f"; its {len(folders)} subfolder(s) ({_some(folders)}) are not read: point "
            "'input_path' at the folder that holds the files (where there are several, a run "
            "per subfolder, each with its own 'output_path')"
        )
    raise DataError(
        f"{kind} folder {folder} holds nothing to extract: {found}. {kind.capitalize()} files "
        f"end in {', '.join(sorted(suffixes))} (hidden ones, named '.…', are not read). Check "
        f"'input_path'.{_format_hint(kind, others)}"
    )


def _format_hint(kind: str, names: list[str]) -> str:
    """How to read those of ``names`` whose format needs an extra package, if any does."""
    if kind == "audio":
        from ducho_fast.data.audio.audio import ffmpeg_hint  # it imports this module

        return ffmpeg_hint(names)
    return heif_hint(names)


def _some(names: list[str]) -> str:
    """The first three of ``names`` in Ducho's order, then '...' if there are more."""
    first = ", ".join(sorted(names, key=human_key)[:3])
    return first + (", ..." if len(names) > 3 else "")


def _missing(folder: Path, kind: str) -> str:
    return f"{kind} folder {folder} {absent(folder)} (check 'input_path')."


def _unlisted(folder: Path, kind: str, error: OSError) -> str:
    reason = error.strerror or error
    return f"{kind} folder {folder} cannot be listed ({reason}); check its permissions."


# What the image readers take: a file's path, an open binary file or a file's bytes in memory
# (no stamp, so never recorded as unreadable), a uint8 array or a PIL image.
ImageSource = Path | BinaryIO | bytes | bytearray | memoryview | np.ndarray | Image.Image

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def load_image(source: ImageSource, reshape: tuple[int, int] | None) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3), resized bicubically to ``reshape`` (width, height)."""
    return prepare_image(source, {"resize": reshape})


def prepare_image(
    source: ImageSource,
    pre: Mapping[str, Any],
    options: InputOptions | None = None,
) -> np.ndarray:
    """Decode and resize as an artifact's manifest says; the graph does the rest.

    ``pre`` keys: ``resize`` [width, height], or ``resize_shortest_edge`` (aspect kept, as
    Transformers image processors do); ``crop`` [width, height] (centred); ``interpolation``.
    ``options`` say whether EXIF orientation is applied, how many pixels are too many and
    whether JPEGs are decoded at a reduced scale.
    """
    return finish_image(decode_image(source, options, jpeg_draft(pre, options)), pre)


def decode_image(
    source: ImageSource, options: InputOptions | None = None, draft: int | None = None
) -> Image.Image:
    """Read and decode to RGB, EXIF orientation applied: what every model of a job shares.

    ``draft``: a JPEG is decoded at the smallest of libjpeg's scales (1/2, 1/4, 1/8) that keeps
    both sides at least this long (``input.jpeg_decode: reduced``); other formats in full.
    """
    options = options or InputOptions()
    image = _open(source, options.max_image_pixels, draft)
    if options.exif_orientation == "apply" and not isinstance(source, np.ndarray):
        image = _exif_transposed(image)
    return to_rgb(image)


def finish_image(image: Image.Image, pre: Mapping[str, Any]) -> np.ndarray:
    """A decoded RGB image resized and cropped as one artifact's manifest says."""
    resample = RESAMPLING[pre.get("interpolation") or "bicubic"]
    if pre.get("resize"):
        image = image.resize(tuple(pre["resize"]), resample=resample)
    elif pre.get("resize_shortest_edge"):
        size = shortest_edge_size(image.size, int(pre["resize_shortest_edge"]))
        image = image.resize(size, resample=resample)
    array = np.asarray(image, dtype=np.uint8)
    return center_crop(array, tuple(pre["crop"])) if pre.get("crop") else array


def draft_edge(pre: Mapping[str, Any]) -> int | None:
    """The shortest side a reduced JPEG decoding may leave for this resize (either way up, so
    that EXIF rotation changes nothing); None where the image is not resized."""
    if pre.get("resize"):
        return max(int(side) for side in pre["resize"])
    if pre.get("resize_shortest_edge"):
        return int(pre["resize_shortest_edge"])
    return None


def jpeg_draft(pre: Mapping[str, Any], options: InputOptions | None) -> int | None:
    """The ``draft`` that ``options`` ask :func:`decode_image` for: :func:`draft_edge` with
    ``input.jpeg_decode: reduced``, else None (full decoding)."""
    reduced = options is not None and options.jpeg_decode == "reduced"
    return draft_edge(pre) if reduced else None


def shortest_edge_size(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``edge``, the long one truncated."""
    width, height = size
    if width <= height:
        return edge, int(edge * height / width)
    return int(edge * width / height), edge


def center_crop(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """The centred (width, height) window; zero padding where the image is smaller, as
    Transformers' PIL image processors pad: an odd pixel of padding goes before the image
    (top, left), where torchvision's ``center_crop`` puts it after."""
    width, height = int(size[0]), int(size[1])
    h, w = array.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), 3), dtype=np.uint8)
        top, left = (padded.shape[0] - h + 1) // 2, (padded.shape[1] - w + 1) // 2
        padded[top : top + h, left : left + w] = array
        array, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(array[top : top + height, left : left + width])


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as Ducho's ``convert('RGB')``, except that 16- and 32-bit grayscale is scaled.

    Pillow's own conversion clips those to 255, which turns almost every 16-bit photo white.
    """
    if image.mode in _WIDE_GRAY:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the same RGB as converting directly, minus a warning
    return image if image.mode == "RGB" else image.convert("RGB")


_WIDE_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _exif_transposed(image: Image.Image) -> Image.Image:
    try:
        # Orientations 2-8 turn or flip the image. For any other, Pillow's exif_transpose
        # returns a copy of the pixels (0.36 ms of a benchmark JPEG's 7.4 ms of decoding).
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in _TURNED:
            return image
        return ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: keep the pixels as stored
        return image


_TURNED = frozenset(range(2, 9))


def _open(source: ImageSource, max_pixels: int, draft: int | None = None) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    stamp = None
    name = source_name(source)
    if isinstance(source, bytes | bytearray | memoryview):  # a file's content, not its name
        source = io.BytesIO(source)
    elif not isinstance(source, str | os.PathLike) and not hasattr(source, "read"):
        raise DataError(
            f"an image input must be a file path, an open binary file, the bytes of an image "
            f"file, a uint8 array or a PIL image; found {type(source).__name__}."
        )
    try:
        if isinstance(source, str | os.PathLike):  # not a file object a caller passed
            stamp = FileStamp.of_input(name, source)  # a pipe would block the reader
        _quiet_pillow_bombs()
        _register_heif()
        image = Image.open(source)
        _check_pixels(name, image, max_pixels, stamp)  # from the header, not decoded
        if draft:
            image.draft(None, (draft, draft))  # JPEG only; a no-op for other formats
        image.load()
        return image
    except FileNotFoundError as e:
        raise DataError(f"{name}: file not found.") from e
    except PermissionError as e:
        raise DataError(f"{name}: permission denied; make the file readable.") from e
    except Image.DecompressionBombError as e:
        message = (
            f"{name}: {e} Pillow refuses images this large whatever input.max_image_pixels says."
        )
        raise stamped(message, stamp) from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = error_reason(e)
        if not isinstance(source, str | os.PathLike):  # Pillow names a file object by its repr
            reason = reason.replace(f" {source!r}", "")
        hint = _avif_hint(name) + _heif_read_hint(name, source)
        message = f"{name}: not a readable image ({type(e).__name__}: {reason}).{hint}"
        raise decode_error(message, e, stamp) from e


def _avif_hint(name: str) -> str:
    """What to say of an .avif file Pillow could not read where this Pillow has no AVIF
    decoder (before 11.2, Pillow's wheels had none)."""
    if not name.lower().endswith(".avif") or features.check("avif"):
        return ""
    return (
        f" This Pillow ({PIL.__version__}) cannot read AVIF: install Pillow 11.2 or later, or "
        "convert the file to JPEG or PNG."
    )


def _heif_read_hint(name: str, source: Any) -> str:
    """How to read a HEIC/HEIF image Pillow could not, where no plugin is installed: told by
    the file's suffix or, for the bytes of a file given in memory, by the brand of its
    ``ftyp`` box (an open file a caller passes is not read again to tell)."""
    if heif_plugin() is not None:  # it was read with one: the file is bad
        return ""
    if os.path.splitext(name)[1].lower() in HEIF_SUFFIXES:
        return heif_hint([name])
    head = b""
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:12]
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return f" It is a HEIC/HEIF image, read with a HEIF plugin: {HEIF_INSTALL}."
    return ""


def _quiet_pillow_bombs() -> None:
    """Silence Pillow's DecompressionBombWarning, which it gives above its own pixel limit
    whatever ``input.max_image_pixels`` says (:func:`_check_pixels` decides that instead).

    A filter added once, checked per image (a caller may have reset the filters since): not
    ``warnings.catch_warnings`` around each image, which is not thread-safe (reader threads
    restoring each other's filters can drop one another thread added) and resets the "shown
    once" record of every warning as it exits, so a warning a library gives per file (Pillow's
    for a broken EXIF block) was printed for every image instead of once.
    """
    for action, message, category, module, _ in warnings.filters:
        ours = action == "ignore" and category is Image.DecompressionBombWarning
        if ours and message is None and (module is None or module.match("PIL.Image")):
            return
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.Image")


def _check_pixels(name: str, image: Image.Image, max_pixels: int, stamp: FileStamp | None) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise stamped(
            f"{name}: {width} x {height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (a decompression bomb, or a huge image). Raise "
            "input.max_image_pixels if the image is genuine.",
            stamp,
        )


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8, found {array.dtype}{_dtype_fix(array)}.")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        if not array.size:
            raise DataError(f"an image array of shape {array.shape} is empty.")
        return Image.fromarray(array)
    raise DataError(
        f"image arrays must be (H, W), (H, W, 3) or (H, W, 4); found {array.shape}"
        f"{_shape_fix(array.shape)}."
    )


def _dtype_fix(array: np.ndarray) -> str:
    """How an array of another type becomes a uint8 image, where that is plain."""
    if array.dtype.kind == "f":
        return (
            ": an image with values in 0..1 becomes one with (array * 255).round().astype("
            "np.uint8), one in 0..255 with array.round().astype(np.uint8)"
        )
    if array.dtype.kind in "iu":
        return ": if its values are 0..255, pass array.astype(np.uint8)"
    return ""


def _shape_fix(shape: tuple[int, ...]) -> str:
    """What to pass for a shape that is one transpose or one axis away from an image."""
    if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (1, 3, 4):
        return ": is it (channels, H, W), as torch tensors are? Pass array.transpose(1, 2, 0)"
    if len(shape) == 3 and shape[2] == 1:
        return ": one channel; pass array[:, :, 0]"
    if len(shape) == 4:
        return ": a stack of images, where each image is one input (embed(array) takes a stack)"
    return ""
