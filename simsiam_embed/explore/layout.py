"""Each picture's colour layout: a second source of duplicate candidates, independent of the encoder.

An encoder trained for minutes on a CPU is nearly random on photos, and a copy that is not among
its original's nearest neighbours never reaches the geometric check. A copy keeps its original's
layout of colours: the picture reduced to LAYOUT_SIDE x LAYOUT_SIDE cells of luma and chroma
(the idea of MPEG-7's colour layout descriptor), each channel minus its mean, is nearly the same
after a re-encode, a resize, a brightness change or a crop of a few percent, and a mirrored copy
has the mirrored layout. On 396 photos of about 300 x 200 px with 150 planted copies (JPEG q30,
resize 60%, centre crop 85%, brightness +15%, mirror + JPEG q60), every copy's nearest layout,
mirrored or not, was its original's (bench/RESULTS.md).

Pictures of SMALL_PICTURE_SIDE px or less a side propose nothing (their layout is zero): the
geometric check cannot judge them, and the pixel check needs the encoder's high score anyway.
A layout says nothing about what is in the picture, so look-alike layouts are only candidates:
the geometric check (:mod:`.verify`) decides, as for the encoder's. Layouts are cached by content
digest in ``<index>/colour-layouts.npz``: a re-run, or an index update, reads only new files.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simsiam_embed.errors import UserError
from simsiam_embed.explore.workers import map_in_workers
from simsiam_embed.files import atomic_path
from simsiam_embed.index.thumbnails import indexed_bytes
from simsiam_embed.settings import SMALL_PICTURE_SIDE

if TYPE_CHECKING:
    from simsiam_embed.index.catalog import CatalogEntry

LAYOUT_SIDE = 8
LAYOUT_DIM = LAYOUT_SIDE * LAYOUT_SIDE * 3
#: Chroma counts this many times luma: colour tells pictures of similar brightness apart.
CHROMA_WEIGHT = 2.0
#: Two layouts correlating less than this are not candidates. Copies measured 0.62 and more; a
#: picture that could not be read has the zero layout, which correlates 0 with everything.
LAYOUT_FLOOR = 0.5
CACHE_NAME = "colour-layouts.npz"
#: A layout is a reduced decode (a few milliseconds): worker processes pay off from about here.
LAYOUT_POOL_MIN = 256
_DIGEST_LENGTH = 64

#: Column order of the mirrored picture's layout: the same cells, left and right swapped.
MIRRORED = np.arange(LAYOUT_DIM).reshape(LAYOUT_SIDE, LAYOUT_SIDE, 3)[:, ::-1].ravel()


def colour_layout(image) -> np.ndarray:
    """``image`` (PIL, any mode) as a unit vector of LAYOUT_DIM: cells of Y, Cb, Cr, row by row."""
    from PIL import Image

    cells = np.asarray(image.convert("RGB").convert("YCbCr").resize((LAYOUT_SIDE, LAYOUT_SIDE), Image.BOX),
                       dtype=np.float32)
    cells = cells - cells.reshape(-1, 3).mean(axis=0)   # a brightness or tint change moves the mean only
    cells[..., 1:] *= CHROMA_WEIGHT
    vector = cells.ravel()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector   # a flat picture's layout is zero: it pairs with nothing


def colour_layouts(entries: list[CatalogEntry], index_folder: Path | None = None,
                   workers: int | None = None) -> np.ndarray:
    """Each entry's layout, (len(entries), LAYOUT_DIM) float32; zero for a file gone, changed
    since indexing, or unreadable. Cached in ``index_folder`` when given and writable."""
    cached = _read_cache(index_folder / CACHE_NAME) if index_folder is not None else {}
    missing = sorted({entry.digest for entry in entries} - cached.keys())
    by_digest = {entry.digest: entry for entry in entries}
    computed = map_in_workers(_layout_of, [by_digest[digest] for digest in missing], workers, min_items=LAYOUT_POOL_MIN)
    fresh = {digest: layout for digest, layout in zip(missing, computed) if layout is not None}
    if fresh and index_folder is not None:
        _write_cache(index_folder / CACHE_NAME, {**cached, **fresh})
    known = {**cached, **fresh}
    layouts = np.zeros((len(entries), LAYOUT_DIM), dtype=np.float32)
    for row, entry in enumerate(entries):
        if entry.digest in known:
            layouts[row] = known[entry.digest]
    return layouts


def _layout_of(entry: CatalogEntry) -> np.ndarray | None:
    from PIL import Image

    from simsiam_embed.image_files import UnreadableImage, open_image

    data = indexed_bytes(entry)
    if data is None:   # gone or changed: not cached, so a restored file is read next time
        return None
    nothing = np.zeros(LAYOUT_DIM, dtype=np.float32)
    try:
        with Image.open(io.BytesIO(data)) as header:   # the stored size, not a reduced decode's
            if min(header.size) <= SMALL_PICTURE_SIDE:
                # Too small for keypoints: only the pixel check could judge it, and that needs
                # the encoder's high score, so a layout's proposal could never be confirmed.
                return nothing
        return colour_layout(open_image(io.BytesIO(data), draft_side=4 * LAYOUT_SIDE))
    except (UnreadableImage, OSError, ValueError, Image.DecompressionBombError):
        return nothing


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    """The cache's layouts by digest; empty if it is missing or not exactly what we write (it sits
    in a folder that may have been received: arrays only, no pickles, every value checked)."""
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as stored:
            digests, layouts = stored["digests"], stored["layouts"]
    except (OSError, ValueError, KeyError, EOFError):
        return {}
    if (digests.dtype != np.dtype(f"<U{_DIGEST_LENGTH}") or digests.ndim != 1 or layouts.dtype != np.float32
            or layouts.shape != (len(digests), LAYOUT_DIM) or not np.isfinite(layouts).all()):
        return {}
    norms = np.linalg.norm(layouts, axis=1)
    if not ((np.abs(norms - 1) < 1e-3) | (norms == 0)).all():   # unit vectors, or the zero layout
        return {}
    return dict(zip(digests.tolist(), layouts))


def _write_cache(path: Path, layouts: dict[str, np.ndarray]) -> None:
    """Atomic: two dedups writing at once each leave a whole cache; a read-only folder keeps none."""
    digests = sorted(layouts)
    try:
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, digests=np.array(digests, dtype=f"<U{_DIGEST_LENGTH}"),
                     layouts=np.stack([layouts[d] for d in digests]).astype(np.float32))
    except (OSError, UserError):   # a read-only index folder: layouts are computed each time
        pass
