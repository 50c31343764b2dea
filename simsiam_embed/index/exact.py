"""Exact inner products from the float32 vectors: a full k-NN scan, at bf16 speed where the CPU
has bf16 units, and the exact re-ranking of an approximate index's candidates.

    >>> scores, positions = exact_neighbours(queries, vectors, k=10)   # vectors: array or VectorFile
    >>> scores, ids = RerankedIndex(ivf_pq, vectors, ids).search(queries, k=10)

An exact scan is memory-bound: every query batch reads every vector once. On a CPU that
multiplies bf16 in hardware (AMX, AVX512-BF16) the scan reads the vectors as bf16, half the
bytes and twice the arithmetic rate, keeps a few times ``k`` candidates a query, and scores those
again in float32. The answer is then proven exact, not hoped to be: a bf16 score is within a
known margin of the float32 one (below), so a vector the scan left out scores at most the
lowest candidate's bf16 score plus that margin; a query whose k-th float32 score clears that
bound has its exact answer, and the rare query that does not (near-ties at rank k) is scanned
again in float32. Elsewhere the scan is float32 from the start.

The vectors are read in blocks (an array, or a generation's ``vectors.npy`` of any size through
index/vector_file.py): the memory beyond them is one block, never a second copy.

An approximate index's compressed codes rank candidates coarsely; :class:`RerankedIndex` scores
``k_factor`` times k of them again from the float32 vectors (read from the file: the candidates'
rows only), where FAISS's ``Refine`` stage would keep a second, quantised copy of every vector
in memory.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from simsiam_embed.settings import cpu_has_native_bf16

#: Rows scored per block: 64 MiB of bf16 at 512-d, big enough to run the matmul at speed.
BLOCK_ROWS = 65_536
#: Candidate vectors gathered at once to be scored again (groups of queries): 16 MiB.
RESCORE_BYTES = 16 << 20
#: Candidates a re-ranking search scores at once (groups of queries): ~1 MB of ids a group.
RERANK_CANDIDATES = 131_072
#: bf16 keeps 8 significant bits: rounding moves a value by at most this fraction of it.
BF16_UNIT_ROUNDOFF = 2.0 ** -8
#: Candidates a query keeps from the bf16 scan: enough that near-ties at rank k rarely leave a
#: query unproven (16 of 100 random queries on 1M vectors were at 42 candidates).
MIN_CANDIDATES = 128


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int,
                     precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One search of :class:`ExactSearch`, converting the vectors block by block (no copy kept)."""
    return ExactSearch(vectors, precision, keep_copy=False).search(queries, k)


class ExactSearch:
    """Exact inner-product search over fixed ``vectors`` (see the module docstring).

    ``precision``: "bf16" or "fp32" for the first scan; None chooses bf16 where the CPU has bf16
    units. Either way the answer is float32's. ``keep_copy``: keep the bf16 copy (half the
    vectors' bytes) for the next search; without it each search converts block by block.
    """

    def __init__(self, vectors: np.ndarray, precision: str | None = None, keep_copy: bool = True):
        self.vectors = vectors
        self.precision = precision or ("bf16" if cpu_has_native_bf16() else "fp32")
        self._copy: list[torch.Tensor] | None = None
        self._largest_norm = 0.0
        if keep_copy and self.precision == "bf16":
            self._copy = [block for _start, block in self._blocks(torch.bfloat16)]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the ``k`` largest inner products of each query with the rows,
        best first; rows of -1 (score -inf) pad when there are fewer than ``k`` rows."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = min(k, len(self.vectors))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        if found == 0 or len(queries) == 0:
            return scores, positions
        candidates = min(len(self.vectors), max(4 * found, MIN_CANDIDATES))
        if self.precision == "fp32" or candidates == len(self.vectors):
            scores[:, :found], positions[:, :found] = self._scan(queries, found, torch.float32)
            return scores, positions
        approximate, candidate_rows = self._scan(queries, candidates, torch.bfloat16)
        rescored = _rescore(queries, self.vectors, candidate_rows)
        order = np.argsort(-rescored, axis=1, kind="stable")[:, :found]
        best_scores = np.take_along_axis(rescored, order, axis=1)
        best = np.take_along_axis(candidate_rows, order, axis=1)
        # A row outside the candidates has a bf16 score at most the last candidate's; its float32
        # score is at most the bound below. Clearing the bound proves the answer exact.
        bound = _float32_bound(approximate[:, -1], queries, self._largest_norm)
        unproven = np.flatnonzero(~(best_scores[:, -1] > bound))
        if len(unproven):
            best_scores[unproven], best[unproven] = self._scan(queries[unproven], found, torch.float32)
        scores[:, :found], positions[:, :found] = best_scores, best
        return scores, positions

    def _blocks(self, dtype: torch.dtype):
        """(start, block in ``dtype``), noting the largest row norm as it goes."""
        if self._copy is not None and dtype == torch.bfloat16:
            yield from zip(range(0, len(self.vectors), BLOCK_ROWS), self._copy)
            return
        for start in range(0, len(self.vectors), BLOCK_ROWS):
            # Writable for torch: a read-only memory map's block is copied (it is read anyway).
            block = torch.from_numpy(np.require(self.vectors[start:start + BLOCK_ROWS], np.float32, ["C", "W"]))
            self._largest_norm = max(self._largest_norm, float(block.norm(dim=1).max()))
            yield start, block.to(dtype)

    def _scan(self, queries: np.ndarray, keep: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The ``keep`` best (scores, positions) of each query by a scan in ``dtype``."""
        query_tensor = torch.from_numpy(queries).to(dtype)
        best_scores = torch.empty((len(queries), 0), dtype=torch.float32)
        best = torch.empty((len(queries), 0), dtype=torch.int64)
        with torch.no_grad():
            for start, block in self._blocks(dtype):
                top_scores, top = (query_tensor @ block.T).float().topk(min(keep, len(block)), dim=1)
                merged_scores = torch.cat([best_scores, top_scores], dim=1)
                merged = torch.cat([best, top + start], dim=1)
                best_scores, order = merged_scores.topk(min(keep, merged_scores.shape[1]), dim=1)
                best = merged.gather(1, order)
        return best_scores.numpy(), best.numpy()


def _float32_bound(bf16_scores: np.ndarray, queries: np.ndarray, largest_norm: float) -> np.ndarray:
    """The largest float32 score a row can have whose bf16 score is ``bf16_scores``, per query.

    With u = 2^-8: rounding the result to bf16 moved it by at most u of itself, so before that it
    was at most s + u |s| / (1 - u); rounding the two inputs moved each product by at most
    (2u + u^2) of it, so the sum by that much of |q| |x| (Cauchy-Schwarz); float32 accumulation
    adds under d 2^-24 of |q| |x| (written as d 2^-23, room to spare).
    """
    u, dim = BF16_UNIT_ROUNDOFF, queries.shape[1]
    inputs = (2 * u + u * u + dim * 2.0 ** -23) * np.linalg.norm(queries, axis=1) * largest_norm
    return bf16_scores + u * np.abs(bf16_scores) / (1 - u) + inputs


def _rescore(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 inner products of each query with its candidate rows; -inf where a row is -1 (no
    candidate). Queries go in groups whose candidates fill RESCORE_BYTES, each group's rows read
    once each and in file order."""
    scores = np.empty(rows.shape, dtype=np.float32)
    group = max(1, RESCORE_BYTES // max(1, rows.shape[1] * queries.shape[1] * 4))
    for start in range(0, len(queries), group):
        some = np.maximum(rows[start:start + group], 0)
        unique, inverse = np.unique(some, return_inverse=True)
        candidates = np.asarray(vectors[unique], dtype=np.float32)[inverse.reshape(some.shape)]
        scores[start:start + group] = np.einsum("qd,qcd->qc", queries[start:start + group], candidates)
    return np.where(rows >= 0, scores, np.float32(-np.inf))


class RerankedIndex:
    """An approximate FAISS index whose ``k_factor`` x k best candidates are scored again exactly
    from ``vectors`` (row i holds the vector of ``ids[i]``); searched like a FAISS index."""

    def __init__(self, base: faiss.Index, vectors: np.ndarray, ids: np.ndarray, k_factor: int = 4):
        self.base, self.vectors, self.k_factor = base, vectors, k_factor
        self._order = np.argsort(ids, kind="stable")   # id -> row, by binary search
        self._sorted_ids = ids[self._order]

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal)

    @property
    def d(self) -> int:
        return int(self.base.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the ``k`` best of each query, by exact score; in groups of queries
        with RERANK_CANDIDATES candidates in all, so a large batch never holds all of theirs."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        group = max(1, RERANK_CANDIDATES // max(1, k * self.k_factor))
        answers = [self._search_group(queries[start:start + group], k) for start in range(0, len(queries), group)]
        if not answers:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        return np.concatenate([scores for scores, _ in answers]), np.concatenate([found for _, found in answers])

    def _search_group(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, candidates = self.base.search(queries, k * self.k_factor)
        slots = np.searchsorted(self._sorted_ids, candidates).clip(0, max(len(self._sorted_ids) - 1, 0))
        known = (candidates >= 0) & (self._sorted_ids[slots] == candidates)
        rows = np.where(known, self._order[slots], -1)
        scores = _rescore(queries, self.vectors, rows)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, best, axis=1)
        return best_scores, np.where(np.isfinite(best_scores), np.take_along_axis(candidates, best, axis=1), -1)
