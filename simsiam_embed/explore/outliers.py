"""Outliers: the images least like their nearest neighbours (mean centred cosine), oddest first."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simsiam_embed.explore.results import AnalysisResult
from simsiam_embed.explore.neighbours import CentredVectors, entries_by_position, neighbour_graph
from simsiam_embed.index.store import LoadedIndex
from simsiam_embed.settings import OUTLIER_NEIGHBOURS
from simsiam_embed.errors import Report


@dataclass
class Outlier:
    rank: int
    id: int
    path: str
    label: str
    score: float              # mean cosine to its nearest neighbours: the lower, the odder
    nearest_id: int
    nearest_path: str
    nearest_score: float


@dataclass
class OutlierResult(AnalysisResult):
    listed = "outliers"
    neighbours: int
    method: str
    images: int
    outliers: list[Outlier]
    median_score: float       # the typical image's score, for scale


def find_outliers(loaded: LoadedIndex, count: int = 50, neighbours: int = OUTLIER_NEIGHBOURS,
                  report: Report | None = None) -> OutlierResult:
    """The ``count`` images least similar to their nearest neighbours (mean cosine to the
    ``neighbours`` nearest), oddest first."""
    entries = entries_by_position(loaded)
    graph = neighbour_graph(CentredVectors(loaded.vectors, loaded.mean_vector()), neighbours, report)
    found = graph.scores > -np.inf
    mean_similarity = np.where(found, graph.scores, 0).sum(axis=1) / np.maximum(found.sum(axis=1), 1)
    oddest = np.argsort(mean_similarity, kind="stable")[:count]
    outliers = []
    for rank, position in enumerate(oddest.tolist(), start=1):
        entry, nearest = entries[position], int(graph.positions[position, 0])
        outliers.append(Outlier(
            rank, entry.id, entry.path, entry.label, round(float(mean_similarity[position]), 6),
            entries[nearest].id if nearest >= 0 else -1, entries[nearest].path if nearest >= 0 else "",
            round(float(graph.scores[position, 0]), 6),
        ))
    return OutlierResult(graph.scores.shape[1], graph.method, len(entries), outliers,
                         round(float(np.median(mean_similarity)), 6))
