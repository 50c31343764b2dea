"""What the embeddings found: near-duplicate groups, clusters, outliers and a 2-D map of an index.

Each analysis is a module of its own (``duplicates``, ``clusters``, ``outliers``, ``projection``)
over the k-NN graph and centred vectors of ``neighbours``; this module names them together for
the Python API. Every analysis works on the vectors an index folder already holds and scales
through FAISS.

    >>> loaded = load_index(Path("index"), for_search=False)
    >>> groups = find_duplicates(loaded).groups
    >>> clusters = find_clusters(loaded).clusters
"""

from __future__ import annotations

from simsiam_embed.explore.clusters import Cluster, ClusterImage, ClusterResult, default_cluster_count, find_clusters
from simsiam_embed.explore.duplicates import (
    CANDIDATE_SOURCES, PLAN_ORDER, PLAN_RULES, DuplicateGroup, DuplicateMember, DuplicateResult, DuplicateRule,
    GeometricAgreement, PixelAgreement, choose_keepers, confirm_plan, find_duplicates, mutual_near_pairs,
    nearest_pairs, pixel_signature, with_decisions, with_plan,
)
from simsiam_embed.explore.neighbours import CentredVectors, NeighbourGraph, PlainVectors, neighbour_graph
from simsiam_embed.explore.outliers import Outlier, OutlierResult, find_outliers
from simsiam_embed.explore.projection import MapPoint, MapResult, principal_components, project_to_map, umap_available
from simsiam_embed.explore.results import AnalysisResult

__all__ = [
    "AnalysisResult", "CANDIDATE_SOURCES", "CentredVectors", "Cluster", "ClusterImage", "ClusterResult",
    "DuplicateGroup", "DuplicateMember", "DuplicateResult", "DuplicateRule", "GeometricAgreement", "MapPoint",
    "MapResult", "NeighbourGraph", "Outlier", "OutlierResult", "PLAN_ORDER", "PLAN_RULES", "PixelAgreement",
    "PlainVectors", "choose_keepers", "confirm_plan", "default_cluster_count", "find_clusters", "find_duplicates",
    "find_outliers", "mutual_near_pairs", "nearest_pairs", "neighbour_graph", "pixel_signature",
    "principal_components", "project_to_map", "umap_available", "with_decisions", "with_plan",
]
