"""Clusters: spherical k-means (FAISS) on the centred vectors, each cluster's size, cohesion,
images nearest its centre and folder labels."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from simsiam_embed.errors import Report, UserError
from simsiam_embed.explore.results import AnalysisResult
from simsiam_embed.explore.neighbours import CentredVectors, QUERY_CHUNK, entries_by_position
from simsiam_embed.index.store import LoadedIndex


@dataclass
class ClusterImage:
    id: int
    path: str
    label: str
    score: float          # cosine to the cluster's centre


@dataclass
class Cluster:
    number: int
    size: int
    cohesion: float       # mean cosine of the members to the centre
    nearest: list[ClusterImage]
    labels: dict[str, int] = field(default_factory=dict)   # folder labels of the members, when any
    #: Every member's catalogue id, nearest the centre first: the cluster whole (n ids over all clusters).
    member_ids: list[int] = field(default_factory=list)


@dataclass
class ClusterResult(AnalysisResult):
    listed = "clusters"
    k: int
    k_reason: str
    images: int
    clusters: list[Cluster]
    seconds: float


def default_cluster_count(count: int) -> int:
    """sqrt(n/2), the common rule of thumb, kept within 2..1000 and below n."""
    return max(2, min(1000, round(math.sqrt(count / 2)), count - 1)) if count > 2 else 1


KMEANS_ITERATIONS = 20
CLUSTER_EXAMPLES = 8


def find_clusters(loaded: LoadedIndex, k: int | None = None, examples: int = CLUSTER_EXAMPLES, seed: int = 0,
                  report: Report | None = None) -> ClusterResult:
    """Spherical k-means (FAISS) on the index's vectors; each cluster's size, cohesion, and the
    ``examples`` images nearest its centre. Largest cluster first."""
    started = time.monotonic()
    vectors, count = CentredVectors(loaded.vectors, loaded.mean_vector()), loaded.count
    if count < 2:
        raise UserError("the index holds one image: there is nothing to cluster")
    reason = "the number asked for"
    if k is None:
        k, reason = default_cluster_count(count), f"sqrt(n/2) for {count:,} images"
    elif k > count:
        raise UserError(f"-k {k} is more than the {count} images in the index: use -k {count} or less")
    # min_points_per_centroid 1: k = sqrt(n/2) leaves fewer points a centroid than FAISS's 39, by
    # design; FAISS would print a warning on stderr (from C++, past any verbose flag) for each run.
    kmeans = faiss.Kmeans(vectors.dim, k, niter=KMEANS_ITERATIONS, spherical=True, seed=seed, verbose=False,
                          min_points_per_centroid=1)
    # k-means trains on at most 256 points a centroid (FAISS's own sampling), then every vector
    # is assigned in chunks: memory stays n x (one id + one score) beyond the mapped vectors.
    kmeans.train(_training_sample(vectors, k * kmeans.cp.max_points_per_centroid, seed))
    assignment = np.empty(count, dtype=np.int64)
    similarity = np.empty(count, dtype=np.float32)
    for start in range(0, count, QUERY_CHUNK):
        scores, nearest = kmeans.index.search(vectors.rows(start, start + QUERY_CHUNK), 1)
        assignment[start:start + len(nearest)] = nearest[:, 0]
        similarity[start:start + len(nearest)] = scores[:, 0]
    entries = entries_by_position(loaded)
    clusters = []
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(k + 1))
    for centre in range(k):
        members = order[bounds[centre]:bounds[centre + 1]]
        if len(members) == 0:
            continue
        ranked = members[np.argsort(-similarity[members], kind="stable")]
        best = ranked[:examples]
        labels: dict[str, int] = {}
        for position in members.tolist():
            label = entries[position].label
            if label:
                labels[label] = labels.get(label, 0) + 1
        clusters.append(Cluster(
            0, len(members), round(float(similarity[members].mean()), 6),
            [ClusterImage(entries[p].id, entries[p].path, entries[p].label, round(float(similarity[p]), 6)) for p in best],
            dict(sorted(labels.items(), key=lambda item: -item[1])),
            [entries[p].id for p in ranked.tolist()],
        ))
    clusters.sort(key=lambda cluster: -cluster.size)
    for number, cluster in enumerate(clusters, start=1):
        cluster.number = number
    if report is not None:
        report(f"k-means: {k} clusters ({reason}), {KMEANS_ITERATIONS} iterations")
    return ClusterResult(k, reason, count, clusters, time.monotonic() - started)


def _training_sample(vectors: CentredVectors, wanted: int, seed: int) -> np.ndarray:
    if len(vectors) <= wanted:
        return vectors.rows(0, len(vectors))
    return vectors.take(np.sort(np.random.default_rng(seed).choice(len(vectors), wanted, replace=False)))
