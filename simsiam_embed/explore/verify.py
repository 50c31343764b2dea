"""Geometric verification of candidate duplicates: is the second picture the first one, moved?

The encoder is trained to ignore crops, flips, rescaling, re-encoding and colour changes, so its
nearest neighbours include exactly those copies, and also look-alikes (two t-shirts, two ants on
leaves). A pixel comparison cannot separate the two: it rejects a mirrored or cropped copy as
surely as a look-alike. Local features can: a copy shares many keypoints with its original
*under one similarity transform* (shift, scale, rotation), a look-alike does not. So each
candidate pair is matched with ORB features (Rublee et al. 2011; OpenCV), Lowe's ratio test, and
a RANSAC fit of a similarity transform; a mirrored copy is matched against the mirrored picture.
The evidence is the number of inliers, and whether the match was mirrored.

Pictures too small for keypoints (<= SMALL_SIDE px a side) are not judged here: the caller says
so instead of grouping them on weaker evidence.

Feature extraction, the costly part, runs in worker processes over the candidates' images only,
each image once, from the bytes the index recorded (a file changed since is not verified).
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simsiam_embed.index.thumbnails import indexed_bytes

if TYPE_CHECKING:   # the store imports FAISS and torch; picture-reading workers need neither
    from simsiam_embed.index.catalog import CatalogEntry

#: Pictures are reduced to this longer side first: enough keypoints for a copy, bounded cost.
VERIFY_SIDE = 480
#: Keypoints a picture (ORB's own cap).
FEATURES = 1500
#: Lowe's ratio test: a match counts when its best distance is below this share of the second best.
RATIO = 0.8
#: RANSAC's reprojection tolerance, as a share of the reduced picture's longer side.
REPROJECTION_SHARE = 0.015
#: A copy: at least this many inliers of one similarity transform (bench/RESULTS.md calibrates it).
MIN_INLIERS = 25
#: No keypoint detector says anything useful below this side.
SMALL_SIDE = 64


@dataclass(frozen=True)
class Features:
    points: np.ndarray        # N x 2 float32, in the reduced picture
    descriptors: np.ndarray   # N x 32 uint8 (ORB)
    width: int


@dataclass(frozen=True)
class PictureFeatures:
    plain: Features | None
    mirrored: Features | None
    small: bool               # too small for features: not verifiable here

    @property
    def verifiable(self) -> bool:
        """Enough keypoints that a copy could show MIN_INLIERS of them (a flat picture has few)."""
        return not self.small and self.plain is not None and len(self.plain.points) >= 2 * MIN_INLIERS


@dataclass(frozen=True)
class GeometricMatch:
    inliers: int
    mirrored: bool

    def describe(self) -> str:
        return f"geometry: {self.inliers} inliers{', mirrored' if self.mirrored else ''}"


def opencv_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def extract_features(entries: list[CatalogEntry], workers: int | None = None) -> list[PictureFeatures | None]:
    """Each entry's features (None: gone or changed since indexing, or unreadable), in worker processes."""
    workers = workers if workers is not None else min(len(entries), os.cpu_count() or 1)
    if workers <= 1 or len(entries) < 8:
        return [_features_of(entry) for entry in entries]
    # Spawned, not forked: a fork of a process whose other threads hold locks (FAISS's OpenMP,
    # ONNX Runtime's pool, PyTorch's) left workers asleep for ever in the first measurement.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_features_of, entries, chunksize=max(1, len(entries) // (4 * workers))))


def _features_of(entry: CatalogEntry) -> PictureFeatures | None:
    import cv2
    from PIL import Image

    from simsiam_embed.image_files import UnreadableImage, open_image

    cv2.setNumThreads(1)   # one process a core already
    data = indexed_bytes(entry)
    if data is None:
        return None
    try:
        picture = open_image(io.BytesIO(data), draft_side=VERIFY_SIDE).convert("L")
    except UnreadableImage:
        return None
    if min(picture.size) <= SMALL_SIDE:
        return PictureFeatures(None, None, small=True)
    scale = VERIFY_SIDE / max(picture.size)
    if scale < 1:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.BILINEAR)
    grey = np.asarray(picture)
    detector = cv2.ORB_create(nfeatures=FEATURES)

    def detect(pixels: np.ndarray) -> Features | None:
        keypoints, descriptors = detector.detectAndCompute(pixels, None)
        if descriptors is None or len(keypoints) < 8:
            return None
        points = np.array([keypoint.pt for keypoint in keypoints], dtype=np.float32)
        return Features(points, descriptors, pixels.shape[1])

    return PictureFeatures(detect(grey), detect(np.ascontiguousarray(grey[:, ::-1])), small=False)


def match(first: PictureFeatures, second: PictureFeatures) -> GeometricMatch | None:
    """The plain match of ``second`` onto ``first`` if it confirms a copy, else the better of it
    and the mirrored match (None: no features on one side). Most copies are not mirrored, and a
    match costs as much as extracting a picture's features, so the mirror is tried only when needed."""
    if first.plain is None:
        return None
    best = None
    for mirrored, other in ((False, second.plain), (True, second.mirrored)):
        if other is None:
            continue
        inliers = _inliers(first.plain, other)
        if best is None or inliers > best.inliers:
            best = GeometricMatch(inliers, mirrored)
        if best.inliers >= MIN_INLIERS:
            break
    return best


def _inliers(first: Features, second: Features) -> int:
    import cv2

    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = matcher.knnMatch(first.descriptors, second.descriptors, k=2)
    good = [pair[0] for pair in pairs if len(pair) == 2 and pair[0].distance < RATIO * pair[1].distance]
    if len(good) < 4:
        return len(good)
    source = first.points[[m.queryIdx for m in good]]
    target = second.points[[m.trainIdx for m in good]]
    tolerance = REPROJECTION_SHARE * max(first.width, second.width, 1)
    transform, mask = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC,
                                                  ransacReprojThreshold=tolerance, maxIters=2000, confidence=0.995)
    if transform is None or mask is None:
        return 0
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    if not 0.2 <= scale <= 5.0:   # a copy is not shrunk or blown up past this between the two
        return 0
    return int(mask.sum())
