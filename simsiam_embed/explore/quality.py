"""Image-quality checks on the indexed images: blurry, too dark, too bright, tiny, near-uniform,
damaged (decodable, but the file's structure is broken).

Each check is a measure and a threshold, both reported, so a user can see how far past it an
image is. The thresholds were chosen on photos degraded on purpose (bench/bench_quality_checks.py,
figures in bench/RESULTS.md), for precision first: a check that flags good photos is ignored.

- *tiny*: the shorter side, in pixels, at most TINY_SIDE.
- *near-uniform*: the standard deviation of grey levels (0-255) at most UNIFORM_STD: a blank
  frame, a lens cap, a solid fill.
- *too dark*: the mean grey level (0-255) at most DARK_MEAN.
- *too bright*: the mean grey level at least BRIGHT_MEAN, or at least BRIGHT_CLIPPED of the
  pixels burnt out (grey >= CLIPPED_LEVEL), and the other pixels bright too (mean at least
  BRIGHT_REST): a studio shot's white background around a normal subject is not over-exposure
  (it was the one kind of good photo the first rule flagged).
- *blurry*: the variance of the Laplacian (Pech-Pacheco et al. 2000) over the variance of the
  grey levels, of the picture brought to SHARPNESS_SIDE px on its shorter side, at most
  BLUR_SHARPNESS: little fine detail for its contrast (so a dark or a low-contrast photo is not
  called blurry). Not judged on tiny or near-uniform pictures (they are flagged as such).
- *damaged*: a JPEG whose compressed data holds markers no encoder writes, or that ends without
  its end marker; a PNG whose chunks fail their CRC or that ends before its IEND chunk. Decoders
  still show such a file, so the index took it. Bytes garbled inside a JPEG's compressed data
  without breaking a marker are not seen: the decoder shows them as a garbled band and reports
  nothing (measured in bench/RESULTS.md).

Each picture is read once, in worker processes, from the bytes the index recorded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simsiam_embed.explore.results import AnalysisResult
from simsiam_embed.explore.workers import map_in_workers
from simsiam_embed.optional import installed
from simsiam_embed.index.thumbnails import indexed_bytes
from simsiam_embed.errors import Report

if TYPE_CHECKING:
    from simsiam_embed.index.catalog import CatalogEntry
    from simsiam_embed.index.store import LoadedIndex


TINY_SIDE = 64
UNIFORM_STD = 2.0
DARK_MEAN = 30.0
BRIGHT_MEAN = 215.0
BRIGHT_CLIPPED = 0.3
BRIGHT_REST = 150.0
SHARPNESS_SIDE = 256
CLIPPED_LEVEL = 250
BLUR_SHARPNESS = 0.016

#: The checks, in the order they are listed, with the words each measure is said in.
CHECKS = {
    "damaged": "the file's structure is broken",
    "tiny": f"shorter side <= {TINY_SIDE} px",
    "near-uniform": f"grey levels' standard deviation <= {UNIFORM_STD:g} (of 255)",
    "too dark": f"mean grey level <= {DARK_MEAN:g} (of 255)",
    "too bright": f"mean grey level >= {BRIGHT_MEAN:g} (of 255) or >= {BRIGHT_CLIPPED:.0%} of pixels burnt out "
                  f"(>= {CLIPPED_LEVEL}), the rest bright too (mean >= {BRIGHT_REST:g})",
    "blurry": f"Laplacian's variance over the grey levels' at {SHARPNESS_SIDE} px <= {BLUR_SHARPNESS:g}",
}


@dataclass
class PictureQuality:
    """One picture's measures; None where it could not be read as indexed."""

    width: int
    height: int
    grey_mean: float
    grey_std: float
    sharpness: float | None   # variance of the Laplacian over that of the grey levels; None where not judged
    damage: str               # "" when the file's structure is sound
    clipped: float = 0.0      # share of pixels at CLIPPED_LEVEL or above: burnt-out highlights
    rest_mean: float = 0.0    # mean grey level of the other pixels

    def failed(self) -> list[str]:
        """The checks this picture fails, in CHECKS' order."""
        found = []
        if self.damage:
            found.append("damaged")
        if min(self.width, self.height) <= TINY_SIDE:
            found.append("tiny")
        if self.grey_std <= UNIFORM_STD:
            found.append("near-uniform")
        if self.grey_mean <= DARK_MEAN:
            found.append("too dark")
        if (self.grey_mean >= BRIGHT_MEAN or self.clipped >= BRIGHT_CLIPPED) and self.rest_mean >= BRIGHT_REST:
            found.append("too bright")
        if self.sharpness is not None and self.sharpness <= BLUR_SHARPNESS:
            found.append("blurry")
        return found

    def measure(self, check: str) -> str:
        return {
            "damaged": self.damage,
            "tiny": f"{self.width} x {self.height} px",
            "near-uniform": f"standard deviation {self.grey_std:.1f}",
            "too dark": f"mean {self.grey_mean:.1f}",
            "too bright": f"mean {self.grey_mean:.1f}, {self.clipped:.0%} burnt out, the rest {self.rest_mean:.1f}",
            "blurry": f"sharpness {self.sharpness:.4f}" if self.sharpness is not None else "",
        }[check]


@dataclass
class FlaggedImage:
    id: int
    path: str
    checks: list[str]     # the checks it fails, in CHECKS' order
    measures: list[str]   # each one's measure, in words


@dataclass
class QualityResult(AnalysisResult):
    listed = "flagged"
    images: int
    unreadable: int             # gone or changed since indexing, or no longer decodable
    counts: dict[str, int]      # check -> images that fail it
    flagged: list[FlaggedImage]

    def described(self) -> dict:
        return {"checks": CHECKS}


def check_quality(loaded: LoadedIndex, report: Report | None = None) -> QualityResult:
    """Every indexed image measured; those failing a check, by check (CHECKS' order), then path."""
    entries = loaded.entries.in_order(loaded.ids)
    measured = measure_pictures(entries)
    counts = dict.fromkeys(CHECKS, 0)
    flagged = []
    for entry, quality in zip(entries, measured):
        failed = quality.failed() if quality is not None else []
        for check in failed:
            counts[check] += 1
        if failed:
            flagged.append(FlaggedImage(entry.id, entry.path, failed, [quality.measure(check) for check in failed]))
    flagged.sort(key=lambda image: (list(CHECKS).index(image.checks[0]), image.path))
    unreadable = sum(quality is None for quality in measured)
    if report is not None:
        report(f"quality: {len(entries)} images measured, {len(flagged)} fail a check"
               + (f", {unreadable} not read (gone or changed since indexing)" if unreadable else ""))
    return QualityResult(len(entries), unreadable, counts, flagged)


def measure_pictures(entries: list[CatalogEntry], workers: int | None = None) -> list[PictureQuality | None]:
    # Isolated: listening to libjpeg moves this process's stderr for a moment (_decoder_complaints).
    return map_in_workers(_quality_of, entries, workers, isolated=_jpeg_listener_available())


def _quality_of(entry: CatalogEntry) -> PictureQuality | None:
    data = indexed_bytes(entry)
    return None if data is None else picture_quality(data)


def picture_quality(data: bytes) -> PictureQuality | None:
    """The measures of one image file's bytes; None if they do not decode."""
    from PIL import Image

    from simsiam_embed.image_files import UnreadableImage, open_image

    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
        picture = open_image(io.BytesIO(data), draft_side=SHARPNESS_SIDE).convert("L")
    except (UnreadableImage, OSError, ValueError, Image.DecompressionBombError):
        return None
    scale = SHARPNESS_SIDE / min(picture.size)
    if scale < 1:   # detail is judged at one size: a large photo's pixels are finer than a small one's
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.BILINEAR)
    grey = np.asarray(picture, dtype=np.float32)
    mean, std = float(grey.mean()), float(grey.std())
    burnt = grey >= CLIPPED_LEVEL
    rest = grey[~burnt]
    sharpness = None
    if min(width, height) > TINY_SIDE and std > UNIFORM_STD:
        laplacian = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1])
        # Over the grey levels' own variance: a dark or low-contrast photo is not a blurred one.
        sharpness = float(laplacian.var()) / (std * std)
    return PictureQuality(width, height, round(mean, 2), round(std, 2),
                          round(sharpness, 4) if sharpness is not None else None, structural_damage(data),
                          round(float(burnt.mean()), 4), round(float(rest.mean()) if rest.size else 255.0, 2))


def structural_damage(data: bytes) -> str:
    """What is broken in a JPEG's or a PNG's structure, in words; "" if nothing (or another format)."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_damage(data) or _decoder_complaints(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_damage(data)
    return ""


def _jpeg_damage(data: bytes) -> str:
    """Walks the segments; inside compressed data only stuffed bytes (FF 00), restart markers
    (FF D0-D7), fill bytes (FF FF) and the next segment's marker may follow an FF."""
    position = 2
    while position + 2 <= len(data):
        if data[position] != 0xFF:
            return f"no marker where one belongs (byte {position:,})"
        marker = data[position + 1]
        if marker == 0xFF:   # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:
            return ""
        if position + 4 > len(data):
            break
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        position += 2 + length
        if marker != 0xDA:   # not a scan: the next segment follows directly
            continue
        while True:   # the scan's compressed data, up to the next marker
            next_ff = data.find(b"\xff", position)
            if next_ff < 0 or next_ff + 1 >= len(data):
                return "ends without its end marker (truncated?)"
            following = data[next_ff + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                position = next_ff + (1 if following == 0xFF else 2)
                continue
            if following in (0xD9, 0xC4, 0xDA, 0xDD, 0xDB) or 0xE0 <= following <= 0xEF or following == 0xFE:
                position = next_ff   # end of image, or a segment between progressive scans
                break
            return f"corrupt compressed data (marker FF {following:02X} at byte {next_ff:,})"
    return "ends without its end marker (truncated?)"


def _png_damage(data: bytes) -> str:
    position = 8
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 12 + length
        if end > len(data):
            return f"chunk {kind.decode('latin-1')!r} runs past the end of the file (truncated?)"
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(data[position + 4:end - 4]) != crc:
            return f"chunk {kind.decode('latin-1')!r} fails its CRC (byte {position:,})"
        if kind == b"IEND":
            return ""
        position = end
    return "ends before its IEND chunk (truncated?)"


def _jpeg_listener_available() -> bool:
    return installed("cv2")


def _decoder_complaints(data: bytes) -> str:
    """What libjpeg says while decoding (through OpenCV, the [dedup] extra), "" if nothing or no
    OpenCV. Garbled compressed data decodes without an error, as a garbled band; libjpeg warns
    ("Corrupt JPEG data: 613 extraneous bytes before marker 0xd9"), on the process's stderr only,
    so stderr is pointed at a file for the decode. Runs in a worker process: another thread of
    this one would lose its writes to stderr meanwhile. On 53 JPEGs with 16 bytes overwritten it
    caught 52, on 60 photos as they were none (bench/bench_quality_checks.py)."""
    if not _jpeg_listener_available():
        return ""
    import os
    import sys
    import tempfile

    import cv2

    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:   # an eighth of the size: every block's compressed data is still decoded
            cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        said = sink.read(2000).decode("utf-8", errors="replace")
    complaints = [line.strip() for line in said.splitlines() if "JPEG" in line or "jpeg" in line]
    return complaints[0][:160] if complaints else ""
