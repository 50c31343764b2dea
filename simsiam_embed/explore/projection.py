"""The 2-D map: UMAP when umap-learn is installed (the [map] extra), else PCA, of a sample of the
centred vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simsiam_embed.errors import Report, UserError
from simsiam_embed.explore.results import AnalysisResult
from simsiam_embed.optional import installed
from simsiam_embed.explore.neighbours import entries_by_position
from simsiam_embed.index.store import LoadedIndex
from simsiam_embed.settings import MAP_MAX_POINTS


@dataclass
class MapPoint:
    id: int
    path: str
    label: str
    x: float
    y: float


@dataclass
class MapResult(AnalysisResult):
    listed = "points"
    method: str
    note: str
    images: int
    points: list[MapPoint]


def umap_available() -> bool:
    return installed("umap", "UMAP")


def project_to_map(loaded: LoadedIndex, method: str = "auto", max_points: int = MAP_MAX_POINTS, seed: int = 0,
                   report: Report | None = None) -> MapResult:
    """Each image as a point in 2-D: UMAP (umap-learn, the ``[map]`` extra) when installed,
    else PCA, and said so. At most ``max_points`` images, drawn evenly at random."""
    if method not in ("auto", "umap", "pca"):
        raise UserError(f"unknown projection {method!r}: choose auto, umap or pca")
    if method == "umap" and not umap_available():
        raise UserError("--method umap needs umap-learn: pip install 'simsiam-embed[map]'")
    entries = entries_by_position(loaded)
    rows = np.arange(len(entries))
    note = ""
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_points, replace=False))
        note = f"a random {max_points:,} of the {len(entries):,} images. "
    vectors = np.asarray(loaded.vectors[rows], dtype=np.float32)
    use_umap = method == "umap" or (method == "auto" and umap_available() and len(rows) >= 16)
    if use_umap:
        from umap import UMAP

        coordinates = UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(vectors)
        name = "UMAP"
    else:
        coordinates = principal_components(vectors, 2)
        name = "PCA"
        if method == "auto":
            note += "PCA: umap-learn is not installed (pip install 'simsiam-embed[map]' for UMAP, which keeps " \
                    "neighbourhoods better)."
    if report is not None:
        report(f"map: {name} of {len(rows):,} images")   # the note travels in the result
    points = [MapPoint(entries[p].id, entries[p].path, entries[p].label, round(float(x), 5), round(float(y), 5))
              for p, (x, y) in zip(rows.tolist(), coordinates)]
    return MapResult(name, note.strip(), len(entries), points)


def principal_components(vectors: np.ndarray, components: int) -> np.ndarray:
    """Coordinates of ``vectors`` on their first principal axes (signs fixed for repeatability)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    if len(centred) < 2:
        return np.zeros((len(centred), components), dtype=np.float32)
    covariance = centred.T @ centred / (len(centred) - 1)
    values, axes = np.linalg.eigh(covariance.astype(np.float64))
    axes = axes[:, np.argsort(values)[::-1][:components]]
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), range(axes.shape[1])] < 0, -1, 1)
    coordinates = centred @ axes.astype(np.float32)
    if coordinates.shape[1] < components:
        coordinates = np.pad(coordinates, ((0, 0), (0, components - coordinates.shape[1])))
    return coordinates
