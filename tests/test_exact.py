"""Exact k-NN with a bf16 first scan (simsiam_embed/index/exact.py): the answer is float32's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simsiam_embed.index import exact
from simsiam_embed.index.exact import ExactSearch, exact_neighbours


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def float32_truth(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """The k best scores of each query, by float64 arithmetic on the float32 inputs."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return -np.sort(-scores, axis=1)[:, :k]


def assert_exact(queries, vectors, k, scores, positions):
    assert np.allclose(scores, float32_truth(queries, vectors, k), atol=2e-6)
    # Each position is what its score says (a score is never paired with the wrong row).
    own = np.einsum("qd,qkd->qk", queries.astype(np.float64), vectors[positions].astype(np.float64))
    assert np.allclose(scores, own, atol=2e-6)
    assert all(len(set(row)) == k for row in positions)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_answer_is_exact_on_random_vectors(precision, monkeypatch):
    monkeypatch.setattr(exact, "BLOCK_ROWS", 700)   # several blocks, the last one short
    vectors, queries = unit_rows(5000, 48, 0), unit_rows(30, 48, 1)
    scores, positions = exact_neighbours(queries, vectors, 10, precision)
    assert_exact(queries, vectors, 10, scores, positions)


def test_near_ties_that_bf16_cannot_order_are_still_answered_exactly(monkeypatch):
    # 600 rows within 1e-4 of the query, apart by far less than bf16 resolves (2^-8): the bf16 scan
    # sees a wall of equal scores, so its candidates cannot be trusted, and float32 decides.
    rng = np.random.default_rng(2)
    query = unit_rows(1, 64, 3)
    close = query + 1e-4 * rng.standard_normal((600, 64)).astype(np.float32)
    vectors = np.concatenate([unit_rows(3000, 64, 4), close / np.linalg.norm(close, axis=1, keepdims=True)])
    vectors = vectors[rng.permutation(len(vectors))]
    scans = []
    original = ExactSearch._scan
    monkeypatch.setattr(ExactSearch, "_scan", lambda self, q, keep, dtype: scans.append(dtype) or original(self, q, keep, dtype))
    scores, positions = exact_neighbours(query, vectors, 5, "bf16")
    assert_exact(query, vectors, 5, scores, positions)
    assert scans == [torch.bfloat16, torch.float32]   # unproven, so scanned again in float32


def test_a_proven_answer_needs_one_scan_and_the_bound_holds_for_aligned_vectors(monkeypatch):
    # The worst case for the rounding bound: scores near 1 (rows almost equal to the query).
    rng = np.random.default_rng(5)
    queries = unit_rows(50, 256, 6)
    aligned = queries[rng.integers(0, 50, 4000)] + 0.05 * rng.standard_normal((4000, 256)).astype(np.float32)
    aligned /= np.linalg.norm(aligned, axis=1, keepdims=True)
    exact_scores = queries.astype(np.float64) @ aligned.astype(np.float64).T
    bf16_scores = (torch.from_numpy(queries).bfloat16() @ torch.from_numpy(aligned).bfloat16().T).float().numpy()
    # Transposed: the bound takes one bf16 score per query in its last axis.
    bound = exact._float32_bound(bf16_scores.T, queries, float(np.linalg.norm(aligned, axis=1).max()))
    assert (exact_scores.T <= bound).all() and (exact_scores.T > bound - 0.05).all()
    search = ExactSearch(unit_rows(20000, 32, 7), "bf16")
    scans = []
    original = ExactSearch._scan
    monkeypatch.setattr(ExactSearch, "_scan", lambda self, q, keep, dtype: scans.append(dtype) or original(self, q, keep, dtype))
    queries = unit_rows(20, 32, 8)
    scores, positions = search.search(queries, 3)
    assert_exact(queries, search.vectors, 3, scores, positions)
    assert scans == [torch.bfloat16]


def test_fewer_rows_than_k_pad_and_a_memory_mapped_file_is_read(tmp_path):
    vectors, queries = unit_rows(7, 16, 9), unit_rows(3, 16, 10)
    np.save(tmp_path / "vectors.npy", vectors)
    mapped = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    scores, positions = ExactSearch(mapped, "bf16").search(queries, 10)
    assert (positions[:, 7:] == -1).all() and np.isneginf(scores[:, 7:]).all()
    assert_exact(queries, vectors, 7, scores[:, :7], positions[:, :7])
    assert exact_neighbours(queries, vectors[:0], 4)[1].tolist() == [[-1] * 4] * 3
