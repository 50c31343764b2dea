"""Building an index in bounded memory (index/store.py, index/vector_file.py, index/exact.py):
vectors streamed to disk and read back in blocks, training on a sample, exact re-ranking."""

from __future__ import annotations

import tracemalloc

import faiss
import numpy as np
import pytest

import simsiam_embed.index.exact as exact
import simsiam_embed.index.store as store
import simsiam_embed.index.tuning as tuning
from simsiam_embed.index.exact import RerankedIndex
from simsiam_embed.index.store import build_faiss_index, load_index, update_index
from simsiam_embed.index.vector_file import VectorFile, VectorWriter

from conftest import PixelEncoder, make_image_folder, pixel_identity
from test_tuning import clustered


def test_vectors_written_in_blocks_read_back_as_numpy_reads_them(tmp_path):
    vectors = clustered(1000, 24)
    with VectorWriter(tmp_path / "vectors.npy", 1000, 24) as writer:
        for start in range(0, 1000, 300):
            writer.write(vectors[start:start + 300])
    assert np.array_equal(np.load(tmp_path / "vectors.npy"), vectors)
    read = VectorFile(tmp_path / "vectors.npy")
    assert len(read) == 1000 and read.shape == (1000, 24)
    assert np.array_equal(read[250:700], vectors[250:700]) and np.array_equal(read[990:2000], vectors[990:])
    assert np.array_equal(read[np.array([3, 999, 4])], vectors[[3, 999, 4]]) and np.array_equal(read[7], vectors[7])
    assert np.array_equal(read[[[1, -1], [2, 0]]], vectors[[[1, -1], [2, 0]]]) and np.array_equal(read[-2], vectors[-2])
    mask = np.arange(1000) % 7 == 0
    assert np.array_equal(read[mask], vectors[mask])
    with pytest.raises(IndexError):
        read[np.array([1000])]
    with pytest.raises(ValueError, match="10 rows written of the 20"):
        with VectorWriter(tmp_path / "short.npy", 20, 24) as writer:
            writer.write(vectors[:10])
    with pytest.raises(ValueError, match="more than the 5 rows"):
        with VectorWriter(tmp_path / "long.npy", 5, 24) as writer:
            writer.write(vectors[:6])


def test_a_build_from_a_file_holds_one_block_and_one_sample_not_the_vectors(tmp_path, monkeypatch):
    count, dim = 100_000, 64                       # 25 MB of vectors on disk
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    with VectorWriter(tmp_path / "vectors.npy", count, dim) as writer:
        for start in range(0, count, 20_000):
            block = centres[rng.integers(0, 200, 20_000)] + 0.25 * rng.standard_normal((20_000, dim)).astype(np.float32)
            writer.write(block / np.linalg.norm(block, axis=1, keepdims=True))
    monkeypatch.setattr(store, "ADD_ROWS", 4096)
    monkeypatch.setattr(store, "TRAINING_BYTES", 1 << 20)    # a 4,096-vector sample
    monkeypatch.setattr(exact, "BLOCK_ROWS", 4096)
    monkeypatch.setattr(exact, "RESCORE_BYTES", 1 << 20)
    monkeypatch.setattr(tuning, "REFINE_K_FACTORS", (4, 16))   # the tuning's reads, in fewer rounds
    vectors, ids = VectorFile(tmp_path / "vectors.npy"), np.arange(count, dtype=np.int64) * 3
    tracemalloc.start()
    try:
        index = build_faiss_index(vectors, ids, "IVF64,SQ8,Rerank")   # 8-bit codes: training in no time
        tuned = tuning.tune_for_recall(index, vectors, ids, 0.9)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A block (1 MB), the sample (1 MB), the id table (2 x 1 MB), the answers of 1,000 held-back
    # queries' candidates, a group at a time: never the 25 MB of vectors, which a build from
    # an array in memory (or FAISS's knn for the tuning's truth) would hold.
    assert peak < 16 << 20, f"{peak / 2 ** 20:.1f} MiB"
    assert index.ntotal == count and tuned.met
    assert faiss.try_extract_index_ivf(index.base).nlist == 64


def test_reranking_answers_with_exact_scores_and_finds_more_than_the_codes_alone():
    vectors = clustered(6000, 32, clusters=60)
    ids = np.arange(6000, dtype=np.int64) + 1000
    coarse = build_faiss_index(vectors, ids, "IVF32,PQ4")
    reranked = build_faiss_index(vectors, ids, "IVF32,PQ4,Rerank")
    assert isinstance(reranked, RerankedIndex) and not isinstance(coarse, RerankedIndex)
    queries = clustered(200, 32, clusters=60, seed=1)
    truth = exact.exact_neighbours(queries, vectors, 10)[1] + 1000
    scores, found = reranked.search(queries, 10)
    own = np.einsum("qd,qkd->qk", queries, vectors[found - 1000])
    assert np.allclose(scores, own, atol=1e-5) and (np.diff(scores, axis=1) <= 0).all()

    def recall(found_ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found_ids, truth)])

    assert recall(found) > recall(coarse.search(queries, 10)[1]) + 0.2


def test_a_saved_ivf_index_reranks_from_its_vectors_and_lists_past_the_budget_live_in_a_file(tmp_path, monkeypatch,
                                                                                            capfd):
    assert store._ivfpq_factory(300, 12) == "IVF7,PQ4,Rerank"   # what `index` names ivfpq at 300 images
    # The same mechanisms with 8-bit codes, which train in no time (PQ's k-means takes seconds).
    folder = make_image_folder(tmp_path / "images", per_class=60)   # 180 images: 4 lists of >= 39
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    quiet = dict(report=lambda _line: None, show_progress=False, workers=0)
    monkeypatch.setattr(tuning, "REFINE_K_FACTORS", (4, 16))   # two depths are enough to see one applied
    update = update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "in-memory", "IVF4,SQ8,Rerank",
                          **quiet)
    assert update.factory == "IVF4,SQ8,Rerank"
    in_memory = load_index(tmp_path / "in-memory")
    assert isinstance(in_memory.index, RerankedIndex) and in_memory.index.k_factor == update.tuning.parameters["k_factor"]
    # An IVF index keeps the ids in its lists (no IDMap2 and its per-vector id table).
    assert faiss.try_extract_index_ivf(in_memory.index.base) is not None
    assert not isinstance(in_memory.index.base, faiss.IndexIDMap2)
    queries = np.asarray(in_memory.vectors[:50])
    scores, found = in_memory.search(queries, 5)
    assert (found[:, 0] == in_memory.ids[:50]).all() and np.allclose(scores[:, 0], 1.0, atol=1e-5)

    monkeypatch.setattr(store, "IN_MEMORY_LISTS_BYTES", 0)
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "on-disk", "IVF4,SQ8,Rerank", **quiet)
    on_disk = load_index(tmp_path / "on-disk")
    assert not (in_memory.generation / store.LISTS_FILE).exists()
    assert (on_disk.generation / store.LISTS_FILE).stat().st_size > 0
    assert np.array_equal(in_memory.search(queries, 5)[1], on_disk.search(queries, 5)[1])
    # Handed on: the folder moved elsewhere reads its own lists file, not the path it was built at.
    moved = tmp_path / "elsewhere" / "index"
    moved.parent.mkdir()
    (tmp_path / "on-disk").rename(moved)
    assert np.array_equal(load_index(moved).search(queries, 5)[1], in_memory.search(queries, 5)[1])
    printed = capfd.readouterr().out
    assert "resizing" not in printed and "ondisk" not in printed
