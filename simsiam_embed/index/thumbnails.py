"""Small JPEG previews of indexed images, made once and cached in the index folder.

The cache is ``INDEX/thumbnails/<digest[:2]>/<digest>-<side>.jpg``: keyed by the content
digest the catalog recorded, so a file indexed again under another name reuses its preview, and
a preview never outlives a change of content the index knows of. Writes are atomic, so two
requests making the same preview at once both leave a whole file. A read-only index folder still
gets previews, uncached.

An indexed file is read only while its bytes still have the digest the catalog recorded
(:func:`indexed_bytes`): a catalog that came with someone else's index can name any path, but
nothing is read out of a file whose content its digest does not already name.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image

from simsiam_embed.image_files import UnreadableImage, open_image
from simsiam_embed.errors import UserError
from simsiam_embed.files import atomic_write

if TYPE_CHECKING:   # the store imports FAISS and torch; picture-reading workers need neither
    from simsiam_embed.index.catalog import CatalogEntry

THUMBNAIL_SIDE = 160
THUMBNAIL_FOLDER = "thumbnails"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def encode_thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """``image`` shrunk to fit ``side`` x ``side``, as JPEG bytes."""
    image = image.copy()
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def thumbnail_of_file(path: Path | str | BinaryIO, side: int = THUMBNAIL_SIDE) -> bytes | None:
    """A preview of any image file (the safe decoder's limits apply); None if unreadable."""
    try:
        return encode_thumbnail(open_image(path, draft_side=side), side)
    except UnreadableImage:
        return None


def indexed_bytes(entry: CatalogEntry) -> bytes | None:
    """The file's bytes if they are still those the index recorded (same SHA-256), else None:
    the file is gone, changed since `index` ran, or not the file the catalog claims."""
    try:
        data = Path(entry.path).read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == entry.digest else None


def cached_thumbnail(index_dir: Path, entry: CatalogEntry, side: int = THUMBNAIL_SIDE) -> bytes | None:
    """The preview of an indexed image, from the cache or made and cached now; None if the
    file can no longer be read as indexed."""
    if not _DIGEST.fullmatch(entry.digest):   # the catalog is validated; this keeps the path inside
        return None
    cache = index_dir / THUMBNAIL_FOLDER / entry.digest[:2] / f"{entry.digest}-{side}.jpg"
    try:
        return cache.read_bytes()
    except OSError:
        pass
    data = indexed_bytes(entry)
    made = thumbnail_of_file(io.BytesIO(data), side) if data is not None else None
    if made is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(cache, "wb") as handle:
                handle.write(made)
        except (OSError, UserError):
            pass   # a read-only or full index folder: serve the preview uncached
    return made


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
