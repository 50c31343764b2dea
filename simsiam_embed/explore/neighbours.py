"""The k-NN graph every explore analysis shares, over vectors centred on the index's mean.

Similarities here are cosines of the vectors *centred* on the index's mean vector. Pooled CNN
features (after a ReLU) all point into one corner of the space: on the bundled sample the
typical image's nearest neighbours are at raw cosine 0.96, so no fixed raw threshold could mean
"near-duplicate" for every encoder and collection. Centred, unrelated images score near 0 and
a copy near 1, and the calibrated threshold carries over (bench/RESULTS.md).

Neighbours come from a k-NN graph (exact up to :data:`EXACT_NEIGHBOURS_MAX` vectors, an
inverted-file search beyond), never from an n x n similarity matrix, so memory grows with
n x k, not n squared (imagededup's all-pairs matrix runs out of memory near 60k images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from simsiam_embed.errors import Report, UserError
from simsiam_embed.index.catalog import CatalogEntry
from simsiam_embed.index.store import LoadedIndex, centred, vectors_mean


#: Exact k-NN up to here: n^2 x d multiply-adds, about 10 s at 50k x 512 on 2 cores.
EXACT_NEIGHBOURS_MAX = 50_000
#: Beyond, an IVF search that visits this many of its ~4 sqrt(n) lists a query: near-duplicates
#: and close neighbours share a list or an adjacent one (recall measured in bench/bench_explore.py).
NEIGHBOUR_NPROBE = 16
#: Queries a FAISS call: bounds the result buffers (chunk x (k+1) x 12 bytes) and the mmap reads.
QUERY_CHUNK = 16_384


@dataclass
class NeighbourGraph:
    """Row i: the ``k`` nearest other vectors of vector i (positions, not ids), best first;
    position -1 and score -inf pad rows of an approximate search that found fewer."""

    positions: np.ndarray   # (n, k) int64
    scores: np.ndarray      # (n, k) float32, cosine
    method: str


class PlainVectors:
    """Vectors (an array, or a memory-mapped VectorFile) read in chunks, each row as it is: the
    colour layouts, already unit vectors."""

    def __init__(self, vectors: np.ndarray):
        self.source = vectors

    def __len__(self) -> int:
        return len(self.source)

    @property
    def dim(self) -> int:
        return self.source.shape[1]

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self._prepared(np.asarray(self.source[start:stop], dtype=np.float32))

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self._prepared(np.asarray(self.source[np.asarray(positions)], dtype=np.float32))

    def _prepared(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rows)


class CentredVectors(PlainVectors):
    """The index's unit vectors minus their mean, re-normalised; read in chunks, so the memory
    beyond the (memory-mapped) source is one chunk, never a second copy of the vectors."""

    def __init__(self, vectors: np.ndarray, mean: np.ndarray | None = None):
        super().__init__(vectors)
        self.mean = vectors_mean(vectors) if mean is None else mean

    def _prepared(self, rows: np.ndarray) -> np.ndarray:
        return centred(rows, self.mean)


def neighbour_graph(vectors: CentredVectors | PlainVectors, k: int, report: Report | None = None,
                    mirrored: np.ndarray | None = None) -> NeighbourGraph:
    """The ``k`` nearest neighbours of every row of ``vectors``, itself excluded. ``mirrored``: a
    column order that turns a vector into its mirror image's; each row is then also searched
    mirrored, and a neighbour's score is the better of the two."""
    count, dim = len(vectors), vectors.dim
    k = min(k, count - 1)
    if k < 1:
        raise UserError("the index holds one image: there is nothing to compare it with")
    if count <= EXACT_NEIGHBOURS_MAX:
        index, method = faiss.IndexFlatIP(dim), f"exact k-NN ({count:,} vectors)"
    else:
        lists = int(4 * math.sqrt(count))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        # FAISS's k-means warns below 39 training points a list: ~40 a list, strided over the
        # index, trains the lists well enough for neighbour search at a fraction of the cost.
        index.train(vectors.take(np.arange(0, count, max(1, count // (lists * 40)))))
        index.nprobe = NEIGHBOUR_NPROBE
        method = f"IVF k-NN ({count:,} vectors, {lists} lists, {NEIGHBOUR_NPROBE} searched a query)"
    for start in range(0, count, QUERY_CHUNK):
        index.add(vectors.rows(start, start + QUERY_CHUNK))
    if report is not None:
        report(f"neighbours: {method}{', mirrored too' if mirrored is not None else ''}")
    positions = np.full((count, k), -1, dtype=np.int64)
    scores = np.full((count, k), -np.inf, dtype=np.float32)
    for start in range(0, count, QUERY_CHUNK):
        queries = vectors.rows(start, start + QUERY_CHUNK)
        found_scores, found = index.search(queries, k + 1)
        if mirrored is not None:
            mirror_scores, mirror_found = index.search(np.ascontiguousarray(queries[:, mirrored]), k + 1)
            found, found_scores = _best_of_both(found, found_scores, mirror_found, mirror_scores)
        # Drop each query itself by position, not by rank: an exact copy may tie with it.
        itself = np.arange(start, start + len(found))[:, None]
        wanted = (found != itself) & (found >= 0)
        first_k = np.argsort(~wanted, axis=1, kind="stable")[:, :k]   # the wanted ones, in rank order
        kept = np.take_along_axis(wanted, first_k, axis=1)
        positions[start:start + len(found)] = np.where(kept, np.take_along_axis(found, first_k, axis=1), -1)
        scores[start:start + len(found)] = np.where(kept, np.take_along_axis(found_scores, first_k, axis=1), -np.inf)
    return NeighbourGraph(positions, scores, method)


def _best_of_both(found: np.ndarray, scores: np.ndarray, other_found: np.ndarray,
                  other_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two searches' results merged, best first, each position once at its better score."""
    width = found.shape[1]
    both = np.concatenate([found, other_found], axis=1)
    both_scores = np.concatenate([scores, other_scores], axis=1)
    order = np.argsort(-both_scores, axis=1, kind="stable")
    both, both_scores = np.take_along_axis(both, order, axis=1), np.take_along_axis(both_scores, order, axis=1)
    seen_before = np.zeros(both.shape, dtype=bool)
    for column in range(1, both.shape[1]):
        seen_before[:, column] = (both[:, :column] == both[:, column:column + 1]).any(axis=1)
    seen_before &= both >= 0
    keep = np.argsort(seen_before, axis=1, kind="stable")[:, :width]   # the first of each, in rank order
    return np.take_along_axis(both, keep, axis=1), np.take_along_axis(both_scores, keep, axis=1)


def entries_by_position(loaded: LoadedIndex) -> list[CatalogEntry]:
    """The catalogue entries in the order of the index's vectors (row i: the entry of ids[i])."""
    return loaded.entries.in_order(loaded.ids)
