"""Geometric verification of candidate duplicates: is the second picture the first one, moved?

The encoder is trained to ignore crops, flips, rescaling, re-encoding and colour changes, so its
nearest neighbours include exactly those copies, and also look-alikes (two t-shirts, two ants on
leaves). A pixel comparison cannot separate the two: it rejects a mirrored or cropped copy as
surely as a look-alike. Local features can: a copy shares many keypoints with its original
*under one similarity transform* (shift, scale, rotation), a look-alike does not. So each
candidate pair is matched with ORB features (Rublee et al. 2011; OpenCV), Lowe's ratio test, and
a RANSAC fit of a similarity transform; a mirrored copy is matched against the mirrored picture.

Keypoints agreeing on one transform are not enough on their own: two different motorbikes on a
white background, or two shots of one street, share 30-50 such keypoints (on the wheels, on the
buildings). A copy is more: the transform lays one picture over most of the other, and there the
two are the same picture. So a match is a copy when (:meth:`GeometricMatch.is_copy`)

- at least MIN_INLIERS keypoints agree on one transform,
- under it each picture covers at least MIN_OVERLAP of the other, and
- aligned by it, the pictures agree: their fine detail correlates at least MIN_DETAIL_AGREEMENT
  on average over the overlap's windows (another motorbike, another person, another subject in front
  of the same background do not).

Pictures too small for keypoints (<= SMALL_SIDE px a side) are not judged here: the caller says
so instead of grouping them on weaker evidence.

Feature extraction, the costly part, runs in worker processes over the candidates' images only,
each image once, from the bytes the index recorded (a file changed since is not verified).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simsiam_embed.explore.workers import map_in_workers
from simsiam_embed.optional import installed
from simsiam_embed.index.thumbnails import indexed_bytes

if TYPE_CHECKING:   # the store imports FAISS and torch; picture-reading workers need neither
    from simsiam_embed.index.catalog import CatalogEntry

#: Pictures are brought to this longer side first: enough keypoints for a copy, bounded cost.
VERIFY_SIDE = 480
#: Keypoints a picture (ORB's own cap).
FEATURES = 1500
#: Lowe's ratio test: a match counts when its best distance is below this share of the second best.
RATIO = 0.8
#: RANSAC's reprojection tolerance, as a share of the reduced picture's longer side.
REPROJECTION_SHARE = 0.015
#: A copy: at least this many inliers of one similarity transform (bench/RESULTS.md calibrates it),
MIN_INLIERS = 25
#: each picture covering at least this share of the other under that transform (a crop to 85% of
#: the sides covers 72% of its original),
MIN_OVERLAP = 0.6
#: and the aligned pictures' fine detail correlating at least this much, on average over the overlap's windows
#: (bench/bench_verify_pairs.py: copies against look-alikes, bench/RESULTS.md).
MIN_DETAIL_AGREEMENT = 0.6
#: Aligned pictures are compared at this longer side: detail enough to tell two motorbikes apart,
#: and a transform found on the 480-px picture is accurate to a pixel here.
ALIGN_SIDE = 128
#: The aligned pictures are compared window by window, windows this many pixels a side at ALIGN_SIDE,
AGREEMENT_WINDOW = 16
#: those with detail of at least this many grey levels (standard deviation) in either picture.
DETAIL_FLOOR = 2.0
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
    #: The picture in grey at ALIGN_SIDE, uint8 (None when small), and the reduced picture's
    #: size (width, height) the keypoints are in.
    thumbnail: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def verifiable(self) -> bool:
        """Enough keypoints that a copy could show MIN_INLIERS of them (a flat picture has few)."""
        return not self.small and self.plain is not None and len(self.plain.points) >= 2 * MIN_INLIERS


@dataclass(frozen=True)
class GeometricMatch:
    inliers: int
    mirrored: bool
    #: The smaller of the shares of each picture that the other covers under the transform.
    overlap: float = 0.0
    #: Correlation of the aligned pictures' fine detail, the mean over the overlap's windows (1: the same picture).
    agreement: float = 0.0

    @property
    def is_copy(self) -> bool:
        return (self.inliers >= MIN_INLIERS and self.overlap >= MIN_OVERLAP
                and self.agreement >= MIN_DETAIL_AGREEMENT)

    def describe(self) -> str:
        return (f"geometry: {self.inliers} keypoints on one transform, {self.overlap:.0%} overlap, "
                f"aligned detail agrees {self.agreement:.2f}{', mirrored' if self.mirrored else ''}")


def opencv_available() -> bool:
    return installed("cv2")


def extract_features(entries: list[CatalogEntry], workers: int | None = None) -> list[PictureFeatures | None]:
    """Each entry's features (None: gone or changed since indexing, or unreadable), in worker processes."""
    return map_in_workers(_features_of, entries, workers)


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
    # Every picture at VERIFY_SIDE: larger ones reduced (cost), smaller ones enlarged, since ORB's
    # 31-px patches find too few keypoints on a 180 x 120 picture to confirm its copy.
    scale = VERIFY_SIDE / max(picture.size)
    if scale != 1:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.BILINEAR if scale < 1 else Image.BICUBIC)
    grey = np.asarray(picture)
    thumbnail_scale = ALIGN_SIDE / max(grey.shape)
    thumbnail = cv2.resize(grey, (max(1, round(grey.shape[1] * thumbnail_scale)),
                                  max(1, round(grey.shape[0] * thumbnail_scale))), interpolation=cv2.INTER_AREA)
    detector = cv2.ORB_create(nfeatures=FEATURES)

    def detect(pixels: np.ndarray) -> Features | None:
        keypoints, descriptors = detector.detectAndCompute(pixels, None)
        if descriptors is None or len(keypoints) < 8:
            return None
        points = np.array([keypoint.pt for keypoint in keypoints], dtype=np.float32)
        return Features(points, descriptors, pixels.shape[1])

    return PictureFeatures(detect(grey), detect(np.ascontiguousarray(grey[:, ::-1])), small=False,
                           thumbnail=thumbnail, size=(grey.shape[1], grey.shape[0]))


def match(first: PictureFeatures, second: PictureFeatures) -> GeometricMatch | None:
    """The plain match of ``second`` onto ``first`` if it is a copy, else the better of it and the
    mirrored match (None: no features on one side). Most copies are not mirrored, and a match
    costs as much as extracting a picture's features, so the mirror is tried only when needed."""
    if first.plain is None:
        return None
    best = None
    for mirrored, other in ((False, second.plain), (True, second.mirrored)):
        if other is None:
            continue
        found = _aligned_match(first, second, other, mirrored)
        if best is None or (found.is_copy, found.inliers) > (best.is_copy, best.inliers):
            best = found
        if best.is_copy:
            break
    return best


@dataclass(frozen=True)
class _Fit:
    """Keypoints agreeing on one similarity transform (2 x 3, first's reduced picture -> second's)
    and where they lie in the second picture; and, where the rest of the matches agree on a
    second transform (a subject that moved between two frames of a burst), that one and where its
    keypoints lie."""
    inliers: int
    transform: np.ndarray | None = None
    points: np.ndarray | None = None
    moved: np.ndarray | None = None
    moved_points: np.ndarray | None = None


def _aligned_match(first: PictureFeatures, second: PictureFeatures, other: Features, mirrored: bool) -> GeometricMatch:
    fit = _inliers(first.plain, other)
    if fit.transform is None:
        return GeometricMatch(fit.inliers, mirrored)
    overlap, agreement = _alignment(first, second, fit, mirrored)
    return GeometricMatch(fit.inliers, mirrored, overlap, agreement)


def _inliers(first: Features, second: Features) -> _Fit:
    import cv2

    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = matcher.knnMatch(first.descriptors, second.descriptors, k=2)
    good = [pair[0] for pair in pairs if len(pair) == 2 and pair[0].distance < RATIO * pair[1].distance]
    if len(good) < 4:
        return _Fit(len(good))
    source = first.points[[m.queryIdx for m in good]]
    target = second.points[[m.trainIdx for m in good]]
    tolerance = REPROJECTION_SHARE * max(first.width, second.width, 1)

    def fitted(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        transform, mask = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=tolerance,
                                                      maxIters=2000, confidence=0.995)
        if transform is None or mask is None:
            return None, np.zeros(len(source), bool)
        scale = float(np.hypot(transform[0, 0], transform[1, 0]))
        if not 0.2 <= scale <= 5.0:   # a copy is not shrunk or blown up past this between the two
            return None, np.zeros(len(source), bool)
        return transform, mask.ravel().astype(bool)

    transform, agreeing = fitted(source, target)
    if transform is None:
        return _Fit(0)
    fit = _Fit(int(agreeing.sum()), transform, target[agreeing])
    rest = ~agreeing
    if rest.sum() >= MIN_INLIERS:
        moved, moved_agreeing = fitted(source[rest], target[rest])
        if moved is not None and moved_agreeing.sum() >= MIN_INLIERS:
            return dataclasses.replace(fit, moved=moved, moved_points=target[rest][moved_agreeing])
    return fit


def _alignment(first: PictureFeatures, second: PictureFeatures, fit: _Fit, mirrored: bool) -> tuple[float, float]:
    """(overlap, detail agreement) of ``first`` laid over ``second`` (mirrored or not) by the
    fit's transform: the smaller share of either picture the other covers, and the agreement of
    their fine detail (each thumbnail less its blur: edges and texture, not the layout of light
    and dark, which two objects on one white background share) over that overlap
    (:func:`_local_agreement`). Where a second
    transform moved a part (a burst's subject), each place is laid by the transform whose
    keypoints are nearer to it."""
    import cv2

    target = second.thumbnail[:, ::-1] if mirrored else second.thumbnail
    target = np.ascontiguousarray(target, dtype=np.float32)
    source = first.thumbnail.astype(np.float32)
    # The transforms work on the reduced pictures; the thumbnails are those at another scale.
    into_source = first.thumbnail.shape[1] / first.size[0]
    into_target = target.shape[1] / second.size[0]

    def on_thumbnails(transform: np.ndarray) -> np.ndarray:
        scaled = transform.astype(np.float64).copy()
        scaled[:, :2] *= into_target / into_source
        scaled[:, 2] *= into_target
        return scaled

    height, width = target.shape
    main = on_thumbnails(fit.transform)
    laid = cv2.warpAffine(source, main, (width, height), flags=cv2.INTER_LINEAR)
    covered = cv2.warpAffine(np.ones_like(source), main, (width, height), flags=cv2.INTER_LINEAR)
    if fit.moved is not None:
        def distance_to(points: np.ndarray) -> np.ndarray:
            away = np.ones((height, width), np.uint8)
            at = np.clip((points * into_target).astype(np.int32), 0, [width - 1, height - 1])
            away[at[:, 1], at[:, 0]] = 0
            return cv2.distanceTransform(away, cv2.DIST_L2, 3)

        moved = cv2.warpAffine(source, on_thumbnails(fit.moved), (width, height), flags=cv2.INTER_LINEAR)
        laid = np.where(distance_to(fit.moved_points) < distance_to(fit.points), moved, laid)
    inside = cv2.erode((covered > 0.999).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0   # no edge of the frame
    area = float((covered > 0.5).sum())
    scale_squared = abs(float(np.linalg.det(main[:, :2])))
    overlap = min(area / target.size, area / scale_squared / source.size) if scale_squared > 0 else 0.0
    return overlap, _local_agreement(_detail(laid), _detail(target), inside)


def _local_agreement(first: np.ndarray, second: np.ndarray, inside: np.ndarray) -> float:
    """The mean over the overlap's windows with detail (in either picture) of their detail's
    correlation. Window by window, not over the whole: one busy region (gravel, grass) would
    otherwise outweigh a calm one where the pictures differ (a smooth subject in front of it);
    windows without detail in either (a white background) say nothing and are left out."""
    correlations = []
    for top in range(0, inside.shape[0] - AGREEMENT_WINDOW + 1, AGREEMENT_WINDOW):
        for left in range(0, inside.shape[1] - AGREEMENT_WINDOW + 1, AGREEMENT_WINDOW):
            window = (slice(top, top + AGREEMENT_WINDOW), slice(left, left + AGREEMENT_WINDOW))
            kept = inside[window]
            if kept.mean() < 0.9:   # mostly outside the overlap
                continue
            a, b = first[window][kept], second[window][kept]
            a, b = a - a.mean(), b - b.mean()
            energy_a, energy_b = float((a * a).mean()), float((b * b).mean())
            if max(energy_a, energy_b) < DETAIL_FLOOR ** 2:
                continue
            correlations.append(float((a * b).mean()) / np.sqrt(energy_a * energy_b) if min(energy_a, energy_b) > 0 else 0.0)
    return float(np.mean(correlations)) if correlations else 0.0


def _detail(picture: np.ndarray) -> np.ndarray:
    """A band of fine detail: lightly smoothed (JPEG noise, a pixel of misalignment) less a wider
    blur (shading, the background's light)."""
    import cv2

    return cv2.GaussianBlur(picture, (0, 0), 1.0) - cv2.GaussianBlur(picture, (0, 0), 4.0)
