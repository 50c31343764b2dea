"""Image files: find them, open them safely, label them from folder names, scan their sizes.

PIL and the standard library only (no torch), so that processes which only read pictures (the
geometric verifier's workers, say) start in a fraction of a second. A file that cannot be
decoded raises :class:`UnreadableImage`; the callers turn that into a skipped, listed sample, so
one broken JPEG never stops a long job.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: PIL's own decompression-bomb limit (about 89 megapixels); larger files are skipped.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# Truncated files must fail loudly (and be skipped) rather than decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(Exception):
    """A file that is not a usable image; ``str()`` says why in a few words."""


# --------------------------------------------------------------------------------------------
# Discovery


def discover_images(root: Path | str) -> list[Path]:
    """Every image file under ``root``, recursively, in sorted (reproducible) order.

    Hidden files and folders (a leading dot) are skipped. Symbolic links to folders are
    followed once: a link loop is detected by the folder's real path and not walked again.
    """
    root = Path(root)
    found: list[Path] = []
    seen_folders: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_folders:
            subfolders[:] = []
            continue
        seen_folders.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder) / name)
    return sorted(found)


def label_of(path: Path | str) -> str:
    """The class label of an image: the name of the folder it is in (torchvision ImageFolder's rule)."""
    return Path(path).parent.name


# --------------------------------------------------------------------------------------------
# Safe loading


def open_image(path: Path | str, draft_side: int | None = None, upright: bool = True) -> Image.Image:
    """Decode ``path`` as an upright RGB image, or raise :class:`UnreadableImage`.

    ``draft_side``: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) as long as
    both sides stay at least this large; much faster for photos far larger than the network input.
    ``upright=False`` keeps the stored pixel grid (no EXIF rotation): the frame that box
    annotations were drawn in, since annotation formats record the stored width and height.
    """
    with _reading_image(path) as image:
        if draft_side and image.format == "JPEG":
            image.draft("RGB", _draft_request(image.size, draft_side))
        image.load()
        return to_rgb(ImageOps.exif_transpose(image) if upright else image)


@contextlib.contextmanager
def _reading_image(path: Path | str) -> Iterator[Image.Image]:
    """Open an image lazily (header only) and turn every way PIL can fail into UnreadableImage."""
    try:
        # PIL only warns between its limit and twice that; _check_pixel_count refuses those too.
        with Image.open(path) as image:
            _check_pixel_count(image)
            yield image
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage("too many pixels (decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # PIL reports truncated and malformed files through all of these.
        raise UnreadableImage(str(error).split("\n")[0] or type(error).__name__) from None


def _check_pixel_count(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableImage(f"too many pixels ({width}x{height}; decompression bomb?)")
    if width == 0 or height == 0:
        raise UnreadableImage("empty image")


def _draft_request(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    # PIL's draft keeps the decoded size >= the request on both axes, so scale the request to
    # the image's aspect: its shorter side becomes ``min_side``.
    width, height = size
    scale = min_side / min(width, height)
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float scaled, transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        pixels = pixels / 65535.0
    else:
        # 32-bit integer or float images have no fixed white point: stretch to their range.
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    grey = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")


# --------------------------------------------------------------------------------------------
# Scanning a folder before work starts


@dataclass
class ScanResult:
    """What a quick pass over the file headers found: usable images, their sizes, the rejects."""

    paths: list[Path]
    sizes: list[tuple[int, int]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def median_short_side(self) -> int:
        return int(np.median([min(size) for size in self.sizes])) if self.sizes else 0


def _header_size(path: Path) -> tuple[int, int]:
    with _reading_image(path) as image:
        width, height = image.size
        # EXIF rotations by 90 degrees swap the sides the network will see.
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            return height, width
        return width, height


def scan_images(paths: Sequence[Path], workers: int = 8) -> ScanResult:
    """Read every file's header (cheap: no pixel decode) to find unusable files and image sizes.

    Truncated pixel data is only found when an image is decoded; the datasets skip those later.
    """

    def probe(path: Path) -> tuple[Path, tuple[int, int] | None, str | None]:
        try:
            return path, _header_size(path), None
        except UnreadableImage as reason:
            return path, None, str(reason)

    result = ScanResult(paths=[], sizes=[])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, size, reason in pool.map(probe, paths):
            if size is None:
                result.skipped.append((path, reason or "unreadable"))
            else:
                result.paths.append(path)
                result.sizes.append(size)
    return result


# --------------------------------------------------------------------------------------------
# Reading past unreadable files


def first_readable(index: int, paths: Sequence[Path | str],
                   load: Callable[[int], Any]) -> tuple[Any, list[tuple[str, str]]]:
    """``load(index)``, or, if that image is unreadable, the next readable one after it.

    Training batches keep their size this way: under torchrun a rank whose share of a batch
    came up short would skip a step the other ranks take, or die in batch norm, and leave the
    others waiting in their all-reduce. So the search goes on past any run of unreadable files,
    round the whole set if need be (a folder whose first 40 files are truncated still fills every
    share from its good ones). Returns the loaded value (None only if no image of the set can be
    read) and the (path, reason) of each unreadable image met on the way.
    """
    failures: list[tuple[str, str]] = []
    for offset in range(len(paths)):
        position = (index + offset) % len(paths)
        try:
            return load(position), failures
        except UnreadableImage as reason:
            failures.append((str(paths[position]), str(reason)))
    return None, failures
