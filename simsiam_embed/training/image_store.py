"""Decode each training image once: a store of decoded uint8 pixels beside the run.

The first epoch decodes every image as before and keeps the result; later epochs (and a resumed
run) read the pixels back through a memory map instead of decoding the file again. What is kept
is exactly what decoding gives (the same draft-reduced JPEG, the same upright RGB), so a step
sees the same pixels, bit for bit, whether they came from the store or from the file.

    runs/<name>/decoded/<key[:2]>/<key>.pixels   SHA-256 of the rest, then H x W x 3 uint8 as .npy

The key is a digest of the file's path and identity (size, modification and change times,
inode) and the decode's draft side: a file changed since, even to the same size with its old
modification time restored, has another key and is decoded again; the old entry is never read,
and a run's start removes the entries of images that changed or went.
Each entry is written to a temporary name and renamed, so loader workers (and ranks sharing the
run folder) that decode the same image at once leave one whole file, never a half-written one.

The store holds at most ``capacity_bytes`` (chosen by :func:`plan_store` from the free disk and
memory); past that, images are decoded as before. Files in a run folder are data: an entry is
used only if its bytes match the digest written with them (an entry overwritten with other
pixels is decoded again), it is read with ``allow_pickle=False`` and is a uint8 H x W x 3 array.
Symbolic links are never followed, neither an entry nor a folder of the store: the store lies
inside its run folder, and a link would read pixels from, or write them to, anywhere.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simsiam_embed.files import open_not_through_a_link
from simsiam_embed.image_files import open_image
from simsiam_embed.settings import SMALL_IMAGE_MAX_SIDE

#: Kept free on the run's disk beyond the store: checkpoints and the user's own files come first.
DISK_RESERVE_BYTES = 2 << 30
#: The store takes at most this share of the free disk.
DISK_SHARE = 0.5
#: An entry's file: its SHA-256, then the pixels as .npy.
ENTRY_SUFFIX = ".pixels"
DIGEST_BYTES = 32
#: A crashed writer's temporary file older than this is removed when a run starts.
STALE_TEMPORARY_S = 3600


@dataclass(frozen=True)
class StorePlan:
    capacity_bytes: int          # 0: no store
    estimated_bytes: int         # what every image of the folder would take
    in_memory: bool              # whether the page cache can hold it all (else reads come from disk)
    summary: str                 # what was chosen, and why, for the settings report


def plan_store(count: int, median_short_side: int, draft_side: int | None, folder: Path,
               memory_bytes: int | None, free_disk_bytes: int | None = None) -> StorePlan:
    """How large a store to allow for ``count`` images of this median size, from the free disk
    (at most half of it, 2 GiB always left) and memory (said, not enforced: beyond it the pages
    are read from disk, still without decoding)."""
    short = min(median_short_side, 2 * draft_side) if draft_side else median_short_side
    estimated = int(count * short * short * 4 / 3 * 3)   # about 4:3, three channels
    if folder.is_symlink():
        return StorePlan(0, estimated, False, f"decoded-image store off: {folder} is a symbolic link, and the store "
                                              "lies inside its run folder; every epoch decodes the files")
    if median_short_side <= SMALL_IMAGE_MAX_SIDE:
        # Measured (bench_loader.py --store): a 32-px PNG costs 1.06 ms a pair decoded and 1.44 ms
        # read back from the store, 0.74x in two runs (opening a file costs more than decoding one this small).
        return StorePlan(0, estimated, False, f"decoded-image store off: decoding a {median_short_side}-px image costs "
                                              "less than reading its pixels back (bench/RESULTS.md); every epoch "
                                              "decodes the files")
    if free_disk_bytes is None:
        free_disk_bytes = shutil.disk_usage(_existing_parent(folder)).free
    capacity = int(max(free_disk_bytes - DISK_RESERVE_BYTES, 0) * DISK_SHARE)
    in_memory = memory_bytes is not None and estimated <= memory_bytes / 2
    if capacity < min(estimated, 64 << 20):
        return StorePlan(0, estimated, False, f"decoded-image store off: {estimated / 2**20:,.0f} MiB would not fit "
                                              f"the free disk at {folder}; every epoch decodes the files")
    covered = "all" if capacity >= estimated else f"about {capacity / estimated:.0%}"
    return StorePlan(min(capacity, estimated * 2), estimated, in_memory,
                     f"decoded-image store: {covered} of {count:,} images, ~{estimated / 2**20:,.0f} MiB in {folder}"
                     f"{'' if in_memory else ' (more than half the memory: later epochs read it from disk)'}; "
                     "each image is decoded once")


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


class DecodedImageStore:
    """The store's entries for one run: ``load(path)`` decodes or reads back; picklable, so each
    loader worker holds its own (the byte count is per process, an estimate of the shared total)."""

    def __init__(self, folder: Path, draft_side: int | None, capacity_bytes: int):
        self.folder = folder
        self.draft_side = draft_side
        self.capacity_bytes = capacity_bytes
        self.written_bytes = 0

    def key(self, path: Path) -> str:
        stat = os.stat(path)
        identity = f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}"
        return hashlib.sha256(f"{identity}\0{self.draft_side}".encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def load(self, path: Path) -> Image.Image:
        """The image as :func:`open_image` decodes it (``UnreadableImage`` as it raises it)."""
        try:
            entry = self.entry_path(self.key(path))
        except OSError:
            return open_image(path, self.draft_side)   # gone: let the decoder say why
        pixels = _read_entry(entry)
        if pixels is not None:
            return Image.fromarray(pixels, "RGB")
        image = open_image(path, self.draft_side)
        if self.written_bytes < self.capacity_bytes:
            self._write(entry, np.asarray(image))
        return image

    def _write(self, entry: Path, pixels: np.ndarray) -> None:
        temporary = entry.with_name(f".{entry.stem}.{os.getpid()}.tmp")
        buffer = io.BytesIO()
        np.save(buffer, pixels, allow_pickle=False)
        data = buffer.getvalue()
        try:
            if self.folder.is_symlink() or entry.parent.is_symlink():
                return
            entry.parent.mkdir(parents=True, exist_ok=True)
            with open_not_through_a_link(temporary, "wb") as handle:
                handle.write(hashlib.sha256(data).digest() + data)
            os.replace(temporary, entry)
            self.written_bytes += pixels.nbytes
        except OSError:   # a full disk or a read-only folder: this image is decoded each epoch
            temporary.unlink(missing_ok=True)

    def remove_stale(self, paths: list[Path]) -> int:
        """Remove the entries of images that changed or went (their keys are no longer any
        file's), and what crashed writers left; returns how many entries went. Main process,
        before training: the store would otherwise only grow."""
        if not self.folder.is_dir() or self.folder.is_symlink():
            return 0
        current = set()
        for path in paths:
            try:
                current.add(self.key(path))
            except OSError:
                pass
        removed = 0
        for sub in os.scandir(self.folder):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for item in os.scandir(sub.path):
                stale_entry = item.name.endswith(ENTRY_SUFFIX) and item.name[:-len(ENTRY_SUFFIX)] not in current
                old_temporary = (item.name.endswith(".tmp")
                                 and time.time() - item.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_S)
                if stale_entry or old_temporary:
                    try:
                        os.unlink(item.path)
                    except OSError:
                        continue
                    removed += stale_entry
        return removed


def _read_entry(entry: Path) -> np.ndarray | None:
    """The entry's pixels, or None: none yet, a link, a digest that does not match its bytes, or
    not an array this store wrote."""
    try:
        if entry.parent.is_symlink():
            return None
        with open_not_through_a_link(entry) as handle:
            content = handle.read()
        digest, data = content[:DIGEST_BYTES], content[DIGEST_BYTES:]
        if len(digest) != DIGEST_BYTES or hashlib.sha256(data).digest() != digest:
            return None
        pixels = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError):
        return None
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return None
    return pixels
